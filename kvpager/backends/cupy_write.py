"""The K/V write launch of a `CupyPlan` (`cuda/kv_write.cu`, or its FP8 variant).

A step writes each layer's K and V once, into the same slots: the launch is
built at the plan's first write (kernel, grid, and the cells that never
change: slots, pool, geometry) and kept on the plan (``plan._write``), so
every later write sets only the K / V pointers, the layer and the strides.
K and V are read where they lie (a fused projection's views, heads-major
memory), and the same launch can copy strided query rows into a dense
buffer of the plan's (`dense_q`), because the attention kernels read dense
rows: a layer's `CupyPlan.write_attend` stays two launches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvpager import kernels
from kvpager.block_moves import write_kernel
from kvpager.launch import Launch, i32, i64, ptr

if TYPE_CHECKING:
    from kvpager.backends.cupy_plan import CupyPlan


def launch_write(plan: CupyPlan, layer: int, kp: int, vp: int, stream: int,
                 strides: tuple[int, int, int, int] | None = None,
                 q: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)) -> None:
    """The K/V write of ``layer`` from checked pointers (built at the first call);
    ``strides``: the 16-byte vectors from one token's K to the next, from one K head to
    the next, and V's two (None: dense); ``q``: (source, its token and head strides in
    vectors, destination, vectors a row) of the query rows the launch also copies densely
    (vectors 0: none)."""
    launch = plan._write
    if launch is None:
        spec, shape = plan.spec, plan._kv_shape
        if not shape[0]:
            return
        name, defs = write_kernel(spec)
        fn = kernels.get_kernel("kv_write.cu", name, defs, plan.device)
        args = [ptr(), ptr(), ptr(plan.ptrs["slots"]), ptr(plan.backend.kv.data.ptr), i32(shape[0]),
                i32(), i32(spec.num_layers), i32(spec.num_kv_heads), i32(spec.block_size),
                i32(spec.head_dim * spec.compute_itemsize // 16), i64(), i64(), i64(), i64(),
                ptr(), i64(), i64(), ptr(), i32()]
        if spec.is_fp8:
            args.append(ptr(plan.backend.scales.data.ptr))
        launch = plan._write = Launch(fn, (min(shape[0], 65536),), 128, 0, args, plan.device)
    a = launch.args
    row = a[9].value
    a[0].value, a[1].value, a[5].value = kp, vp, layer
    a[10].value, a[11].value, a[12].value, a[13].value = strides or (plan.spec.num_kv_heads * row, row) * 2
    a[14].value, a[15].value, a[16].value, a[17].value, a[18].value = q
    launch(stream)


def dense_q(plan: CupyPlan, heads: int) -> Any:
    """The plan's buffer of dense query rows [tokens, heads, head_dim] for ``heads``
    (the write launch copies strided queries there for the attention after it; made
    once, kept with the plan, so captured graphs read the same memory)."""
    buf = plan._q_rows.get(heads)
    if buf is None:
        import torch

        buf = plan._q_rows[heads] = torch.empty((plan._tokens, heads, plan.spec.head_dim),
                                                dtype=plan._torch_dtype, device=f"cuda:{plan.device}")
    return buf
