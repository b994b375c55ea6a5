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
    tensor-core decode step only): the decode kernel reads each sequence's own
    positions, `cascade_launch` the shared ones once per segment, and the merge
    combines them (a cascade takes no sliding window: the plan keeps a plain
    set of launches for windowed calls)."""
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
                                               plan.width, softcap, scale))
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
            order = np.argsort(-(sl[seq] - ql[seq] + j0), kind="stable")
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
            args = [q, pool, ptr(p["tables"]), ptr(p["seq_lens"]), ptr(p["query_lens"]),
                    ptr(p["q_start"]), ptr(tiles_dev.data.ptr), out, *common, i32(plan.width), scales, window,
                    softcap, scale]
            launches.append(Launch(fn, (len(tiles), spec.num_kv_heads), 128, smem, args, dev))
    return launches, splits, keep, not plan.decode or tc


class CascadeLaunch:
    """The shared-prefix launch of a cascade decode step (`cuda/cascade_prefix.cu`):
    its segments cut into chunks of positions (so that enough CTAs run: each
    chunk is a slot of its own), tiles of members, and the partial slots per
    row: the decode kernel's ``splits`` first, then ``levels x chunks``. Its
    tables (own start per row, segments, members, tiles) go up in one upload.

    The launch's shape (levels, chunks, grid) is fixed when it is made; `fill`
    refills its tables in place for another step's shared prefixes (a plan
    updated under a CUDA graph). Tables are sized for the first step, with
    ``slack`` times its tiles for later ones (unused tiles exit at once); a step
    whose prefixes do not fit runs with none (every row from position 0: plain
    attention, the same result)."""

    def __init__(self, plan: Any, shared: Any, group: int, splits: int, nsm: int, slack: int = 1):
        import cupy

        spec = plan.spec
        self.mt = kernels.PREFILL_MT or (2 if spec.head_dim <= 128 else 1)
        bm = 64 * self.mt
        self.bn = 32 if self.mt == 2 or spec.head_dim > 128 else 64
        self.stages = 3 if self.mt == 2 else 2
        self.smem = (bm + 2 * self.stages * self.bn) * (spec.head_dim + 8) * 2
        self.group = group
        self.per_tile = max(1, bm // group)  # members per CTA
        seg = shared.segments
        tiles_per_seg = -(-seg[:, 4].astype(np.int64) // self.per_tile)
        base_ctas = int(tiles_per_seg.sum()) * spec.num_kv_heads
        lengths = (seg[:, 2] - seg[:, 1]).astype(np.int64)
        defs = {"KV_DTYPE": kernels.DTYPE_CODES[spec.dtype], "HEAD_DIM": spec.head_dim,
                "BLOCK_SIZE": spec.block_size, "GROUP": group, "MT": self.mt}
        self.fn = kernels.get_kernel("cascade_prefix.cu", "cascade_prefix", defs, plan.device)
        if self.fn.max_dynamic_shared_size_bytes < self.smem:
            self.fn.max_dynamic_shared_size_bytes = self.smem
        slots = nsm * kernels.resident_ctas(self.fn, 128, self.smem, plan.device)
        # Chunks of each segment (at least 256 positions): the count whose waves of CTAs
        # end soonest (waves x chunk length), the fewest among equals (fewer partials to merge).
        most = int(max(1, min(64, int(lengths.min()) // 256)))
        self.chunks = min(range(1, most + 1), key=lambda c: (-(-base_ctas * c // slots)) / c)
        self.levels, self.splits = shared.levels, splits
        self.parts = splits + shared.levels * self.chunks
        self.rows = plan.rows
        first = int(tiles_per_seg.sum()) * self.chunks
        self.cap_tiles = first if slack <= 1 else slack * first + 2 * self.levels * self.chunks
        self.cap_segs = min(self.cap_tiles, len(seg) * self.chunks) if slack <= 1 else self.cap_tiles
        self.cap_members = len(shared.members) if slack <= 1 else self.levels * self.rows
        self._sizes = [self.rows, 6 * self.cap_segs, self.cap_members, 2 * self.cap_tiles]
        nbytes = 4 * sum(self._sizes)
        self._dev = cupy.empty(nbytes // 4, dtype=cupy.int32)
        self._upload = plan.backend.uploads.take(nbytes, owner=self)
        offs = np.cumsum([0, *self._sizes]) * 4
        base = self._dev.data.ptr
        self.own_start = base
        self.segments, self.members, self.tiles = base + int(offs[1]), base + int(offs[2]), base + int(offs[3])
        self.keep = [self._dev]
        self.spec, self.device = spec, plan.device
        self.fits = self.fill(shared)

    def _pack(self, shared: Any) -> tuple[np.ndarray, np.ndarray] | None:
        """(segment chunks [S, 6], tiles [T, 2]) of ``shared``, or None if they exceed the tables."""
        if shared is None or shared.levels > self.levels or len(shared.members) > self.cap_members:
            return None
        seg = shared.segments
        tiles_per_seg = -(-seg[:, 4].astype(np.int64) // self.per_tile)
        chunks, splits = self.chunks, self.splits
        if len(seg) * chunks > self.cap_segs or int(tiles_per_seg.sum()) * chunks > self.cap_tiles:
            return None
        out = []
        for row, start, end, moff, count, level in seg.tolist():
            per_chunk = -(-(end - start) // chunks)
            step = -(-per_chunk // self.bn) * self.bn  # aligned to the K/V tile
            for c in range(chunks):
                a, b = start + c * step, min(end, start + (c + 1) * step)
                out.append((row, a, max(a, b), moff, count, splits + level * chunks + c))
        segs = np.asarray(out, dtype=np.int32).reshape(-1, 6)
        reps = np.repeat(tiles_per_seg, chunks)
        seg_of = np.repeat(np.arange(len(segs), dtype=np.int32), reps)
        first = np.repeat(np.cumsum(reps) - reps, reps)
        j0 = ((np.arange(len(seg_of)) - first) * self.per_tile).astype(np.int32)
        return segs, np.stack([seg_of, j0], axis=1).astype(np.int32)

    def fill(self, shared: Any) -> bool:
        """Refill the tables for ``shared`` (`kvpager.cascade.SharedPrefixes` of a
        step of at most ``rows`` rows) on the caller's stream; False when they do
        not fit (or ``shared`` is None): the launch then attends nothing and every
        row's own part starts at position 0."""
        packed = self._pack(shared)
        self._upload.wait()
        host = self._upload.host.view(np.int32)
        host[:] = 0
        rows, segs_n, members_n, _ = self._sizes
        tiles = host[rows + segs_n + members_n:].reshape(-1, 2)
        tiles[:, 0] = -1  # unused tiles exit at once
        if packed is not None:
            segs, used = packed
            host[: len(shared.own_start)] = shared.own_start
            host[rows : rows + segs.size] = segs.ravel()
            host[rows + segs_n : rows + segs_n + len(shared.members)] = shared.members
            tiles[: len(used)] = used
        self._upload.copy_to(self._dev.data.ptr, current_stream(self.device))
        return packed is not None

    def launch(self, q: Any, pool: Any, tables: Any, part_o: Any, part_lse: Any, common: list[Any],
               width: int, softcap: Any, scale: Any) -> Launch:
        spec, dev = self.spec, self.device
        args = [q, pool, tables, ptr(self.segments), ptr(self.members), ptr(self.tiles), part_o, part_lse,
                *common, i32(width), i32(self.parts), softcap, scale]
        return Launch(self.fn, (self.cap_tiles, spec.num_kv_heads), 128, self.smem, args, dev)


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
