"""The wire protocol between `Client` and the daemon, in one place.

See docs/protocol.md for the authoritative description. In short: every
message is one msgpack value in one ZeroMQ frame.

- request: ``[version, id, session, op, args]``
- reply:   ``[id, 0, result]`` or ``[id, 1, {"code", "message", "details"}]``

NumPy arrays travel as msgpack ExtType ``EXT_NDARRAY`` (dtype, shape, raw
bytes), never as lists of ints: slot arrays are the hot path. K/V and query
tensors never travel in messages; they go through shared memory.

The op table is `kvpager.protocol_ops`, the codec (msgpack, arrays, the
transport's size cap) `kvpager.protocol_codec`, the results' encoding
`kvpager.protocol_results`; every name of theirs is importable from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvpager.errors import (
    ERRORS_BY_CODE,
    InvalidArgument,
    KVPagerError,
    MessageTooLarge,
    ProtocolError,
    UnknownOp,
    VersionMismatch,
)
from kvpager.protocol_codec import (  # noqa: F401 (re-exported)
    EXT_NDARRAY,
    TRANSPORT_SLACK,
    pack,
    pack_array,
    peek_id,
    unpack,
    unpack_array,
)
from kvpager.protocol_ops import (  # noqa: F401 (re-exported)
    BATCH_MAX_OPS,
    BATCH_OPS,
    ERROR_CODES,
    KEPT_REPLIES,
    OP_ARGS,
    OPS,
    PINS_PAGE,
    PINS_PAGE_BLOCKS,
    RETRIED_OPS,
    SEQUENCES_PAGE,
    Op,
)
from kvpager.protocol_results import (  # noqa: F401 (re-exported)
    decode_allocations,
    decode_blocks,
    decode_info,
    decode_pin,
    decode_probes,
    decode_remote_stats,
    decode_session,
    decode_slots,
    decode_stats,
    decode_tables,
    encode_allocations,
    encode_blocks,
    encode_info,
    encode_infos,
    encode_pin,
    encode_probes,
    encode_slots,
    encode_stats,
)

#: Bumped on any incompatible change of a message; both sides must agree.
#: Compatible additions keep it (a new op or optional argument, a reply that
#: now carries what an older client ignores): see "Changes" in docs/protocol.md.
VERSION = 1

OK, ERR = 0, 1


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


#: Characters an error reply's message (and each text detail) keeps: one that quotes a
#: client's huge value is cut to this, its length said.
MAX_ERROR_TEXT = 4096


def _cut(text: str) -> str:
    """``text`` cut to `MAX_ERROR_TEXT` characters and its length said (a text cut
    already, by the daemon, is left as it is where a client decodes it)."""
    if len(text) <= MAX_ERROR_TEXT + 64:
        return text
    return f"{text[:MAX_ERROR_TEXT]}... ({len(text)} characters in all)"


@dataclass(frozen=True)
class ErrorInfo:
    """The error half of a reply: a stable code, a message, optional details."""

    code: str
    message: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # A message that quotes a client's value (a 3M-item list: 9 MB) is cut: a reply
        # is never much bigger than the errors it reports.
        if len(self.message) > MAX_ERROR_TEXT + 64:
            object.__setattr__(self, "message", _cut(self.message))
        if any(type(v) is str and len(v) > MAX_ERROR_TEXT + 64 for v in self.details.values()):
            object.__setattr__(self, "details", {k: _cut(v) if type(v) is str else v for k, v in self.details.items()})

    @classmethod
    def from_exception(cls, e: KVPagerError) -> ErrorInfo:
        """The error's scalar attributes (and lists of ints: a retry's ``created``
        ids) as its details; an int msgpack cannot carry (past uint64, below
        int64: a limit's count of a client's huge value) as its text."""
        details = {
            k: str(v) if type(v) is int and not -(1 << 63) <= v < 1 << 64 else v
            for k, v in vars(e).items()
            if k != "request_id" and (isinstance(v, (int, float, str, bool, type(None)))
                                      or type(v) is list and all(type(x) is int for x in v))
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


def decode_bounds(max_ids: int, max_tokens: int) -> tuple[int, int]:
    """What decoding a request may build under the daemon's limits of ``max_ids``
    sequence ids and ``max_tokens`` token ids a request: arrays and maps (a list per
    sequence at most, twice over, and room for a batch's maps), and the longest
    array (a list of ids or tokens, or of slots)."""
    return 2 * max_ids + 4096, max(max_ids, max_tokens, 1 << 21)


def decode_request(data: bytes, limit: int, max_ids: int | None = None, max_tokens: int = 0) -> Request:
    """Parse and check a request envelope; raises a ProtocolError subclass
    (with ``request_id`` set when the id could be read) if it is bad.
    ``max_ids`` / ``max_tokens``: the daemon's per-request limits, which bound
    what decoding may build (`decode_bounds`)."""
    if len(data) > limit:
        err = MessageTooLarge(f"message of {len(data)} bytes is over the limit of {limit} (KVPAGER_MAX_MESSAGE)")
        err.request_id = peek_id(data)
        raise err
    msg = unpack(data, *decode_bounds(max_ids, max_tokens)) if max_ids is not None else unpack(data)
    if not isinstance(msg, list) or len(msg) != 5:
        raise ProtocolError("a request is a msgpack array [version, id, session, op, args]")
    version, rid, session, op, args = msg
    bad = None
    if not isinstance(rid, int) or isinstance(rid, bool):
        bad, rid = f"request id must be an integer, got {type(rid).__name__}", None
    elif type(version) is not int or version != VERSION:  # (True and 1.0 equal 1 in Python)
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
    sets = OP_ARGS.get(op)
    if sets is None:
        err = UnknownOp(f"unknown op {op!r}; ops are {', '.join(OPS)}")
        err.request_id = rid
        raise err
    try:
        check_args(op, args)
    except InvalidArgument as err:
        err.request_id = rid
        err.op = op  # (a known op: its request metrics name it)
        raise
    return Request(rid, op, args, session, version)


def check_args(op: str, args: dict[Any, Any]) -> None:
    """InvalidArgument unless ``args`` has every required argument name of the known
    ``op`` and no name it does not take."""
    sets = OP_ARGS[op]
    keys = args.keys()
    if not (keys <= sets[0] and sets[1] <= keys):  # non-string keys fail the first test
        spec = OPS[op]
        raise InvalidArgument(
            f"{op}: arguments {sorted(map(str, keys))} do not match required {list(spec.required)}, "
            f"optional {list(spec.optional)}"
        )


def encode_batch(results: list[Any], error: ErrorInfo | None) -> dict[str, Any]:
    """A `batch` reply's result: the results of the ops that ran, and the error of
    the one that stopped it (its ``details`` hold its ``index``), or nil."""
    err = None if error is None else {"code": error.code, "message": error.message, "details": error.details}
    return {"results": results, "error": err}


def decode_batch(result: Any) -> tuple[list[Any], ErrorInfo | None]:
    """(results of the ops that ran, the error that stopped the batch or None)."""
    if not isinstance(result, dict) or not isinstance(result.get("results"), list):
        raise ProtocolError("a batch reply is a map with a list of results")
    err = result.get("error")
    if err is None:
        return result["results"], None
    if not isinstance(err, dict) or not isinstance(err.get("code"), str):
        raise ProtocolError("a batch's error is a map with a string code")
    return result["results"], ErrorInfo(err["code"], str(err.get("message", "")), err.get("details") or {})


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


__all__ = [
    "ERR",
    "ERROR_CODES",
    "EXT_NDARRAY",
    "OK",
    "BATCH_MAX_OPS",
    "BATCH_OPS",
    "OPS",
    "RETRIED_OPS",
    "VERSION",
    "ErrorInfo",
    "Op",
    "Reply",
    "Request",
    "check_args",
    "decode_batch",
    "decode_reply",
    "decode_request",
    "encode_batch",
    "pack",
    "unpack",
]
