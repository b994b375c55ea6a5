"""The cascade side of a `CupyPlan`: whether a step can cascade
(`cascade_applies`), whether it pays (`choose_cascade`), and the shared-prefix
launch (`CascadeLaunch`).

`kvpager.cascade` finds the segments; `CascadeLaunch` packs them (members as
query rows, segments cut into chunks of positions, tiles of rows) into one
device buffer and launches the shared-prefix kernel over them
(`cascade_kernel`: `cuda/cascade_prefix_sm90.cu` on wgmma where the
multi-token kernel is paged_prefill_sm90.cu, else `cuda/cascade_prefix.cu`).
The own parts and the merge are the attention launches'
(`cupy_launches.attention_launches`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from kvpager import kernels
from kvpager.backends.cupy_prefill import (
    PrefillKernel,
    Tiling,
    plan_function,
    prefill_kernel,
    tiling,
)
from kvpager.cascade import (
    HOST_BOUND_MIN_SAVED,
    find_shared_prefixes,
    multi_token_worth_it,
    query_rows,
    worth_it,
)
from kvpager.errors import UnsupportedConfiguration
from kvpager.kernel_config import KernelConfig
from kvpager.kernel_smem import cascade_smem
from kvpager.launch import Launch, current_stream, i32, ptr


def cascade_tiling(spec: Any, group: int, config: KernelConfig) -> tuple[Tiling, int, int]:
    """(tiling, dynamic shared memory, member rows per CTA) of cascade_prefix.cu: the
    multi-token kernel's tiling (`kvpager.backends.cupy_prefill.tiling`)."""
    t = tiling(spec.head_dim, config)
    return t, cascade_smem(spec.head_dim, t.mt, t.bn, t.stages, spec.is_fp8), max(1, t.bm // group)


def cascade_kernel(spec: Any, group: int, config: KernelConfig, cc: tuple[int, int]) -> PrefillKernel:
    """The shared-prefix kernel for the pool ``spec`` and GQA ``group`` on a device of
    compute capability ``cc``: cascade_prefix_sm90.cu where `prefill_kernel` chooses
    paged_prefill_sm90.cu (the same knobs, tiling, defines, shared memory and threads:
    its twin on wgmma), else cascade_prefix.cu on `cascade_tiling` (128 threads).
    Member rows per CTA: ``max(1, tiling.bm // group)``."""
    k = prefill_kernel(spec, group, config, cc)
    if k.arch is not None and group > k.tiling.bm and config.prefill_kernel != "wgmma":
        k = prefill_kernel(spec, group, config.replace(prefill_kernel="mma"), cc)
    if group > k.tiling.bm:  # its tiles hold whole query tokens (members)
        raise UnsupportedConfiguration(
            f"a GQA group of {group} query heads exceeds the shared-prefix kernel's {k.tiling.bm}-row tiles "
            f"at head dim {spec.head_dim}")
    if k.arch is not None:  # one CTA a tile: the persistent grid (and head chunks) are paged_prefill_sm90.cu's
        defs = {name: v for name, v in k.defines.items() if name not in ("PERSIST", "HCH")}
        return replace(k, file="cascade_prefix_sm90.cu", func="cascade_prefix_sm90", defines=defs)
    t, smem, _ = cascade_tiling(spec, group, config)
    defs = {**kernels.storage_defines(spec), "HEAD_DIM": spec.head_dim, "BLOCK_SIZE": spec.block_size,
            "GROUP": group, "MT": t.mt}
    return PrefillKernel("cascade_prefix.cu", "cascade_prefix", None, t, defs, smem, 128)


def cascade_chunks(min_length: int, base_ctas: int, slots: int) -> int:
    """Chunks each shared segment is cut into (at least 256 positions each, at most 64):
    the count whose waves of ``base_ctas * chunks`` CTAs over ``slots`` resident CTA slots
    end soonest (waves x chunk length), the fewest among equals (fewer partials to merge)."""
    most = int(max(1, min(64, int(min_length) // 256)))
    return min(range(1, most + 1), key=lambda c: (-(-base_ctas * c // slots)) / c)


class CascadeLaunch:
    """The shared-prefix launch of a cascade step (`cascade_kernel`'s kernel: its
    tiling sets the member rows per CTA, the K/V tile the chunks align to, shared
    memory and threads; where "auto" chose wgmma and NVRTC cannot build it,
    cascade_prefix.cu):
    its segments cut into chunks of positions (so that enough CTAs run: each
    chunk is a slot of its own), tiles of member query rows (one per member in
    a decode step, every query token of every member in a multi-token step:
    `kvpager.cascade.query_rows`), and the partial slots per row: the own
    part's ``splits`` first (the decode kernel's splits; 1 for the multi-token
    kernel), then ``levels x chunks``. Its tables (own start per sequence,
    segments, members, tiles) go up in one upload. FP8 pools: the kernel
    converts the stored tiles in shared memory, as the multi-token kernel does.

    The launch's shape (levels, chunks, grid) is fixed when it is made; `fill`
    refills its tables in place for another step's shared prefixes (a plan
    updated under a CUDA graph). Tables are sized for the first step, with
    ``slack`` times its tiles for later ones (unused tiles exit at once); a step
    whose prefixes do not fit runs with none (every row from position 0: plain
    attention, the same result)."""

    def __init__(self, plan: Any, shared: Any, group: int, splits: int, nsm: int, slack: int = 1):
        import cupy

        spec = plan.spec
        shared = query_rows(shared, plan.query_lens)
        # kv_map: the pool's TMA tensor map where the kernel loads by TMA, else None
        k, self.fn, self.kv_map = plan_function(plan, group, plan.config, choose=cascade_kernel)
        t = k.tiling
        self.kernel, self.smem, self.threads = k, k.smem, k.threads
        self.per_tile = max(1, t.bm // group)  # member rows per CTA
        self.mt, self.bn, self.stages = t.mt, t.bn, t.stages
        self.group = group
        seg = shared.segments
        tiles_per_seg = -(-seg[:, 4].astype(np.int64) // self.per_tile)
        base_ctas = int(tiles_per_seg.sum()) * spec.num_kv_heads
        lengths = (seg[:, 2] - seg[:, 1]).astype(np.int64)
        if self.fn.max_dynamic_shared_size_bytes < self.smem:
            self.fn.max_dynamic_shared_size_bytes = self.smem
        slots = nsm * kernels.resident_ctas(self.fn, self.threads, self.smem, plan.device)
        self.chunks = cascade_chunks(int(lengths.min()), base_ctas, slots)
        self.levels, self.splits = shared.levels, splits
        self.parts = splits + shared.levels * self.chunks
        self.rows, self.decode = plan.rows, plan.decode
        first = int(tiles_per_seg.sum()) * self.chunks
        self.cap_tiles = first if slack <= 1 else slack * first + 2 * self.levels * self.chunks
        self.cap_segs = min(self.cap_tiles, len(seg) * self.chunks) if slack <= 1 else self.cap_tiles
        self.cap_members = len(shared.members) if slack <= 1 else self.levels * self.rows
        self._sizes = [self.rows, 6 * self.cap_segs, self.cap_members, 2 * self.cap_tiles, self.rows]
        nbytes = 4 * sum(self._sizes)
        self._dev = cupy.empty(nbytes // 4, dtype=cupy.int32)
        self._upload = plan.backend.uploads.take(nbytes, owner=self)
        offs = np.cumsum([0, *self._sizes]) * 4
        base = self._dev.data.ptr
        self.own_start = base
        self.segments, self.members, self.tiles = base + int(offs[1]), base + int(offs[2]), base + int(offs[3])
        # per row (a decode step's item), bit l: a member of a level-l segment (the merge's level mask)
        self.level_mask = base + int(offs[4])
        self.keep = [self._dev]
        self.spec, self.device = spec, plan.device
        self.fits = self.fill(shared)

    def _pack(self, shared: Any) -> tuple[np.ndarray, np.ndarray] | None:
        """(segment chunks [S, 6], tiles [T, 2]) of ``shared`` (members as query
        rows), or None if they exceed the tables."""
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
        step of at most ``rows`` sequences, its members as query rows: a decode
        step's already are) on the caller's stream; False when they do not fit
        (or ``shared`` is None): the launch then attends nothing and every row's
        own part starts at position 0."""
        packed = self._pack(shared)
        self._upload.wait()
        host = self._upload.host.view(np.int32)
        host[:] = 0
        rows, segs_n, members_n, tiles_n, _ = self._sizes
        at = rows + segs_n + members_n
        tiles = host[at : at + tiles_n].reshape(-1, 2)
        tiles[:, 0] = -1  # unused tiles exit at once
        if packed is not None:
            segs, used = packed
            host[: len(shared.own_start)] = shared.own_start
            host[rows : rows + segs.size] = segs.ravel()
            host[rows + segs_n : rows + segs_n + len(shared.members)] = shared.members
            tiles[: len(used)] = used
            if self.decode:  # members are the step's rows (a multi-token step's merge takes no mask)
                mask = host[at + tiles_n :]
                for _, _, _, moff, count, level in shared.segments.tolist():
                    mask[shared.members[moff : moff + count]] |= 1 << level
        self._upload.copy_to(self._dev.data.ptr, current_stream(self.device))
        return packed is not None

    def launch(self, q: Any, pool: Any, tables: Any, part_o: Any, part_lse: Any, common: list[Any],
               width: int, scales: Any, softcap: Any, scale: Any) -> Launch:
        """The launch, sharing the attention launch's cells (q, layer, soft cap, scale)."""
        spec, dev = self.spec, self.device
        args = [q, pool, tables, ptr(self.segments), ptr(self.members), ptr(self.tiles), part_o, part_lse,
                *common, i32(width), i32(self.parts), scales,
                ptr(0 if self.kv_map is None else self.kv_map.data.ptr), softcap, scale]
        return Launch(self.fn, (self.cap_tiles, spec.num_kv_heads), self.threads, self.smem, args, dev)


def cascade_applies(plan: Any, spec: Any, nseq: int) -> bool:
    """Whether ``plan``'s step can cascade at all: a decode step on the tensor-core
    kernel with one item a row, or a multi-token step (the tensor-core multi-token
    kernel) without padding rows: not where attention runs on CUDA cores (float32
    pools, heads wider than the tensor-core kernels')."""
    if kernels.wide_heads(spec):
        return False
    if plan.decode:
        return plan.rows == plan.items
    return plan.rows == nseq


def cascade_holds(spec: Any, group: int, config: KernelConfig, cc: tuple[int, int]) -> bool:
    """Whether the shared-prefix kernel's tiles hold a query token's ``group`` heads
    (up to 64 or 128 rows): past that a step does not cascade, whatever it asks."""
    try:
        cascade_kernel(spec, group, config, cc)
    except UnsupportedConfiguration:
        return False
    return True


def choose_cascade(plan: Any, num_q_heads: int, always: bool, host_bound: bool = False) -> Any:
    """The step's shared prefixes (`kvpager.cascade.SharedPrefixes`) when its
    attention is to cascade over them (``always``: whenever some are shared;
    else when `worth_it` / `multi_token_worth_it` says it pays; ``host_bound``:
    a decode step whose host sets the pace, from `HOST_BOUND_MIN_SAVED` bytes
    spared a layer), else None."""
    spec = plan.spec
    ql = None if plan.decode else plan.query_lens
    found = find_shared_prefixes(plan.tables, plan.seq_lens, spec.block_size, query_lens=ql)
    if found is None or always:
        return found
    per_position = 2 * spec.num_kv_heads * spec.head_dim * spec.itemsize
    if plan.decode:
        least = {"min_saved_bytes": HOST_BOUND_MIN_SAVED} if host_bound else {}
        return found if worth_it(found, plan.seq_lens, per_position, **least) else None
    per_tile = max(1, tiling(spec.head_dim, plan.config).bm // (num_q_heads // spec.num_kv_heads))
    partial = num_q_heads * (spec.head_dim + 1) * 4  # float32 output and log2-sum-exp per head
    pays = multi_token_worth_it(found, plan.seq_lens, plan.query_lens, per_tile, per_position, partial)
    return found if pays else None
