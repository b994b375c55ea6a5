"""The launches of a `CupyPlan`, and the tensor checks of its hot path.

`attention_launches` puts a step's attention together: decode
(`cupy_decode`: tensor cores, or CUDA cores for float32) with its split-K
merge and, over shared prefixes, `CascadeLaunch` (planned here:
`cascade_tiling`, `cascade_chunks`); or the multi-token kernel
(`cupy_prefill`). Each launch's arguments are packed once (`kvpager.launch`);
the per-layer call then only fills the q / out / layer / scale cells.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from kvpager import kernels
from kvpager.backends.cupy_decode import decode_kernel, decode_launch, merge_launch
from kvpager.backends.cupy_prefill import Tiling, prefill_launch, tiling
from kvpager.errors import InvalidArgument
from kvpager.kernel_config import KernelConfig
from kvpager.kernel_smem import cascade_smem
from kvpager.launch import Launch, current_stream, f32, i32, ptr, torch_stream


def attention_launches(plan: Any, num_q_heads: int, shared: Any = None
                       ) -> tuple[list[Launch], int, list[Any], bool]:
    """(launches, split count, buffers to keep alive, whether the kernel's scores
    are raw q . k products) of ``plan`` for ``num_q_heads``, tuned by
    ``plan.config`` (`kvpager.KernelConfig`). Cells shared by the launches:
    q (0), out (5 in decode, 7 multi-token), layer (8), window (-3),
    soft cap (-2, in the kernel's score units: raw products, or scaled log2
    units for the CUDA-core decode), scale (last); the merge launch reads the
    decode launch's out cell. ``shared`` (`kvpager.cascade.SharedPrefixes`, a
    tensor-core decode step only): the decode kernel reads each sequence's own
    positions, `cascade_launch` the shared ones once per segment, and the merge
    combines them (a cascade takes no sliding window: the plan keeps a plain
    set of launches for windowed calls)."""
    import cupy

    keep: list[Any] = []
    spec, dev, config = plan.spec, plan.device, plan.config
    group = kernels.check_group(num_q_heads, spec.num_kv_heads)
    p = plan.ptrs
    cells = dict(q=ptr(), pool=ptr(plan.backend.kv.data.ptr), tables=ptr(p["tables"]),
                 item_seq=ptr(p["item_seq"]), item_len=ptr(p["item_len"]), out=ptr(),
                 common=[i32(0), i32(spec.num_layers), i32(spec.num_kv_heads)],  # layer set per call
                 scales=ptr(plan.backend.scales.data.ptr if spec.is_fp8 else 0),  # FP8: [layers, 2, kv heads]
                 window=i32(), softcap=f32(), scale=f32())
    with cupy.cuda.Device(dev):
        if not plan.decode:
            launch, keep = prefill_launch(plan, group, cells, config)
            return [launch], 1, keep, True
        max_len = plan.max_len
        if shared is not None:  # the decode kernel reads only each sequence's own positions
            max_len = int((plan.seq_lens - shared.own_start).max())
        shape, fn, splits = decode_kernel(plan, group, max_len, config)
        rows = plan.items * num_q_heads
        cascade = None
        if shared is not None and shape.tc:
            cascade = CascadeLaunch(plan, shared, group, splits, kernels.num_sms(dev), plan.cascade_slack)
            keep += [*cascade.keep, cascade]  # the plan keeps it, and so its upload buffer, alive
        parts = cascade.parts if cascade else (splits if splits > 1 else 0)
        if parts:
            part_o_buf = cupy.empty(rows * parts * spec.head_dim, dtype=cupy.float32)
            part_lse_buf = cupy.empty(rows * parts, dtype=cupy.float32)
            part_o, part_lse = ptr(part_o_buf.data.ptr), ptr(part_lse_buf.data.ptr)
            keep += [part_o_buf, part_lse_buf]
        else:
            part_o = part_lse = ptr(0)
        own_start = ptr(cascade.own_start if cascade else 0)
        launches = [decode_launch(plan, shape, fn, splits, group, cells, part_o, part_lse, own_start, parts)]
        if cascade is not None:
            launches.append(cascade.launch(cells["q"], cells["pool"], cells["tables"], part_o, part_lse,
                                           cells["common"], plan.width, cells["softcap"], cells["scale"]))
        if parts:
            launches.append(merge_launch(plan, rows, part_o, part_lse, cells["out"], parts))
    return launches, splits, keep, shape.tc


def cascade_tiling(head_dim: int, group: int, config: KernelConfig) -> tuple[Tiling, int, int]:
    """(tiling, dynamic shared memory, members per CTA) of cascade_prefix.cu: the
    multi-token kernel's tiling (`kvpager.backends.cupy_prefill.tiling`)."""
    t = tiling(head_dim, config)
    return t, cascade_smem(head_dim, t.mt, t.bn, t.stages), max(1, t.bm // group)


def cascade_chunks(min_length: int, base_ctas: int, slots: int) -> int:
    """Chunks each shared segment is cut into (at least 256 positions each, at most 64):
    the count whose waves of ``base_ctas * chunks`` CTAs over ``slots`` resident CTA slots
    end soonest (waves x chunk length), the fewest among equals (fewer partials to merge)."""
    most = int(max(1, min(64, int(min_length) // 256)))
    return min(range(1, most + 1), key=lambda c: (-(-base_ctas * c // slots)) / c)


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
        # per_tile: members per CTA
        t, self.smem, self.per_tile = cascade_tiling(spec.head_dim, group, plan.config)
        self.mt, self.bn, self.stages = t.mt, t.bn, t.stages
        self.group = group
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
        self.chunks = cascade_chunks(int(lengths.min()), base_ctas, slots)
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
