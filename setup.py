"""The compiled parts, both optional extensions: the allocator's decode step,
the prefix cache's block keys and a step's shared prefixes (native/decode_step.c,
native/block_keys.c, native/shared_prefixes.c; `kvpager.native`) and paged attention on the CPU
(native/cpu_attention.c; `kvpager.cpu_attention`). Without a C compiler the
install skips them and their NumPy (hashlib) twins run instead. Everything else is in
pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("kvpager._native", ["native/decode_step.c", "native/block_keys.c", "native/shared_prefixes.c",
                                   "native/plan_slots.c"],
              depends=["native/buffers.h", "native/block_keys.h", "native/shared_prefixes.h",
                       "native/plan_slots.h"], optional=True,
              extra_compile_args=["-O2", "-std=c99"]),
    Extension("kvpager._cpu_attention", ["native/cpu_attention.c", "native/cpu_attention_avx512.c",
                                         "native/cpu_attention_avx2.c", "native/cpu_attention_base.c"],
              depends=["native/buffers.h", "native/cpu_attention.h", "native/cpu_attention_task.h"], optional=True,
              extra_compile_args=["-O3", "-std=c11", "-ffp-contract=fast", "-Wno-psabi"]),
])
