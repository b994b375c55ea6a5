"""The wire protocol between `Client` and the daemon, in one place.

See docs/protocol.md for the authoritative description. In short: every
message is one msgpack value in one ZeroMQ frame.

- request: ``[version, id, session, op, args]``
- reply:   ``[id, 0, result]`` or ``[id, 1, {"code", "message", "details"}]``

NumPy arrays travel as msgpack ExtType ``EXT_NDARRAY`` (dtype, shape, raw
bytes), never as lists of ints: slot arrays are the hot path. K/V and query
tensors never travel in messages; they go through shared memory.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import numpy as np

from kvpager.errors import (
    ERRORS_BY_CODE,
    InvalidArgument,
    KVPagerError,
    MessageTooLarge,
    ProtocolError,
    UnknownOp,
    VersionMismatch,
)
from kvpager.types import (
    Allocation,
    BlockMap,
    PinInfo,
    PoolStats,
    RemoteStats,
    SequenceInfo,
    SessionInfo,
    TenantUsage,
)

#: Bumped on any incompatible change of a message; both sides must agree.
#: Compatible additions keep it (a new op or optional argument, a reply that
#: now carries what an older client ignores): see "Changes" in docs/protocol.md.
VERSION = 1
#: msgpack ExtType code of a NumPy array: see `pack_array`.
EXT_NDARRAY = 1
#: Hard cap handed to ZeroMQ (MAXMSGSIZE): a bigger message drops the
#: connection instead of being buffered; between the limit and this cap the
#: daemon still answers with a typed `message_too_large` error.
TRANSPORT_SLACK = 1 << 20

OK, ERR = 0, 1

# Error codes, for reference and for docs/protocol.md (the classes own them).
ERROR_CODES: tuple[str, ...] = tuple(ERRORS_BY_CODE)


@dataclass(frozen=True)
class Op:
    """One op: its argument names and whether it needs an open session."""

    name: str
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    session: bool = True

    @property
    def allowed(self) -> frozenset[str]:
        return frozenset(self.required + self.optional)


def _arg_sets(op: Op) -> tuple[frozenset[str], frozenset[str]]:
    return op.allowed, frozenset(op.required)


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("hello", (), ("client", "pid", "host", "token", "control_token", "rank"), session=False),
        Op("allocate", ("prompts",), ("salt", "share_in_batch", "remote_tokens")),
        Op("cached_tokens", ("prompts",), ("salt",), session=False),
        Op("append", ("seq_ids",), ("num_tokens", "token_ids")),
        Op("commit", ("seq_ids",), ("upto",)),
        Op("fork", ("seq_ids",), ("n",)),
        Op("free", ("seq_ids",)),
        Op("truncate", ("seq_ids", "lengths")),
        Op("swap_out", ("seq_ids",)),
        Op("swap_in", ("seq_ids",)),
        Op("release", ("seq_ids", "positions")),
        Op("staging", ("nbytes",)),
        Op("write", ("layer", "slots", "k", "v")),
        Op("attend", ("layer", "seq_ids", "q", "out"), ("query_lens", "scale", "window", "softcap")),
        Op("tables", ("seq_ids",), (), session=False),
        Op("sequences", (), ("seq_ids", "owner", "after", "limit"), session=False),
        Op("blocks", (), (), session=False),
        Op("stats", (), (), session=False),
        Op("check", (), (), session=False),
        Op("pin", ("prompts",), ("salt", "keep")),
        Op("unpin", ("prompts",), ("salt", "keep")),
        Op("pins", (), (), session=False),
        Op("set_quota", ("salt", "blocks")),
        Op("sessions", (), (), session=False),
        Op("heartbeat"),
        Op("bye"),
    )
}
#: Ops whose replies the daemon keeps per session by request id: a retry of
#: one (same id, same bytes) after a timeout gets the first execution's reply
#: instead of running again (see "Retries" in docs/protocol.md).
RETRIED_OPS = frozenset({"allocate", "append", "commit", "fork", "free", "truncate", "swap_out", "swap_in",
                         "pin", "unpin", "release"})
#: Most sequences one `sequences` request lists (a page; see docs/protocol.md).
SEQUENCES_PAGE = 4096
#: How many such replies the daemon keeps per session (a client has one request in flight).
KEPT_REPLIES = 4

# Per op: (allowed, required) argument names, precomputed for the hot path.
_ARGS = {name: _arg_sets(op) for name, op in OPS.items()}

# -- NumPy arrays as ExtType -------------------------------------------------------------
# Payload: u8 len(dtype.str), dtype.str, u8 ndim, ndim x u64 shape, raw C-order bytes.
# Decoding is on every reply's hot path (slot arrays): parsed dtypes are cached.
_ALLOWED_KINDS = frozenset("biuf")
_dtypes: dict[bytes, np.dtype] = {}
_shapes = [struct.Struct(f"<{n}Q") for n in range(33)]


def pack_array(a: np.ndarray) -> msgpack.ExtType:
    """A NumPy array as msgpack ExtType ``EXT_NDARRAY`` (see docs/protocol.md)."""
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    dt = a.dtype.str.encode()
    return msgpack.ExtType(EXT_NDARRAY, b"".join(
        (bytes((len(dt),)), dt, bytes((a.ndim,)), _shapes[a.ndim].pack(*a.shape), a.tobytes())))


def _dtype(key: bytes) -> np.dtype:
    dt = _dtypes.get(key)
    if dt is None:
        try:
            dt = np.dtype(key.decode())
        except Exception as e:
            raise ProtocolError(f"malformed array dtype {key!r}: {e}") from None
        if dt.kind not in _ALLOWED_KINDS or dt.hasobject:
            raise ProtocolError(f"array dtype {dt} is not allowed")
        if len(_dtypes) < 64:
            _dtypes[key] = dt
    return dt


def unpack_array(data: bytes) -> np.ndarray:
    """The (read-only) array a `pack_array` payload holds; ProtocolError if malformed."""
    try:
        dlen = data[0]
        dt = _dtype(data[1 : 1 + dlen])
        ndim = data[1 + dlen]
        off = 2 + dlen
        shape = _shapes[ndim].unpack_from(data, off)
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"malformed array: {type(e).__name__}: {e}") from None
    off += 8 * ndim
    count = math.prod(shape)
    if count * dt.itemsize != len(data) - off:
        raise ProtocolError(f"array of shape {shape} {dt} does not match its {len(data) - off} bytes")
    a = np.frombuffer(data, dt, count, off)
    return a if ndim == 1 else a.reshape(shape)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return pack_array(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot send a {type(obj).__name__} over the wire")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_NDARRAY:
        return unpack_array(data)
    raise ProtocolError(f"unknown msgpack ext type {code}")


# A Packer keeps its buffer between calls, so one per thread: a daemon in a
# thread and its clients in others (tests, in-process use) pack at once.
_packers = threading.local()


def pack(value: Any) -> bytes:
    """One msgpack message, NumPy arrays as ExtType."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(default=_default, use_bin_type=True, autoreset=True)
    try:
        return packer.pack(value)
    except TypeError as e:
        raise InvalidArgument(str(e)) from None


def unpack(data: bytes) -> Any:
    """Inverse of `pack`; ProtocolError if the bytes are not one msgpack value."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"not a msgpack message: {type(e).__name__}: {e}") from None


# -- envelopes ----------------------------------------------------------------------------
class Request(NamedTuple):
    """``[version, id, session, op, args]``. A NamedTuple: built once per request
    on the daemon's hot path, where a frozen dataclass costs a microsecond."""

    id: int
    op: str
    args: dict[str, Any] = {}  # noqa: RUF012 (never mutated)
    session: str | None = None
    version: int = VERSION

    def encode(self) -> bytes:
        return pack([self.version, self.id, self.session, self.op, self.args])


@dataclass(frozen=True)
class ErrorInfo:
    """The error half of a reply: a stable code, a message, optional details."""

    code: str
    message: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_exception(cls, e: KVPagerError) -> ErrorInfo:
        details = {
            k: v
            for k, v in vars(e).items()
            if k != "request_id" and isinstance(v, (int, float, str, bool, type(None)))
        }
        return cls(e.code, str(e), details)

    def exception(self) -> KVPagerError:
        """The same error class the daemon raised, with the same message and attributes."""
        cls = ERRORS_BY_CODE.get(self.code, KVPagerError)
        exc = cls.__new__(cls)
        Exception.__init__(exc, self.message)
        exc.__dict__.update(self.details)
        if cls is KVPagerError:
            exc.code = self.code  # an unknown code from a newer daemon: keep it visible
        return exc


@dataclass(frozen=True)
class Reply:
    """``[id, 0, result]`` or ``[id, 1, error]``; id is nil when the request had none."""

    id: int | None
    result: Any = None
    error: ErrorInfo | None = None

    def encode(self) -> bytes:
        return encode_reply(self.id, self.result, self.error)


def encode_reply(rid: int | None, result: Any = None, error: ErrorInfo | None = None) -> bytes:
    if error is None:
        return pack([rid, OK, result])
    return pack([rid, ERR, {"code": error.code, "message": error.message, "details": error.details}])


def decode_request(data: bytes, limit: int) -> Request:
    """Parse and check a request envelope; raises a ProtocolError subclass
    (with ``request_id`` set when the id could be read) if it is bad."""
    if len(data) > limit:
        err = MessageTooLarge(f"message of {len(data)} bytes is over the limit of {limit} (KVPAGER_MAX_MESSAGE)")
        err.request_id = peek_id(data)
        raise err
    msg = unpack(data)
    if not isinstance(msg, list) or len(msg) != 5:
        raise ProtocolError("a request is a msgpack array [version, id, session, op, args]")
    version, rid, session, op, args = msg
    bad = None
    if not isinstance(rid, int) or isinstance(rid, bool):
        bad, rid = f"request id must be an integer, got {type(rid).__name__}", None
    elif version != VERSION:
        err = VersionMismatch(f"protocol version {version!r} is not supported; the daemon speaks {VERSION}")
        err.request_id = rid
        raise err
    elif session is not None and not isinstance(session, str):
        bad = "session must be a string or nil"
    elif not isinstance(op, str):
        bad = "op must be a string"
    elif not isinstance(args, dict):
        bad = "args must be a map"
    if bad:
        err = ProtocolError(bad)
        err.request_id = rid
        raise err
    sets = _ARGS.get(op)
    if sets is None:
        err = UnknownOp(f"unknown op {op!r}; ops are {', '.join(OPS)}")
        err.request_id = rid
        raise err
    keys = args.keys()
    if not (keys <= sets[0] and sets[1] <= keys):  # non-string keys fail the first test
        spec = OPS[op]
        err = InvalidArgument(
            f"{op}: arguments {sorted(map(str, keys))} do not match required {list(spec.required)}, "
            f"optional {list(spec.optional)}"
        )
        err.request_id = rid
        raise err
    return Request(rid, op, args, session, version)


def peek_id(data: bytes) -> int | None:
    """The id of a request without decoding the rest of it (for oversized ones)."""
    try:
        up = msgpack.Unpacker(max_buffer_size=len(data) or 1)
        up.feed(data)
        if up.read_array_header() < 2:
            return None
        up.skip()
        rid = up.unpack()
        return rid if isinstance(rid, int) and not isinstance(rid, bool) else None
    except Exception:
        return None


def decode_reply(data: bytes) -> Reply:
    """Parse a reply; ProtocolError if it is not one."""
    msg = unpack(data)
    if not isinstance(msg, list) or len(msg) != 3 or msg[1] not in (OK, ERR):
        raise ProtocolError("a reply is a msgpack array [id, status, payload]")
    rid, status, payload = msg
    if status == OK:
        return Reply(rid, payload)
    if not isinstance(payload, dict) or not isinstance(payload.get("code"), str):
        raise ProtocolError("an error reply carries a map with a string code")
    return Reply(rid, None, ErrorInfo(payload["code"], str(payload.get("message", "")), payload.get("details") or {}))


# -- results ------------------------------------------------------------------------------
def encode_allocations(allocs: list[Allocation], remote_tokens: bool = False) -> list[list[Any]]:
    """``[seq_id, block_table, num_cached_tokens, slots]`` per allocation, and
    ``num_remote_tokens`` fifth when the request asked for it (``remote_tokens``:
    a client that predates it unpacks four)."""
    if remote_tokens:
        return [[a.seq_id, np.asarray(a.block_table, np.int32), a.num_cached_tokens, a.slots,
                 a.num_remote_tokens] for a in allocs]
    return [[a.seq_id, np.asarray(a.block_table, np.int32), a.num_cached_tokens, a.slots] for a in allocs]


def decode_allocations(raw: list[list[Any]]) -> list[Allocation]:
    return [Allocation(int(a[0]), tuple(a[1].tolist()), int(a[2]), a[3], int(a[4]) if len(a) > 4 else 0)
            for a in raw]


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
    d = {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}
    d["block_table"] = np.asarray(info.block_table, np.int64)
    return d


def decode_info(d: dict[str, Any]) -> SequenceInfo:
    d = _known_fields(SequenceInfo, d)
    d["block_table"] = tuple(np.asarray(d["block_table"]).tolist())
    return SequenceInfo(**d)


def encode_stats(stats: PoolStats) -> dict[str, Any]:
    d = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    d["tenants"] = [dataclasses.asdict(t) for t in stats.tenants]
    return d


def decode_stats(d: dict[str, Any]) -> PoolStats:
    d = _known_fields(PoolStats, d)
    d["tenants"] = tuple(TenantUsage(**_known_fields(TenantUsage, t)) for t in d.get("tenants", ()))
    return PoolStats(**d)


def encode_pin(pin: PinInfo) -> dict[str, Any]:
    d = dataclasses.asdict(pin)
    d["block_table"] = np.asarray(pin.block_table, np.int64)
    return d


def decode_pin(d: dict[str, Any]) -> PinInfo:
    d = _known_fields(PinInfo, d)
    d["block_table"] = tuple(np.asarray(d["block_table"]).tolist())
    return PinInfo(**d)


def decode_session(d: dict[str, Any]) -> SessionInfo:
    return SessionInfo(**_known_fields(SessionInfo, d))


def decode_remote_stats(d: dict[str, Any]) -> RemoteStats:
    return RemoteStats(**_known_fields(RemoteStats, d))


def encode_blocks(bm: BlockMap) -> list[np.ndarray]:
    return [bm.state, bm.ref_cnt, bm.cached]


def decode_blocks(raw: list[np.ndarray]) -> BlockMap:
    return BlockMap(*raw)


def _known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """A newer daemon may send more fields than this client knows: drop them."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


__all__ = [
    "ERR",
    "ERROR_CODES",
    "EXT_NDARRAY",
    "OK",
    "OPS",
    "RETRIED_OPS",
    "VERSION",
    "ErrorInfo",
    "Op",
    "Reply",
    "Request",
    "decode_reply",
    "decode_request",
    "pack",
    "unpack",
]
