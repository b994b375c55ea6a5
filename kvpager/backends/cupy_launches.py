"""The launches of a `CupyPlan`, and the tensor checks of its hot path.

`attention_launches` picks the attention kernel for a step (decode on tensor
cores, CUDA-core decode for float32, or the multi-token kernel), its layout
and split count, and packs each launch's arguments once (`kvpager.launch`);
the per-layer call then only fills the q / out / layer / scale cells.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from kvpager import kernels
from kvpager.backends.cupy_cascade import CascadeLaunch
from kvpager.errors import InvalidArgument, UnsupportedConfiguration
from kvpager.launch import Launch, current_stream, f32, i32, ptr, torch_stream


def attention_launches(plan: Any, num_q_heads: int, shared: Any = None
                       ) -> tuple[list[Launch], int, list[Any], bool]:
    """(launches, split count, buffers to keep alive, whether the kernel's scores
    are raw q . k products) of ``plan`` for ``num_q_heads``. Cells shared by the
    launches: q (0), out (5 in decode, 7 multi-token), layer (8), window (-3),
    soft cap (-2, in the kernel's score units: raw products, or scaled log2
    units for the CUDA-core decode), scale (last); the merge launch reads the
    decode launch's out cell. ``shared`` (`kvpager.cascade.SharedPrefixes`, a
    tensor-core decode or multi-token step): the decode or multi-token kernel
    reads each sequence's own positions, `CascadeLaunch` the shared ones once
    per segment for all member query rows, and the merge combines them (a
    cascade takes no sliding window: the plan keeps a plain set of launches for
    windowed calls)."""
    import cupy

    keep: list[Any] = []
    spec, dev = plan.spec, plan.device
    group = kernels.check_group(num_q_heads, spec.num_kv_heads)
    base = {**kernels.storage_defines(spec), "HEAD_DIM": spec.head_dim, "BLOCK_SIZE": spec.block_size}
    pool = ptr(plan.backend.kv.data.ptr)
    scales = ptr(plan.backend.scales.data.ptr if spec.is_fp8 else 0)  # FP8: [layers, 2, kv heads]
    common = [i32(0), i32(spec.num_layers), i32(spec.num_kv_heads)]  # layer set per call
    q, out, window, softcap, scale = ptr(), ptr(), i32(), f32(), f32()
    p = plan.ptrs
    launches: list[Launch] = []
    with cupy.cuda.Device(dev):
        if plan.decode:
            tc = kernels.DECODE_TC and spec.dtype != "float32"
            if spec.is_fp8 and not tc:
                raise UnsupportedConfiguration("FP8 pools decode on tensor cores only (kernels.DECODE_TC)")
            gs = kernels.decode_subgroup(spec.dtype, spec.head_dim, group)
            nsm = kernels.num_sms(dev)
            max_len = plan.max_len
            if shared is not None:  # the decode kernel reads only each sequence's own positions
                max_len = int((plan.seq_lens - shared.own_start).max())
            if tc:
                hpc, wph = kernels.decode_layout(spec.num_kv_heads, spec.head_dim, spec.itemsize,
                                                 plan.items, max_len, nsm)
                threads = 32 * hpc * wph
                stages = kernels.decode_stages(spec.head_dim, spec.itemsize, hpc * wph)
                defs = {**base, "GROUP": group, "STAGES": stages, "HPC": hpc, "WPH": wph}
                if kernels.DECODE_L2_PREFETCH:
                    defs["CP_L2_PREFETCH"] = kernels.DECODE_L2_PREFETCH
                fn = kernels.get_kernel("paged_decode_tc.cu", "paged_decode_tc", defs, dev)
                smem = kernels.decode_smem(spec.head_dim, spec.itemsize, hpc * wph, stages, group)
                if fn.max_dynamic_shared_size_bytes < smem:
                    fn.max_dynamic_shared_size_bytes = smem
                ctas = plan.items * (spec.num_kv_heads // hpc)
                resident = kernels.resident_ctas(fn, threads, smem, dev)
            else:
                fn = kernels.get_kernel("paged_decode.cu", "paged_decode",
                                        {**base, "SUBGROUP": gs, "CH": kernels.DECODE_ROWS}, dev)
                threads, smem, resident = 128, 0, 0
                ctas = plan.items * spec.num_kv_heads * (group // gs)
            splits = plan.num_splits or kernels.plan_splits(ctas, max_len, nsm, resident)
            splits = int(splits)
            rows = plan.items * num_q_heads
            cascade = None
            if shared is not None and tc:
                cascade = CascadeLaunch(plan, shared, group, splits, nsm, plan.cascade_slack)
                keep += [*cascade.keep, cascade]  # the plan keeps it, and so its upload buffer, alive
            parts = cascade.parts if cascade else (splits if splits > 1 else 0)
            if parts:
                part_o_buf = cupy.empty(rows * parts * spec.head_dim, dtype=cupy.float32)
                part_lse_buf = cupy.empty(rows * parts, dtype=cupy.float32)
                part_o, part_lse = ptr(part_o_buf.data.ptr), ptr(part_lse_buf.data.ptr)
                keep += [part_o_buf, part_lse_buf]
            else:
                part_o = part_lse = ptr(0)
            args = [q, pool, ptr(p["tables"]), ptr(p["item_seq"]), ptr(p["item_len"]), out,
                    part_o, part_lse, *common]
            if not tc:
                args.append(i32(group))
            args += [i32(plan.width), i32(splits), ptr(cascade.own_start if cascade else 0), i32(parts)]
            if tc:
                args.append(scales)
            args += [window, softcap, scale]
            launches.append(Launch(fn, (ctas, splits), threads, smem, args, dev))
            if cascade is not None:
                launches.append(cascade.launch(q, pool, ptr(p["tables"]), part_o, part_lse, common,
                                               plan.width, scales, softcap, scale))
            if parts:
                plain = {k: v for k, v in base.items() if k != "KV_FP8"}  # merges float32 partials
                merge = kernels.get_kernel("paged_decode.cu", "merge_splits",
                                           {**plain, "SUBGROUP": gs, "CH": kernels.DECODE_ROWS}, dev)
                launches.append(Launch(merge, (rows,), 256, 0, [part_o, part_lse, out, i32(parts)], dev))
        else:
            splits = 1
            mt = kernels.PREFILL_MT or (2 if spec.head_dim <= 128 else 1)
            qt = 64 * mt // group
            ql, sl = plan.query_lens, plan.seq_lens
            counts = -(-ql // qt)
            seq = np.repeat(np.arange(len(ql), dtype=np.int32), counts)
            first = np.cumsum(counts) - counts
            j0 = ((np.arange(len(seq)) - np.repeat(first, counts)) * qt).astype(np.int32)
            # Tiles that see the most K/V first, so the long ones do not trail the launch.
            own = shared.own_start[seq] if shared is not None else 0
            order = np.argsort(-(sl[seq] - own - ql[seq] + j0), kind="stable")
            tiles = np.ascontiguousarray(np.stack([seq[order], j0[order]], axis=1), dtype=np.int32)
            tiles_dev = cupy.empty(tiles.shape, dtype=cupy.int32)
            from cupy.cuda import runtime

            runtime.memcpyAsync(tiles_dev.data.ptr, tiles.ctypes.data, tiles.nbytes,
                                runtime.memcpyHostToDevice, current_stream(dev))
            keep += [tiles_dev, tiles]  # the host copy alive until the copy has run
            fn = kernels.get_kernel("paged_prefill.cu", "paged_prefill",
                                    {**base, "GROUP": group, "MT": mt}, dev)
            bn = 32 if mt == 2 or spec.head_dim > 128 else 64
            stages = 3 if mt == 2 else 2
            smem = (64 * mt + 2 * stages * bn) * (spec.head_dim + 8) * 2
            if spec.is_fp8:  # one converted K and V tile, the stages as stored
                smem = (64 * mt + 2 * bn) * (spec.head_dim + 8) * 2 + 2 * stages * bn * spec.head_dim
            if fn.max_dynamic_shared_size_bytes < smem:
                fn.max_dynamic_shared_size_bytes = smem
            # A cascade: this kernel reads each sequence's own positions into slot 0, the
            # cascade launch the shared ones into the other slots, and merge_splits combines them.
            cascade = None if shared is None else CascadeLaunch(plan, shared, group, 1, kernels.num_sms(dev))
            rows = plan.num_tokens * num_q_heads
            part_o = part_lse = ptr(0)
            if cascade is not None:
                keep += [*cascade.keep, cascade]
                part_o_buf = cupy.empty(rows * cascade.parts * spec.head_dim, dtype=cupy.float32)
                part_lse_buf = cupy.empty(rows * cascade.parts, dtype=cupy.float32)
                part_o, part_lse = ptr(part_o_buf.data.ptr), ptr(part_lse_buf.data.ptr)
                keep += [part_o_buf, part_lse_buf]
            args = [q, pool, ptr(p["tables"]), ptr(p["seq_lens"]), ptr(p["query_lens"]),
                    ptr(p["q_start"]), ptr(tiles_dev.data.ptr), out, *common, i32(plan.width),
                    ptr(cascade.own_start if cascade else 0), part_o, part_lse, i32(cascade.parts if cascade else 0),
                    scales, window, softcap, scale]
            launches.append(Launch(fn, (len(tiles), spec.num_kv_heads), 128, smem, args, dev))
            if cascade is not None:
                launches.append(cascade.launch(q, pool, ptr(p["tables"]), part_o, part_lse, common,
                                               plan.width, scales, softcap, scale))
                gs = kernels.decode_subgroup(spec.dtype, spec.head_dim, group)
                plain = {k: v for k, v in base.items() if k != "KV_FP8"}  # merges float32 partials
                merge = kernels.get_kernel("paged_decode.cu", "merge_splits",
                                           {**plain, "SUBGROUP": gs, "CH": kernels.DECODE_ROWS}, dev)
                launches.append(Launch(merge, (rows,), 256, 0, [part_o, part_lse, out, i32(cascade.parts)], dev))
    return launches, splits, keep, not plan.decode or tc


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
    if type(x).__module__.startswith("torch"):
        if not x.is_cuda or x.get_device() != device:
            raise InvalidArgument(f"{name} is on {x.device}; the pool is on cuda:{device}")
        if str(x.dtype)[6:] != backend.spec.dtype:
            raise InvalidArgument(f"{name} must have dtype {backend.spec.dtype}, got {x.dtype}")
        if tuple(x.shape) != shape:
            raise InvalidArgument(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        p = x.data_ptr()
        if not x.is_contiguous() or p % 16:
            if writable:
                raise InvalidArgument(f"{name} must be a contiguous, 16-byte aligned tensor")
            x = x.contiguous() if p % 16 == 0 else x.clone()
            p = x.data_ptr()
        return p, x
    import cupy

    if not isinstance(x, cupy.ndarray):
        raise InvalidArgument(f"{name} must be a cupy array or a torch CUDA tensor, got {type(x).__name__}")
    if x.dtype != backend.dtype:
        raise InvalidArgument(f"{name} must have dtype {backend.spec.dtype}, got {x.dtype}")
    if x.device.id != device:
        raise InvalidArgument(f"{name} is on cuda:{x.device.id}, the pool on cuda:{device}")
    if tuple(x.shape) != shape:
        raise InvalidArgument(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if not x.flags.c_contiguous or x.data.ptr % 16:
        if writable:
            raise InvalidArgument(f"{name} must be a contiguous, 16-byte aligned array")
        x = x.copy()
    return x.data.ptr, x
