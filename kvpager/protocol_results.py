"""The results of ops on the wire: `KVPool`'s result types to msgpack values
and back (a newer daemon's extra fields are dropped by an older client)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from kvpager.errors import ProtocolError
from kvpager.protocol_codec import pack_rows
from kvpager.seq_check import InfoColumns
from kvpager.types import (
    Allocation,
    BlockMap,
    CacheProbe,
    PinInfo,
    PoolStats,
    RemoteStats,
    SequenceInfo,
    SessionInfo,
    TenantUsage,
)

_F = TypeVar("_F", bound=Callable[..., Any])


def _reply(what: str) -> Callable[[_F], _F]:
    """A decoder of ``what`` replies: a reply of another shape (a program that is no
    kvpager daemon, or a hostile one, answering well-formed msgpack) raises
    `ProtocolError`, not the TypeError or KeyError of the value it trips on."""

    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def decode(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ProtocolError:
                raise
            except (TypeError, KeyError, AttributeError, ValueError, IndexError, OverflowError) as e:
                raise ProtocolError(f"the reply is no kvpager {what}: {type(e).__name__}: {e}") from None

        return decode  # type: ignore[return-value]

    return wrap


def encode_allocations(allocs: list[Allocation], remote_tokens: bool = False) -> list[list[Any]]:
    """``[seq_id, block_table, num_cached_tokens, slots]`` per allocation, and
    ``num_remote_tokens`` fifth when the request asked for it (``remote_tokens``:
    a client that predates it unpacks four)."""
    if remote_tokens:
        return [[a.seq_id, np.asarray(a.block_table, np.int32), a.num_cached_tokens, a.slots,
                 a.num_remote_tokens] for a in allocs]
    return [[a.seq_id, np.asarray(a.block_table, np.int32), a.num_cached_tokens, a.slots] for a in allocs]


@_reply("allocations")
def decode_allocations(raw: list[list[Any]]) -> list[Allocation]:
    return [Allocation(int(a[0]), tuple(a[1].tolist()), int(a[2]), a[3], int(a[4]) if len(a) > 4 else 0)
            for a in raw]


def encode_probes(probes: list[CacheProbe], remote_tokens: bool = False) -> list[Any]:
    """``cached_tokens``' result: tokens per prompt, or ``[num_cached_tokens,
    num_remote_tokens]`` per prompt when the request asked (``remote_tokens``:
    a client that predates it reads a list of ints)."""
    if remote_tokens:
        return [[p.num_cached_tokens, p.num_remote_tokens] for p in probes]
    return [p.num_cached_tokens for p in probes]


@_reply("cache probes")
def decode_probes(raw: list[Any]) -> list[CacheProbe]:
    """Either form of ``cached_tokens``' result (ints from a daemon that
    predates ``remote_tokens`` or without a tier: nothing remote)."""
    return [CacheProbe(int(p[0]), int(p[1])) if isinstance(p, (list, tuple)) else CacheProbe(int(p)) for p in raw]


def encode_slots(flat: np.ndarray) -> bytes:
    """append's result, the hot path: every sequence's slots back to back
    (`KVPool.append_flat`) as raw int64 little-endian bytes (msgpack bin).
    The client knows the counts."""
    return flat.astype("<i8", copy=False).tobytes()


def decode_slots(raw: bytes, num_seqs: int, num_tokens: Any) -> list[np.ndarray]:
    """Split append's result back into one int64 array per sequence."""
    if not isinstance(raw, bytes) or len(raw) % 8:
        raise ProtocolError("append's result must be int64 bytes")
    flat = np.frombuffer(raw, "<i8")
    if num_seqs == 1:
        return [flat]
    if isinstance(num_tokens, (int, np.integer)):
        return list(flat.reshape(num_seqs, int(num_tokens)))
    return np.split(flat, np.cumsum(np.asarray(num_tokens, np.int64))[:-1])


def decode_tables(raw: Any) -> tuple[np.ndarray, np.ndarray]:
    """The result of `tables` (and of `swap_in`): padded int32 block tables
    [B, max_blocks] and lengths [B]."""
    if not (isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, np.ndarray) for x in raw)):
        raise ProtocolError("block tables must be [block_tables, seq_lens] arrays")
    tables, lens = raw
    if tables.ndim != 2 or lens.ndim != 1 or len(tables) != len(lens):
        raise ProtocolError(f"block tables of shape {tables.shape} do not match lengths of shape {lens.shape}")
    return tables, lens


def encode_info(info: SequenceInfo) -> dict[str, Any]:
    d = {name: getattr(info, name) for name in field_names(SequenceInfo)}
    d["block_table"] = np.asarray(info.block_table, np.int64)
    return d


def encode_infos(c: InfoColumns, pids: list[int | None]) -> list[dict[str, Any]]:
    """The `SequenceInfo`s of columns ``c`` (`kvpager.seq_check.info_columns`) as
    `encode_info` gives them, each with ``owner_pid`` (``pids``), made from the
    columns (a page of 4,096 made as `SequenceInfo`s, then maps, then packed one
    table at a time held the daemon's loop 90 ms of 100k sequences' 3.6 s)."""
    tables = pack_rows(c.tables, c.num_blocks)
    return [{"seq_id": s, "owner": o, "num_tokens": nt, "num_committed": nc, "block_table": t,
             "shared_blocks": sh, "swapped": sw, "host_blocks": hb, "owner_pid": pid}
            for s, o, nt, nc, t, sh, sw, hb, pid in zip(c.seq_ids, c.owners, c.num_tokens, c.num_committed, tables,
                                                        c.shared_blocks, c.swapped, c.host_blocks, pids)]


@_reply("sequence info")
def decode_info(d: dict[str, Any]) -> SequenceInfo:
    d = _known_fields(SequenceInfo, d)
    d["block_table"] = tuple(np.asarray(d["block_table"]).tolist())
    return SequenceInfo(**d)


def encode_stats(stats: PoolStats) -> dict[str, Any]:
    d = {name: getattr(stats, name) for name in field_names(PoolStats)}
    d["tenants"] = [dataclasses.asdict(t) for t in stats.tenants]
    return d


@_reply("pool stats")
def decode_stats(d: dict[str, Any]) -> PoolStats:
    d = _known_fields(PoolStats, d)
    d["tenants"] = tuple(TenantUsage(**_known_fields(TenantUsage, t)) for t in d.get("tenants", ()))
    return PoolStats(**d)


def encode_pin(pin: PinInfo) -> dict[str, Any]:
    d = dataclasses.asdict(pin)
    d["block_table"] = np.asarray(pin.block_table, np.int64)
    return d


@_reply("pin")
def decode_pin(d: dict[str, Any]) -> PinInfo:
    d = _known_fields(PinInfo, d)
    d["block_table"] = tuple(np.asarray(d["block_table"]).tolist())
    return PinInfo(**d)


@_reply("session info")
def decode_session(d: dict[str, Any]) -> SessionInfo:
    return SessionInfo(**_known_fields(SessionInfo, d))


@_reply("remote tier stats")
def decode_remote_stats(d: dict[str, Any]) -> RemoteStats:
    return RemoteStats(**_known_fields(RemoteStats, d))


def encode_blocks(bm: BlockMap) -> list[np.ndarray]:
    return [bm.state, bm.ref_cnt, bm.cached]


@_reply("block map")
def decode_blocks(raw: list[np.ndarray]) -> BlockMap:
    if not (isinstance(raw, list) and len(raw) == 3 and all(isinstance(x, np.ndarray) and x.ndim == 1 for x in raw)
            and len({len(x) for x in raw}) == 1):
        raise ProtocolError("the reply is no kvpager block map: [state, ref_cnt, cached] arrays of one length")
    return BlockMap(*raw)


def _known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """A newer daemon may send more fields than this client knows: drop them."""
    if not isinstance(d, dict):
        raise TypeError(f"a map of {cls.__name__}'s fields, got {type(d).__name__}")
    names = field_names(cls)
    return {k: v for k, v in d.items() if k in names}


@functools.cache
def field_names(cls: type) -> frozenset[str]:
    """A dataclass's field names, read once (`dataclasses.fields` took most of a
    sequence's decoding: ~15 of 24 us, 2.4 s of `kvpager seqs` at 100,000)."""
    return frozenset(f.name for f in dataclasses.fields(cls))
