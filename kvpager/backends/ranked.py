"""Tensor parallelism: one pool's K/V split by KV heads over the GPUs of a host.

A pool of ``R`` ranks has one allocator, one block table per sequence and one
prefix cache; each rank's storage holds ``num_kv_heads / R`` of the heads
(rank r: heads ``[r*H/R, (r+1)*H/R)``) for every block, with the same block
ids and layout as a one-rank pool of those heads. `RankedBackend` fans the
whole-block operations (copy-on-write, swap, the remote tier's block copies,
synchronize, close) out to every rank's backend; the per-layer ones (write,
attend, step plans) belong to one rank and go through `KVPool.rank`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kvpager.backends.base import Backend
from kvpager.errors import InvalidArgument
from kvpager.spec import PoolSpec


def rank_spec(spec: PoolSpec, ranks: int, rank: int = 0) -> PoolSpec:
    """The geometry of rank ``rank``'s storage: ``num_kv_heads / ranks`` heads (an
    FP8 pool's: with those heads' scales; every rank's geometry is the same)."""
    if not isinstance(ranks, (int, np.integer)) or isinstance(ranks, bool) or ranks < 1:
        raise InvalidArgument(f"ranks must be a positive integer, got {ranks!r}")
    if spec.num_kv_heads % ranks:
        raise InvalidArgument(
            f"num_kv_heads={spec.num_kv_heads} cannot be split over {ranks} ranks: each rank holds "
            f"num_kv_heads / ranks heads (use a number of devices that divides {spec.num_kv_heads})")
    if ranks == 1:
        return spec
    h = spec.num_kv_heads // int(ranks)
    scales = None if spec.kv_scales is None else spec.scales[:, :, rank * h : (rank + 1) * h]
    return spec.replace(num_kv_heads=h, kv_scales=scales)


def check_devices(devices: Any) -> list[str]:
    """A list of one device per rank: all ``cpu`` (ranks in host memory: tests, CI)
    or all distinct ``cuda:N``; InvalidArgument naming what is wrong otherwise."""
    from kvpager.backends import parse_device

    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",")]
    if not isinstance(devices, (list, tuple)) or not devices:
        raise InvalidArgument(f"devices must be a non-empty list of devices, got {devices!r}")
    parsed = [parse_device(d) for d in devices]
    kinds = {kind for kind, _ in parsed}
    if len(kinds) > 1:
        raise InvalidArgument(f"devices must all be 'cpu' or all 'cuda:N', got {list(devices)}")
    if kinds == {"cuda"}:
        seen: set[int] = set()
        for (_, index), name in zip(parsed, devices):
            if index in seen:
                raise InvalidArgument(f"device {name!r} appears twice in {list(devices)}: one rank per GPU")
            seen.add(index)
        return [f"cuda:{index}" for _, index in parsed]
    return ["cpu"] * len(parsed)


class RankedBackend(Backend):
    """The storage of a pool of several ranks: one backend per rank, each of
    `rank_spec` geometry. ``spec`` is the whole pool's (all heads)."""

    def __init__(self, spec: PoolSpec, ranks: Sequence[Backend]):
        super().__init__(spec)
        if len(ranks) < 2:
            raise InvalidArgument("a RankedBackend has at least two ranks (one rank is its own backend)")
        per = rank_spec(spec, len(ranks))
        for r, b in enumerate(ranks):
            if b.spec != rank_spec(spec, len(ranks), r):
                raise InvalidArgument(f"rank {r}'s backend has geometry {b.spec}, expected "
                                      f"{rank_spec(spec, len(ranks), r)}")
        self.ranks: list[Backend] = list(ranks)
        for b in self.ranks:  # one count of changes: the pool's sequences are every rank's
            b.__dict__["_moves"] = self.moves
        self.rank_spec = per
        self.name = ranks[0].name
        self.xp = ranks[0].xp

    @property
    def device(self) -> str:
        return self.ranks[0].device

    @property
    def devices(self) -> list[str]:
        return [b.device for b in self.ranks]

    # -- whole blocks: every rank -------------------------------------------------
    def copy_blocks(self, pairs: np.ndarray) -> None:
        for b in self.ranks:
            b.copy_blocks(pairs)

    def swap_out(self, pairs: np.ndarray) -> None:
        for b in self.ranks:
            b.swap_out(pairs)

    def swap_in(self, pairs: np.ndarray) -> None:
        for b in self.ranks:
            b.swap_in(pairs)

    def read_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        """A block's bytes are its ranks' bytes back to back (rank-major)."""
        per = self.rank_spec.bytes_per_block
        for r, b in enumerate(self.ranks):
            b.read_blocks(blocks, out[:, r * per : (r + 1) * per])

    def write_blocks(self, blocks: np.ndarray, payloads: Sequence[Any]) -> None:
        per = self.rank_spec.bytes_per_block
        views = [memoryview(p).cast("B") for p in payloads]
        for r, b in enumerate(self.ranks):
            b.write_blocks(blocks, [v[r * per : (r + 1) * per] for v in views])

    def synchronize(self) -> None:
        for b in self.ranks:
            b.synchronize()

    def close(self) -> None:
        self.closed = True
        self.moves.bump()
        failed: BaseException | None = None
        for b in self.ranks:  # every rank's memory is released, whichever fails
            try:
                b.close()
            except BaseException as e:
                failed = failed or e
        if failed is not None:
            raise failed

    # -- per layer: one rank's ----------------------------------------------------
    def _per_rank(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"{what}: this pool has {len(self.ranks)} ranks, each holding "
                               f"{self.rank_spec.num_kv_heads} of {self.spec.num_kv_heads} kv heads: "
                               f"{what} through pool.rank(r)")

    def write(self, layer: int, slots: np.ndarray, k: Any, v: Any) -> None:
        raise self._per_rank("write")

    def attend(self, layer: int, q: Any, block_tables: np.ndarray, seq_lens: np.ndarray,
               query_lens: np.ndarray, scale: float, **kw: Any) -> Any:
        raise self._per_rank("attend")

    def plan(self, tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray,
             slots: np.ndarray | None, **options: Any) -> Any:
        raise self._per_rank("plan")

    def device_array(self) -> Any:
        raise self._per_rank("device_array")

    def host_array(self) -> Any:
        raise self._per_rank("host_array")


def make_ranked_backend(spec: PoolSpec, devices: Sequence[str],
                        make: Callable[[PoolSpec, str, int], Backend] | None = None) -> Backend:
    """The backend of a pool over ``devices`` (checked: `check_devices`): one
    device's own backend, or a `RankedBackend`. ``make(rank_spec, device, rank)``
    builds one rank's backend (default `make_backend`); ranks built before a
    failure are closed."""
    from kvpager.backends import make_backend

    devices = check_devices(devices)
    make = make or (lambda s, d, r: make_backend(s, d))
    built: list[Backend] = []
    try:
        for r, d in enumerate(devices):
            built.append(make(rank_spec(spec, len(devices), r), d, r))
        return built[0] if len(built) == 1 else RankedBackend(spec, built)
    except BaseException:
        for b in built:
            b.close()
        raise
