"""`KernelConfig`: every tuning knob of the CUDA kernels, with the production values.

A step plan (`KVPool.plan(..., config=...)`, `kvpager.plan.make_plan`) and a
`CupyBackend` (its block copies) take one; without it they use `DEFAULT`,
the values measured best on an H200 (docs/gpu-notes.md). Tests and
benchmarks pass other configs to time or check a variant: nothing in
kvpager is patched at run time. The planners read a config; they never
change one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from kvpager.errors import InvalidArgument

#: the multi-token kernels `KernelConfig.prefill_kernel` names
PREFILL_KERNELS = ("auto", "mma", "wgmma")


@dataclass(frozen=True)
class KernelConfig:
    """Tuning knobs of the attention and block-copy kernels. ``None``: the planner chooses."""

    #: K/V rows per lane group and iteration in the CUDA-core decode (paged_decode.cu's CH)
    decode_rows: int = 4
    #: cp.async stages per warp in paged_decode_tc.cu; None: as many as fit (2 to 4)
    decode_stages: int | None = None
    #: L2 prefetch-size hint (0: none, 128 or 256 bytes) on paged_decode_tc.cu's copies
    decode_l2_prefetch: int = 128
    #: an L2 evict-first policy on paged_decode_tc.cu's copies (CP_EVICT_FIRST: K/V read once;
    #: H200, 2026-11-30: 0.2-1.1% faster on the four long decode shapes, two runs)
    decode_l2_evict_first: bool = True
    #: kv heads per paged_decode_tc.cu CTA (cut to a divisor of the kv heads that fits); None: per step
    decode_heads_per_cta: int | None = None
    #: warps per kv head in paged_decode_tc.cu; None: 4 with one head per CTA, else 1
    decode_warps_per_head: int | None = None
    #: contexts up to this long (with CTAs to spare) get 4 kv heads per CTA, one warp each
    decode_short_context: int = 512
    #: on compute capability 9.0 and later, a split decode's merge is launched programmatically
    #: (`kvpager.launch.Launch`): it starts while the decode kernel runs and waits there for its
    #: partials, so no launch gap separates the two
    decode_merge_pdl: bool = True
    #: a split decode of at most this many splits (16-bit or FP8 pool on tensor cores, no cascade,
    #: no attention sinks) merges its partials in the kernel: the last of an item's split CTAs for
    #: a kv head to finish merges them (a count per CTA column says which), and no merge launch
    #: follows; 0: always the merge launch (H200, two runs: 16 x 16,384 in 4 splits 1.0-1.4 us
    #: faster, 8 x 8,192 in 8 0.5-1.0; 1 x 131,072 in 33 1.6-2.0 us slower, 4 x 32,768 in 16 1.8-3.0)
    decode_merge_fused_splits: int = 8
    #: 16-row m-tiles per warp in paged_prefill.cu and cascade_prefix.cu; None: 2 up to head dim 128, else 1
    prefill_mt: int | None = None
    #: query heads of a kv head's GQA group that one multi-token tile holds (the kernels' HCH; cut
    #: to the group and the tile's rows); None: the whole group up to 16 heads, a larger group in
    #: the chunks that waste the fewest rows (`kvpager.backends.prefill_work.head_chunk`)
    prefill_head_chunk: int | None = None
    #: the multi-token kernel: "mma" (paged_prefill.cu, every GPU), "wgmma" (paged_prefill_sm90.cu:
    #: compute capability 9.0, 16-bit pools, head dims 64 / 128 / 256; else UnsupportedConfiguration),
    #: "auto" (wgmma where it applies, else mma); the cascade's shared part follows it
    #: (cascade_prefix_sm90.cu with the wgmma knobs below, else cascade_prefix.cu)
    prefill_kernel: str = "auto"
    #: warpgroups (64 query rows each) per paged_prefill_sm90.cu CTA; None: 2
    prefill_wgmma_warpgroups: int | None = None
    #: K/V positions per paged_prefill_sm90.cu tile; None: 128 at head dim 64 and with the
    #: producer at 128 (without overlap), else 64
    prefill_wgmma_bn: int | None = None
    #: cp.async stages of paged_prefill_sm90.cu; None: 3, but 2 for 128-position tiles without
    #: overlap other than the producer's at head dim 128
    prefill_wgmma_stages: int | None = None
    #: paged_prefill_sm90.cu issues S of the next K/V tile before this tile's softmax (OVERLAP;
    #: with the producer, FlashAttention-3's loop: S of a tile issued with P V of the one before)
    prefill_wgmma_overlap: bool = False
    #: paged_prefill_sm90.cu with a producer warpgroup doing the copies (WS; 2 MMA warpgroups);
    #: None: with 2 MMA warpgroups and no overlap (8 x 1,024 on 4,096 on an H200, 2026-11-30:
    #: 372 TFLOP/s with 128-position tiles; 369 with FlashAttention-3's loop; 286 without the
    #: producer, 297 with overlap alone)
    prefill_wgmma_producer: bool | None = None
    #: with the producer and overlap: the two MMA warpgroups take turns at issuing their MMAs
    #: (FlashAttention-3's ping-pong; PINGPONG)
    prefill_wgmma_pingpong: bool = True
    #: with the producer: K/V tiles whose every position is visible come by TMA, one box per
    #: block (`kvpager.backends.cupy_tma`; TMA), where the pool allows it; else all by cp.async
    prefill_wgmma_tma: bool = True
    #: with the producer and no overlap: a persistent grid (PERSIST), about one CTA an SM
    #: walking the step's (query tile, kv head) items longest first, each item's Q and K/V
    #: copies running under the last tiles of the one before
    prefill_wgmma_persistent: bool = True
    #: CTAs of that persistent grid (at most the device's SM count: the kernel fits one an SM);
    #: None: the SM count
    prefill_wgmma_ctas: int | None = None
    #: in a captured CUDA graph, a decode cascade's own parts and shared part run side by
    #: side (the graph forks and joins; `kvpager.launch.ForkJoin`), else one after the other
    decode_cascade_fork: bool = True
    #: 16-byte vectors in flight per thread in block_copy.cu (its UNROLL)
    copy_unroll: int = 16
    #: merges of at most this many partial slots a row run a warp per row (merge_splits_warp:
    #: a decode cascade's parts, a few splits), over at least `merge_warp_min_rows` rows;
    #: others a CTA per row (merge_splits); 0: always a CTA per row (H200: 1.04-1.26x on
    #: captured decode cascades at 8, `bench_cascade.py --captured`; docs/gpu-notes.md v15)
    merge_warp_max_parts: int = 8
    #: fewer rows than this merge a CTA per row (a long context split many ways)
    merge_warp_min_rows: int = 256

    def __post_init__(self) -> None:
        _int_in(self, "decode_rows", (1, 2, 4, 8))
        _int_in(self, "decode_stages", range(2, 9), optional=True)
        _int_in(self, "decode_l2_prefetch", (0, 128, 256))
        _int_in(self, "decode_heads_per_cta", range(1, 17), optional=True)
        _int_in(self, "decode_warps_per_head", range(1, 17), optional=True)
        _int_in(self, "decode_short_context", range(0, 2**31))
        _int_in(self, "prefill_mt", (1, 2), optional=True)
        _int_in(self, "prefill_head_chunk", range(1, 2**16), optional=True)
        if self.prefill_kernel not in PREFILL_KERNELS:
            raise InvalidArgument(f"KernelConfig.prefill_kernel must be one of {PREFILL_KERNELS}, "
                                  f"got {self.prefill_kernel!r}")
        _int_in(self, "prefill_wgmma_warpgroups", (1, 2), optional=True)
        _int_in(self, "prefill_wgmma_bn", (64, 128), optional=True)
        _int_in(self, "prefill_wgmma_stages", range(2, 5), optional=True)
        _int_in(self, "prefill_wgmma_ctas", range(1, 2**16), optional=True)
        for name in ("prefill_wgmma_overlap", "prefill_wgmma_producer", "prefill_wgmma_pingpong",
                     "prefill_wgmma_tma", "prefill_wgmma_persistent", "decode_cascade_fork",
                     "decode_l2_evict_first", "decode_merge_pdl"):
            value = getattr(self, name)
            if type(value) is not bool and not (value is None and name == "prefill_wgmma_producer"):
                raise InvalidArgument(f"KernelConfig.{name} must be a bool"
                                      f"{' or None' if name == 'prefill_wgmma_producer' else ''}, got {value!r}")
        _int_in(self, "copy_unroll", (1, 2, 4, 8, 16, 32))
        _int_in(self, "merge_warp_max_parts", range(0, 1025))
        _int_in(self, "decode_merge_fused_splits", range(0, 1025))
        _int_in(self, "merge_warp_min_rows", range(0, 2**31))

    def replace(self, **changes: Any) -> KernelConfig:
        """A copy with ``changes`` (validated; an unknown knob is an InvalidArgument)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise InvalidArgument(f"unknown kernel knob(s) {unknown}; KernelConfig has {sorted(names)}")
        return KernelConfig(**{**{n: getattr(self, n) for n in names}, **changes})


def _int_in(config: KernelConfig, name: str, allowed: Any, optional: bool = False) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    if type(value) is not int or value not in allowed:
        shown = f"[{allowed.start}, {allowed.stop - 1}]" if isinstance(allowed, range) else f"one of {allowed}"
        raise InvalidArgument(f"KernelConfig.{name} must be an int {shown}"
                              f"{' or None' if optional else ''}, got {value!r}")


#: The production configuration.
DEFAULT = KernelConfig()


def check_config(config: Any) -> KernelConfig:
    """``config``, or `DEFAULT` for None; InvalidArgument for anything but a `KernelConfig`."""
    if config is None:
        return DEFAULT
    if not isinstance(config, KernelConfig):
        raise InvalidArgument(f"config must be a kvpager.KernelConfig, got {type(config).__name__}")
    return config
