"""The one compiled part: the allocator's decode step (native/decode_step.c),
an optional extension. Without a C compiler the install skips it and the
NumPy step runs instead (`kvpager.native`). Everything else is in
pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvpager._native", ["native/decode_step.c"], optional=True,
                             extra_compile_args=["-O2", "-std=c99"])])
