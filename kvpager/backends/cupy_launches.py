"""The launches of a `CupyPlan`, and the tensor checks of its hot path (pointers of
tensors that need no copy, attention sinks as a float32 device pointer).

`attention_launches` puts a step's attention together: decode
(`cupy_decode`: tensor cores, or CUDA cores for float32) with its split-K
merge, or the multi-token kernel (`cupy_prefill`); over shared prefixes
either one reads each sequence's own positions, `CascadeLaunch`
(`cupy_cascade`) the shared ones, and the merge combines them. Each
launch's arguments are packed once (`kvpager.launch`); the per-layer call
then only fills the q / out / layer / scale cells.
"""

from __future__ import annotations

import sys
from typing import Any

from kvpager import kernels
from kvpager.attend_options import check_sinks_shape
from kvpager.backends.cupy_cascade import CascadeLaunch
from kvpager.backends.cupy_decode import decode_kernel, decode_launch, merge_launch
from kvpager.backends.cupy_prefill import prefill_launch
from kvpager.errors import InvalidArgument
from kvpager.launch import Launch, current_stream, f32, i32, ptr, torch_stream


def attention_launches(plan: Any, num_q_heads: int, shared: Any = None, merged: bool = False
                       ) -> tuple[list[Launch], int, list[Any], bool, Any]:
    """(launches, split count, buffers to keep alive, whether the kernel's scores
    are raw q . k products, the merge's sinks cell or None where nothing merges)
    of ``plan`` for ``num_q_heads``, tuned by
    ``plan.config`` (`kvpager.KernelConfig`). Cells shared by the launches:
    q (0), out (5 in decode, 7 multi-token), layer (8), window (-3),
    soft cap (-2, in the kernel's score units: raw products, or scaled log2
    units for the CUDA-core decode), scale (last); the merge launch reads the
    decode launch's out cell. ``shared`` (`kvpager.cascade.SharedPrefixes`, a
    tensor-core step): the decode or multi-token kernel reads each sequence's
    own positions, `CascadeLaunch` the shared ones once per segment, and the
    merge combines them (a cascade takes no sliding window: the plan keeps a
    plain set of launches for windowed calls). A split decode otherwise merges in its
    own kernel up to `KernelConfig.decode_merge_fused_splits` splits. ``merged``: end with the merge even
    where one partial state a row would do without it: the attention sinks apply
    there (the sinks cell holds their pointer, 0 for none, set per call)."""
    import cupy

    keep: list[Any] = []
    spec, dev, config = plan.spec, plan.device, plan.config
    group = kernels.check_group(num_q_heads, spec.num_kv_heads)
    p = plan.ptrs
    cells = dict(q=ptr(), pool=ptr(plan.backend.kv.data.ptr), tables=ptr(p["tables"]),
                 item_seq=ptr(p["item_seq"]), item_len=ptr(p["item_len"]), out=ptr(),
                 common=[i32(0), i32(spec.num_layers), i32(spec.num_kv_heads)],  # layer set per call
                 scales=ptr(plan.backend.scales.data.ptr if spec.is_fp8 else 0),  # FP8: [layers, 2, kv heads]
                 window=i32(), softcap=f32(), scale=f32(), sinks=ptr())
    with cupy.cuda.Device(dev):
        if not plan.decode:
            return _multi_token(plan, group, num_q_heads, cells, shared, config, merged)
        max_len = plan.max_len
        if shared is not None:  # the decode kernel reads only each sequence's own positions
            max_len = int((plan.seq_lens - shared.own_start).max())
        shape, fn, splits = decode_kernel(plan, group, max_len, config)
        rows = plan.items * num_q_heads
        cascade = None
        if shared is not None and shape.tc:
            cascade = CascadeLaunch(plan, shared, group, splits, kernels.num_sms(dev), plan.cascade_slack)
            keep += [*cascade.keep, cascade]  # the plan keeps it, and so its upload buffer, alive
        parts = cascade.parts if cascade else (splits if splits > 1 or merged else 0)
        if parts:
            part_o_buf = cupy.empty(rows * parts * spec.head_dim, dtype=cupy.float32)
            part_lse_buf = cupy.empty(rows * parts, dtype=cupy.float32)
            part_o, part_lse = ptr(part_o_buf.data.ptr), ptr(part_lse_buf.data.ptr)
            keep += [part_o_buf, part_lse_buf]
        else:
            part_o = part_lse = ptr(0)
        own_start = ptr(cascade.own_start if cascade else 0)
        fused = (bool(parts) and cascade is None and not merged and shape.tc
                 and splits <= config.decode_merge_fused_splits)
        merge_ctr = None
        if fused:  # the last CTA of each column merges: a count per column, zero now and after each launch
            ctr_buf = cupy.zeros(shape.ctas, dtype=cupy.int32)
            merge_ctr = ptr(ctr_buf.data.ptr)
            keep.append(ctr_buf)
        launches = [decode_launch(plan, shape, fn, splits, group, cells, part_o, part_lse, own_start, parts,
                                  merge_ctr)]
        if cascade is not None:
            launches.append(cascade.launch(cells["q"], cells["pool"], cells["tables"], part_o, part_lse,
                                           cells["common"], plan.width, cells["scales"], cells["softcap"],
                                           cells["scale"]))
        if parts and cascade is not None:  # the shared slots count for each level's members only
            launches.append(merge_launch(plan, rows, part_o, part_lse, cells["out"], parts, num_q_heads,
                                         cells["sinks"], cascade.level_mask, splits, cascade.chunks))
        elif parts and not fused:  # right after the decode kernel that writes its partials
            pdl = config.decode_merge_pdl and kernels.compute_capability(dev) >= (9, 0)
            launches.append(merge_launch(plan, rows, part_o, part_lse, cells["out"], parts, num_q_heads,
                                         cells["sinks"], programmatic=pdl))
    return launches, splits, keep, shape.tc, cells["sinks"] if parts and not fused else None



def _multi_token(plan: Any, group: int, num_q_heads: int, cells: dict[str, Any], shared: Any,
                 config: Any, merged: bool) -> tuple[list[Launch], int, list[Any], bool, Any]:
    """The multi-token launches: the kernel alone, or (over ``shared``) the kernel
    over each sequence's own positions into partial slot 0, the shared part into
    the others, and the merge; ``merged`` without ``shared``: the kernel into one
    partial slot and the merge (the attention sinks)."""
    import cupy

    if shared is None and not merged:
        launch, keep = prefill_launch(plan, group, cells, config)
        return [launch], 1, keep, True, None
    spec = plan.spec
    rows = plan.num_tokens * num_q_heads
    cascade = None if shared is None else CascadeLaunch(plan, shared, group, 1, kernels.num_sms(plan.device))
    parts = 1 if cascade is None else cascade.parts
    part_o_buf = cupy.empty(rows * parts * spec.head_dim, dtype=cupy.float32)
    part_lse_buf = cupy.empty(rows * parts, dtype=cupy.float32)
    part_o, part_lse = ptr(part_o_buf.data.ptr), ptr(part_lse_buf.data.ptr)
    keep: list[Any] = [part_o_buf, part_lse_buf]
    if cascade is None:
        launch, more = prefill_launch(plan, group, cells, config, part_o=part_o, part_lse=part_lse, parts=1)
        launches = [launch]
    else:
        launch, more = prefill_launch(plan, group, cells, config, own=shared.own_start,
                                      own_start=ptr(cascade.own_start), part_o=part_o, part_lse=part_lse,
                                      parts=parts)
        launches = [launch, cascade.launch(cells["q"], cells["pool"], cells["tables"], part_o, part_lse,
                                           cells["common"], plan.width, cells["scales"], cells["softcap"],
                                           cells["scale"])]
        keep += [*cascade.keep, cascade]
    launches.append(merge_launch(plan, rows, part_o, part_lse, cells["out"], parts, num_q_heads, cells["sinks"]))
    return launches, 1, [*more, *keep], True, cells["sinks"]


def torch_kinds(dtype: str) -> tuple[Any, Any, Any]:
    """(torch.Tensor, the torch dtype, torch's raw current-stream getter) where
    torch is loaded; None placeholders otherwise (the fast path never matches)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None, None, current_stream
    return torch.Tensor, getattr(torch, dtype), torch_stream()


def cupy_empty_like(x: Any) -> Any:
    import cupy

    return cupy.empty(x.shape, dtype=x.dtype)


def device_tensor(x: Any, name: str, shape: tuple[int, ...], backend: Any, device: int,
                  writable: bool = False) -> tuple[int, Any]:
    """(device pointer, tensor) of a CuPy array or torch CUDA tensor on the pool's
    GPU in the pool dtype and ``shape``; a strided or misaligned input is copied
    (an output must already be dense)."""
    if check_device_kind(x, name, backend, device):
        if tuple(x.shape) != shape:
            raise InvalidArgument(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        p = x.data_ptr()
        if not x.is_contiguous() or p % 16:
            if writable:
                raise InvalidArgument(f"{name} must be a contiguous, 16-byte aligned tensor")
            x = x.contiguous() if p % 16 == 0 else x.clone()
            p = x.data_ptr()
        return p, x
    if tuple(x.shape) != shape:
        raise InvalidArgument(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if not x.flags.c_contiguous or x.data.ptr % 16:
        if writable:
            raise InvalidArgument(f"{name} must be a contiguous, 16-byte aligned array")
        x = x.copy()
    return x.data.ptr, x


def check_device_kind(x: Any, name: str, backend: Any, device: int) -> bool:
    """InvalidArgument unless ``x`` is a CuPy array or a torch CUDA tensor on the
    pool's GPU in the pool dtype; whether it is a torch tensor."""
    if type(x).__module__.startswith("torch"):
        if not x.is_cuda or x.get_device() != device:
            raise InvalidArgument(f"{name} is on {x.device}; the pool is on cuda:{device}")
        if str(x.dtype)[6:] != backend.spec.dtype:
            raise InvalidArgument(f"{name} must have dtype {backend.spec.dtype}, got {x.dtype}")
        return True
    import cupy

    if not isinstance(x, cupy.ndarray):
        raise InvalidArgument(f"{name} must be a cupy array or a torch CUDA tensor, got {type(x).__name__}")
    if x.dtype != backend.dtype:
        raise InvalidArgument(f"{name} must have dtype {backend.spec.dtype}, got {x.dtype}")
    if x.device.id != device:
        raise InvalidArgument(f"{name} is on cuda:{x.device.id}, the pool on cuda:{device}")
    return False


def token_layout(plan: Any, x: Any, heads: int) -> tuple[int, int, int]:
    """(pointer, 16-byte vectors from one token's heads to the next, from one head to the
    next) of a torch CUDA tensor [1, heads, num_tokens, head_dim] of the pool's dtype on its
    GPU whose head dims are dense and whose strides and pointer are 16-byte aligned: a model's
    projection viewed heads first (token-major, rows dense), a view of a fused projection's
    output (q, k and v side by side in each token's row: GPTBigCode, Falcon, Phi-3; or in
    each head's: GPT-NeoX), heads-major memory; (0, 0, 0) for anything else."""
    if type(x) is not plan._torch_type or x.dtype is not plan._torch_dtype:
        return 0, 0, 0
    t, d = plan._tokens, plan.spec.head_dim
    if x.shape != (1, heads, t, d):
        return 0, 0, 0
    _, head, token, one = x.stride()
    if heads == 1:
        head = d  # (one head, or one token: its stride says nothing)
    if t == 1:
        token = heads * d
    size = x.element_size()
    if one != 1 or head * size % 16 or token * size % 16:
        return 0, 0, 0
    p = x.data_ptr()
    if p % 16 or not x.is_cuda or x.get_device() != plan.device:
        return 0, 0, 0
    return p, token * size // 16, head * size // 16


def fast_ptr(plan: Any, x: Any, shape: tuple[int, ...]) -> int:
    """The pointer of a torch CUDA tensor that passes every check (right
    device, dtype, shape, dense, 16-byte aligned) at the cost of a few
    attribute reads; 0 for anything else (then the full checks run)."""
    if type(x) is not plan._torch_type or x.dtype is not plan._torch_dtype or x.shape != shape:
        return 0
    p = x.data_ptr()
    if p % 16 or not x.is_cuda or x.get_device() != plan.device or not x.is_contiguous():
        return 0
    return p


def check_sinks_kind(sinks: Any, heads: int, device: int) -> None:
    """InvalidArgument unless ``sinks`` are floats of shape [heads] on the host or
    on the pool's GPU (what `sinks_ptr` takes)."""
    check_sinks_shape(sinks, heads)
    if type(sinks).__module__.startswith("torch") and sinks.is_cuda and sinks.get_device() != device:
        raise InvalidArgument(f"sinks are on {sinks.device}; the pool is on cuda:{device}")


def sinks_ptr(plan: Any, sinks: Any, heads: int) -> int:
    """The device pointer of ``sinks`` as float32 [heads] on the pool's GPU: a
    dense torch float32 tensor of that shape there as it is, any other float
    array or tensor of that shape copied (kept until the next copy)."""
    if (type(sinks) is plan._torch_type and sinks.dtype is plan._torch_f32 and sinks.shape == (heads,)
            and sinks.is_cuda and sinks.get_device() == plan.device and sinks.is_contiguous()):
        return sinks.data_ptr()
    import cupy

    check_sinks_kind(sinks, heads, plan.device)
    if type(sinks).__module__.startswith("torch"):
        sinks = sinks.detach().float().cpu().numpy() if not sinks.is_cuda else sinks.detach().float()
    with cupy.cuda.Device(plan.device):
        keep = sinks.contiguous() if hasattr(sinks, "contiguous") else cupy.asarray(sinks, dtype=cupy.float32)
    plan._sinks_keep = keep
    return keep.data_ptr() if hasattr(keep, "data_ptr") else keep.data.ptr
