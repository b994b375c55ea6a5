"""The daemon's request dispatch: one request in, one reply out. A request is
decoded and checked (envelope, session or token, per-request limits; a repeat
of a decode step's request is found by its bytes instead: `kvpager.request_memo`),
its handler (`kvpager.server_ops`) runs, a GPU pool's work is waited for where a
reply must not race it, and any error becomes a typed error reply. Replies of
`RETRIED_OPS` are kept per session, so a retry with the same id and bytes
gets the first execution's reply instead of running twice. A `batch` runs
several sequence ops of a step in one request (`Dispatch._op_batch`)."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager.errors import (
    ERRORS_BY_CODE,
    InternalError,
    InvalidArgument,
    KVPagerError,
    LimitExceeded,
    Unauthorized,
)
from kvpager.protocol import (
    BATCH_MAX_OPS,
    BATCH_OPS,
    KEPT_REPLIES,
    OPS,
    RETRIED_OPS,
    ErrorInfo,
    check_args,
    decode_request,
    encode_batch,
    encode_reply,
    unpack,
)
from kvpager.request_memo import MEMO_OPS, split_id
from kvpager.validate import all_type

if TYPE_CHECKING:
    from kvpager.sessions import Session

log = logging.getLogger("kvpager.server")

#: Ops that may launch work on a GPU pool (copy-on-write, swaps, remote write and
#: attend): their reply waits for it, so a block id handed out is never mid-copy
#: and a staging buffer is never read or rewritten while in use.
_DEVICE_OPS = frozenset({"append", "swap_out", "swap_in", "write", "attend", "batch"})
#: A retried request of up to this many bytes is matched by its bytes, kept beside its
#: reply (at most KEPT_REPLIES x 8 KiB a session); a longer one by a 128-bit BLAKE2b
#: digest. A decode step's request (2 KiB for 256 packed ids) is not hashed: the
#: digest took 5 us of a 37 us append on a 2-core VM.
_MATCH_BYTES = 8192


#: Arguments that are lists with an entry per sequence (or per prompt): each within the ids limit.
_ID_LISTS = frozenset({"seq_ids", "prompts", "lengths", "upto", "token_ids", "query_lens", "salt", "positions"})


def _sized(v: Any) -> bool:
    """A list or an array with a length (a 0-d array is a scalar)."""
    return isinstance(v, list) or isinstance(v, np.ndarray) and v.ndim > 0


def _kept_bytes(entry: tuple[bytes, bytes | None, list[int] | None]) -> int:
    """What a kept entry counts against the session's kept bytes: its reply, or
    8 bytes an id it created (a reply too large to keep)."""
    _, reply, created = entry
    return len(reply) if reply is not None else 8 * len(created or ())


def created_ids(op: str, reply: bytes) -> list[int] | None:
    """The sequence ids an ``op`` (allocate or fork) reply made: an allocation's
    first field, a fork's children; None for an error reply."""
    _, status, result = unpack(reply)
    if status != 0:
        return None
    if op == "allocate":
        return [int(a[0]) for a in result]
    return [int(c) for kids in result for c in kids]


class Dispatch:
    """Mixed into `Server`, which supplies ``pool``, ``sessions``, ``limits``,
    ``token``, ``gpu``, ``max_message_bytes``, ``requests``, ``request_metrics``,
    ``events``, ``_sink``, ``_handlers``, ``_memo``, ``_op`` and ``_result``."""

    def handle(self, body: bytes) -> bytes:
        """One request in, one reply out (counted, timed and its KV events
        published when those are on). Never raises."""
        metrics = self.request_metrics
        if metrics is None:
            reply = self._handle(body)
        else:
            t0 = time.perf_counter()
            reply = self._handle(body)
            metrics.observe(self._op, self._result, time.perf_counter() - t0)
        if self._sink is not None and self._sink.items:
            self._flush_events()
        return reply

    def refuse_frames(self, frames: int) -> bytes:
        """The reply to a message of ``frames`` frames, not one request's (nothing
        runs), counted and timed as a request too broken to name its op."""
        t0 = time.perf_counter()
        self.requests += 1
        reply = encode_reply(None, None, ErrorInfo(
            "protocol_error", "a request is one frame (after a REQ socket's empty delimiter); "
            f"this message had {'more than 2' if frames > 2 else frames}"))
        if self.request_metrics is not None:  # (they went uncounted: the server built the reply itself)
            self.request_metrics.observe("", "protocol_error", time.perf_counter() - t0)
        return reply

    def _flush_events(self) -> None:
        """Publish what the pool recorded as one batch."""
        if self._sink is not None and self._sink.items:
            self.events.publish(time.time(), self._sink.take())

    def _handle(self, body: bytes) -> bytes:
        self.requests += 1
        self._op, self._result, self._rid = "", "ok", None
        rid, op, session, digest = None, "?", None, None
        try:
            head = split_id(body) if type(body) is bytes and len(body) <= self.max_message_bytes else None
            kept_req = self._memo.get(head[1]) if head is not None else None
            if kept_req is not None:  # a repeat of a request decoded and checked before
                rid, (name, op, args) = head[0], kept_req
                self._op, self._rid = op, rid
                session = self.sessions.get(name)
                session.ops += 1
            else:
                req = decode_request(body, self.max_message_bytes, self.limits.ids, self.limits.tokens)
                rid, op, args = req.id, req.op, req.args
                self._op, self._rid = op, rid
                if OPS[op].session or (req.session is not None and op != "hello"):
                    session = self.sessions.get(req.session)
                    session.ops += 1
                elif self.token is not None and op != "hello":
                    raise Unauthorized(f"{op}: this daemon has a token: open a session (hello with the token) first")
                self._bound(op, args)
                if head is not None and op in MEMO_OPS:
                    self._memo.put(head[1], req.session, op, args)
            if op in RETRIED_OPS:
                # A retry after a timeout (same id, same bytes) gets the first reply.
                digest = body if type(body) is bytes and 16 < len(body) <= _MATCH_BYTES \
                    else hashlib.blake2b(body, digest_size=16).digest()
                kept = session.replies.get(rid)
                if kept is None and session.replies and type(rid) is int and rid < min(session.replies):
                    # A copy of a request older than every kept one (a client sends its requests in
                    # the order of their ids, one at a time, and settles one that timed out before
                    # the next): a late copy of a retried request, read from a socket its client
                    # closed. Run again, it repeated an allocate (sequences no one knew of) or an append.
                    raise InvalidArgument(f"{op}: request {rid} is older than this session's kept replies "
                                          "(a late copy of a request retried after a timeout): not run again")
                if kept is not None and kept[0] == digest:
                    self._result = "replayed"
                    if kept[1] is None:  # ran, but its reply was over the session's limit to keep
                        err = LimitExceeded(
                            f"{op}: request {rid} ran, but its reply was too large to keep for a retry "
                            f"(over {self.limits.kept} bytes: KVPAGER_MAX_KEPT, kvpager serve --max-kept)",
                            "kept", self.limits.kept + 1, self.limits.kept)
                        if kept[2] is not None:  # the sequences it made: a client that never learnt of them frees them
                            err.created = kept[2]
                        raise err
                    return kept[1]
            reply = self._reply(rid, op, session, args)
        except Exception as e:
            if not self._op and getattr(e, "op", None) in OPS:  # a known op with unknown or missing arguments
                self._op = e.op
            return self._error_reply(rid, op, e)
        if digest is not None:
            self._keep(session, rid, op, digest, reply)
        return reply

    def _keep(self, session: Session, rid: int, op: str, digest: bytes, reply: bytes) -> None:
        """Keep ``reply`` for a retry of request ``rid``: the last KEPT_REPLIES of
        a session, within ``limits.kept`` bytes (one larger is remembered as run
        but not kept: its retry is told so, and nothing runs twice)."""
        replies, limit = session.replies, self.limits.kept
        old = replies.pop(rid, None)
        if old is not None:
            session.kept_bytes -= _kept_bytes(old)
        keep = reply if len(reply) <= limit else None
        # too large to keep: an allocate's or fork's new sequence ids are kept instead (a
        # timed-out client learns them from the retry's error and frees them: none orphaned)
        created = created_ids(op, reply) if keep is None and op in ("allocate", "fork") else None
        entry = (digest, keep, created)
        replies[rid] = entry
        session.kept_bytes += _kept_bytes(entry)
        # (the newest stays whatever its size: a retry of it must not run again)
        while len(replies) > 1 and (len(replies) > KEPT_REPLIES or session.kept_bytes > limit):
            _, dropped = replies.popitem(last=False)
            session.kept_bytes -= _kept_bytes(dropped)

    def _reply(self, rid: int, op: str, session: Session | None, args: dict[str, Any]) -> bytes:
        moves = self.pool.backend.moves
        before = moves.count
        try:
            try:
                result = self._handlers[op](session, args)
            finally:
                if session is not None:
                    # Heard from at its reply too: a long request of its own was its silence (a client
                    # without a heartbeat thread whose swap held the loop past the timeout was expired).
                    session.last_seen = time.monotonic()
                    if moves.count != before:  # (one that raised part way too)
                        session.changes += 1  # its tables may have lost blocks: its kept `held` is looked at again
            if self.gpu is not None and op in _DEVICE_OPS and self.pool.pending:
                self.pool.synchronize()
            return encode_reply(rid, result)
        except Exception as e:
            return self._error_reply(rid, op, e)

    def _error_reply(self, rid: int | None, op: str, e: Exception) -> bytes:
        info = self._error_info(op, e)
        rid = getattr(e, "request_id", rid)
        try:
            return encode_reply(rid, None, info)
        except Exception:  # details (or an id) the wire cannot carry: the error still goes back, without them
            log.warning("%s: error details not encodable; replied without them", op)
            return encode_reply(rid if type(rid) is int and 0 <= rid < 1 << 64 else None, None,
                                ErrorInfo(info.code, info.message))
        finally:
            drop_tracebacks(e)

    def _error_info(self, op: str, e: Exception) -> ErrorInfo:
        """The typed error of ``op``'s failure (counted as the request's result)."""
        if isinstance(e, KVPagerError):
            self._result = e.code if e.code in ERRORS_BY_CODE else "internal"
            return ErrorInfo.from_exception(e)
        if isinstance(e, (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError)):
            # KVPool validates its arguments; what slips through is still the
            # caller's malformed input, not a reason to die.
            self._result = "invalid_argument"
            return ErrorInfo("invalid_argument", f"{op}: bad arguments: {type(e).__name__}: {e}")
        if isinstance(e, RecursionError):
            # msgpack decodes lists nested ~1000 deep; describing one (a check's message
            # shows the value) goes past Python's recursion limit: the caller's input too.
            self._result = "invalid_argument"
            return ErrorInfo("invalid_argument", f"{op}: bad arguments: a value nested too deeply to check")
        self._result = "internal"
        log.error("internal error in %s", op, exc_info=e)  # a bug: keep serving, say so loudly
        return ErrorInfo.from_exception(InternalError(f"{op}: {e!r}"))

    def _op_batch(self, s: Session, a: dict[str, Any]) -> dict[str, Any]:
        """Several sequence ops of one session in order, in one request: each all or
        nothing, the first that fails stops the batch (the ops before it stay done,
        the rest do not run). Checked whole by `_bound_batch` before it gets here."""
        results: list[Any] = []
        for i, (op, args) in enumerate(a["ops"]):
            try:
                results.append(self._handlers[op](s, args))
            except Exception as e:
                error = self._error_info(op, e)
                drop_tracebacks(e)
                error.details["index"] = i
                return encode_batch(results, error)
        return encode_batch(results, None)

    def _bound_batch(self, a: dict[str, Any]) -> int:
        """A batch's every op's name, argument names and per-request limits, before
        any runs (with the request's other checks: a batch so refused ran nothing
        and is not kept for a retry, as a single op so refused is not). The batch
        is one request for the limits: its ops' sequence ids together within the ids
        limit (each op's other lists too), their token ids together within the
        tokens limit."""
        ops = a["ops"]
        if not isinstance(ops, list) or not 0 < len(ops) <= BATCH_MAX_OPS:
            raise InvalidArgument(f"batch: ops must be a list of 1 to {BATCH_MAX_OPS} [op, args] pairs")
        ids = tokens = 0
        for i, item in enumerate(ops):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], dict)):
                raise InvalidArgument(f"batch: ops[{i}] must be an [op, args] pair with an args map")
            if item[0] not in BATCH_OPS:
                raise InvalidArgument(f"batch: ops[{i}] is {item[0]!r}; a batch holds {', '.join(BATCH_OPS)}")
            check_args(item[0], item[1])
            tokens += self._bound(item[0], item[1])
            seq_ids = item[1]["seq_ids"]
            ids += len(seq_ids) if _sized(seq_ids) else 1
        lim = self.limits
        if ids > lim.ids:
            lim.check("ids", ids, "batch: sequence ids of its ops together")
        if tokens > lim.tokens:
            lim.check("tokens", tokens, "batch: token ids of its ops together")
        return tokens

    def _bound(self, op: str, a: dict[str, Any]) -> int:
        """The per-request limits: ids and tokens in one request (len() only); the token ids counted."""
        if op == "batch":
            return self._bound_batch(a)
        lim = self.limits
        for name, v in a.items():  # the request's own arguments (a decode step's append: seq_ids alone)
            if name in _ID_LISTS and _sized(v) and len(v) > lim.ids:
                lim.check("ids", len(v), f"{op}: {name}")
        salt = a.get("salt")
        if salt is not None:  # a tenant's name: kept as given (its stats row, the root keys' memo)
            salts = (salt,) if isinstance(salt, (str, bytes)) else salt if isinstance(salt, list) else ()
            longest = max((len(x) for x in salts if isinstance(x, (str, bytes))), default=0)
            if longest > lim.salt:
                lim.check("salt", longest, f"{op}: salt")
        tokens = 0
        for name in ("prompts", "token_ids"):
            v = a.get(name)
            if isinstance(v, list):
                if v and all_type(v, list):  # lists of ids, as msgpack decodes them: at C speed
                    tokens += sum(map(len, v))
                else:
                    tokens += sum(len(p) for p in v if _sized(p))
            elif isinstance(v, np.ndarray) and v.ndim > 1:  # rows of ids in one array
                tokens += v.size
        n = a.get("num_tokens")
        if isinstance(n, np.ndarray) and n.dtype.kind in "iu":
            n = int(n) if n.ndim == 0 else n.tolist()  # a scalar or a list, as KVPool takes them
        slots = 0  # an append's new tokens, whose ids (where given) are the same tokens: counted once
        if isinstance(n, int) and _sized(a.get("seq_ids")):
            slots = n * len(a["seq_ids"])
        elif isinstance(n, int):
            slots = n
        elif isinstance(n, list) and all(type(x) is int for x in n):
            slots = sum(x for x in n if x > 0)  # a negative count is the pool's to refuse
        tokens = max(tokens, slots)
        if tokens > lim.tokens:
            lim.check("tokens", tokens, f"{op}: token ids")
        # A staged write's slots, or a step plan's sent with `tables`: a token each (8M of them in
        # 16 MiB held the loop 1.6 s to check, a write of as many 7.5 s and 2 GB).
        written = a.get("slots")
        n = (written.size if isinstance(written, np.ndarray) else len(written)) if _sized(written) else 0
        if n > lim.tokens:
            lim.check("tokens", n, f"{op}: slots (a token each)")
        return tokens


def drop_tracebacks(e: BaseException) -> None:
    """Cut ``e`` (and the errors it was raised from or during) from its traceback
    once answered: an error held by a name in the frame that raised it (``err =
    ...; raise err``) made a cycle through the traceback that kept that frame's
    locals, the request's bytes and what was decoded from them, until the
    collector's next pass (twenty refused 14 MiB requests held 500 MiB)."""
    seen = 0
    while e is not None and seen < 16:
        e.__traceback__ = None
        e, seen = e.__cause__ or e.__context__, seen + 1
