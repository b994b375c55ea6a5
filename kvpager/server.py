"""The daemon: one `KVPool` behind one ZeroMQ ROUTER socket and one event loop.

Every state change runs on the loop's thread, one request at a time, so the
allocator needs no locks. The server owns sessions (hello / heartbeat / bye)
and checks that a sequence belongs to the calling session before `KVPool`
sees the batch: a rejected batch changes nothing. A client's mistake is
answered with a typed error reply; it never ends the loop.

In-process use (tests)::

    server = Server.create(spec, "ipc:///tmp/x/kv.sock")
    server.start()          # a background thread; returns once bound
    ...
    server.stop()
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import secrets
import threading
import time
from typing import Any

import numpy as np
import zmq

from kvpager import cuda_ipc, env, protocol
from kvpager.backends import make_backend
from kvpager.endpoints import (
    check_endpoint,
    default_endpoint,
    ipc_path,
    is_local,
    is_socket,
    prepare_ipc_bind,
)
from kvpager.errors import (
    IntegrityError,
    InternalError,
    InvalidArgument,
    KVPagerError,
    LimitExceeded,
    NotOwner,
    OutOfBlocks,
    SequenceSwapped,
    Unauthorized,
)
from kvpager.limits import Limits
from kvpager.pool import KVPool
from kvpager.protocol import (
    KEPT_REPLIES,
    OPS,
    RETRIED_OPS,
    SEQUENCES_PAGE,
    ErrorInfo,
    decode_request,
    encode_reply,
)
from kvpager.render import human_bytes
from kvpager.sessions import Session, SessionTable
from kvpager.shm import PoolMemory, sweep_stale
from kvpager.spec import PoolSpec

log = logging.getLogger("kvpager.server")

_POLL_MS = 50  # how soon stop() and heartbeat expiry are noticed when idle
#: Ops that may launch work on a GPU pool (copy-on-write, swaps, remote write and
#: attend): their reply waits for it, so a block id handed out is never mid-copy
#: and a staging buffer is never read or rewritten while in use.
_DEVICE_OPS = frozenset({"append", "swap_out", "swap_in", "write", "attend"})


def _ids(value: Any, what: str = "seq_ids") -> list[int]:
    """A batch of sequence ids from the wire: an int, a list of ints or an int array."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        return value.tolist()
    if isinstance(value, list) and set(map(type, value)) <= {int}:  # bools excluded: type(True) is bool
        return value
    raise InvalidArgument(f"{what} must be an int or a list of ints")


#: Token ids are int64 in the allocator (block keys hash their bytes).
_TOKEN_LIMIT = 1 << 63


def _check_token_ids(token_ids: Any) -> None:
    """Every token id of an append in int64 range, checked before anything
    changes: one past it would be accepted by the append and fail only at a
    later commit, after that commit had published other sequences' blocks."""
    if not isinstance(token_ids, list):
        return  # None, or malformed: KVPool says why
    try:
        if max(map(max, token_ids)) < _TOKEN_LIMIT:  # the decode step: [[t], [t], ...]
            return
    except (TypeError, ValueError):
        pass  # None entries, empty lists, junk: one at a time
    for ids in token_ids:
        if isinstance(ids, (list, np.ndarray)) and len(ids):
            try:
                hi = max(ids)
            except TypeError:
                continue  # not numbers: KVPool says why
            if hi >= _TOKEN_LIMIT:
                raise InvalidArgument(f"append: token id {hi} is out of range (token ids are below 2**63)")


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{what} must be an integer, got {type(value).__name__}")
    return value


class Server:
    """A daemon serving ``pool`` at ``endpoint`` (default: the private ipc:// socket).

    ``memory`` is the shared memory the pool lives in (`PoolMemory`), which
    the hello reply hands to clients; a GPU pool (`CupyBackend`) is exported
    by CUDA IPC instead; otherwise clients use remote write/attend only.
    ``run()`` serves until ``stop()``; ``start()`` runs it in a thread."""

    def __init__(
        self,
        pool: KVPool,
        endpoint: str | None = None,
        *,
        memory: PoolMemory | None = None,
        heartbeat_timeout: float | None = None,
        max_message_bytes: int | None = None,
        epoch: str | None = None,
        owns_pool: bool = False,
        limits: Limits | None = None,
        token: str | None = None,
    ):
        self.pool = pool
        self.endpoint = check_endpoint(endpoint or default_endpoint(), bind=True)
        self.memory = memory
        self.epoch = epoch or secrets.token_hex(8)
        #: the pool's CUDA device index when it lives on a GPU, else None
        self.gpu: int | None = pool.backend.index if hasattr(pool.backend, "ipc_handle") else None
        self._exported: dict[str, Any] | None = None
        hb = env.heartbeat_timeout_s() if heartbeat_timeout is None else float(heartbeat_timeout)
        if not 0 < hb < float("inf"):
            raise InvalidArgument(f"heartbeat timeout must be a positive number of seconds, got {heartbeat_timeout!r}")
        self.limits = limits or Limits.from_env()
        #: hello must carry this secret when set (see "Trust" in docs/protocol.md)
        self.token = token or None
        self.sessions = SessionTable(hb, self.epoch, self.gpu, self.limits)
        self.max_message_bytes = max_message_bytes or env.max_message_bytes()
        self.owns_pool = owns_pool
        self.requests = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._handlers = {name: getattr(self, f"_op_{name}") for name in OPS}
        # When the loop last found nothing queued: every message sent before then
        # has been read, so a session silent since long before it is really gone.
        self._idle = time.monotonic()

    @classmethod
    def create(cls, spec: PoolSpec, endpoint: str | None = None, device: str = "cpu", **kwargs: Any) -> Server:
        """A server with its own pool; on the CPU the pool lives in shared memory
        that clients map."""
        check_endpoint(endpoint or default_endpoint(), bind=True)  # before any memory is taken
        epoch = secrets.token_hex(8)
        memory = None
        if device == "cpu":
            sweep_stale()
            memory = PoolMemory.create(spec, epoch)
            pool = KVPool(spec, backend=memory.backend())
        else:
            pool = KVPool(spec, backend=make_backend(spec, device))
        return cls(pool, endpoint, memory=memory, epoch=epoch, owns_pool=True, **kwargs)

    # -- lifecycle -------------------------------------------------------------------------
    def bind(self) -> str:
        """Open and bind the socket; returns the actual endpoint (tcp port ``*`` resolved).
        On failure everything is released (`close()`), shared memory included."""
        try:
            return self._bind()
        except BaseException:
            self.close()
            raise

    def _bind(self) -> str:
        if self.token is None and not is_local(self.endpoint):
            raise InvalidArgument(
                f"{self.endpoint} is reachable beyond this host: give the daemon a token "
                "(kvpager serve --token-file FILE, or KVPAGER_TOKEN) that clients send in hello")
        prepare_ipc_bind(self.endpoint)
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # A blocking recv that gives up every _POLL_MS: one call per message
        # when busy, and a regular chance to expire sessions and see stop().
        sock.setsockopt(zmq.RCVTIMEO, _POLL_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes + protocol.TRANSPORT_SLACK)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            sock.close()
            self._ctx.term()
            self._ctx = None
            raise InvalidArgument(f"cannot bind {self.endpoint}: {e}") from None
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        path = ipc_path(self.endpoint)
        if path:
            os.chmod(path, 0o600)
        elif self.token is None and self.endpoint.startswith("tcp://"):
            log.warning("listening on %s without a token: every local user can use the pool "
                        "(--token-file / KVPAGER_TOKEN)", self.endpoint)
        spec = self.pool.spec
        log.info(
            "serving on %s: device %s, %d blocks of %d tokens (%s), %d host blocks (%s); %d layers x %d kv "
            "heads x %d head dim, %s; epoch %s, heartbeat timeout %.1fs",
            self.endpoint, self.pool.device, spec.num_blocks, spec.block_size, human_bytes(spec.device_bytes),
            spec.num_host_blocks, human_bytes(spec.host_bytes), spec.num_layers, spec.num_kv_heads,
            spec.head_dim, spec.dtype, self.epoch, self.sessions.heartbeat_timeout,
        )
        return self.endpoint

    def run(self) -> None:
        """Serve until `stop()`; then release everything (`close()`)."""
        try:
            if self._sock is None:
                self.bind()
            self._ready.set()
            self._loop()
        finally:
            self._ready.set()
            self.close()

    def start(self, timeout: float = 10.0) -> Server:
        """Run in a daemon thread; returns once the socket is bound."""
        self.bind()
        self._thread = threading.Thread(target=self.run, name="kvpager-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("server thread did not start")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to end (safe from a signal handler or another thread)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def close(self) -> None:
        """End every session (freeing its sequences), close the socket, unlink
        the ipc socket and the shared memory."""
        for s in list(self.sessions.sessions.values()):
            self._end(s, "daemon shutting down")
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
            self._ctx.term()
            path = ipc_path(self.endpoint)
            if path and is_socket(path):  # never anything else found there
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.owns_pool:
            self.pool.close()
            self.owns_pool = False
        log.info("stopped after %d requests", self.requests)

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        sock, stop = self._sock, self._stop
        next_expiry = time.monotonic() + self._expiry_interval()
        while not stop.is_set():
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                self._idle = time.monotonic()  # the queue is empty: everything sent is read
                sock.poll(_POLL_MS)
            else:
                # [routing id, (empty delimiter from REQ), body]: answer on the same envelope.
                frames[-1] = self.handle(frames[-1])
                try:
                    sock.send_multipart(frames, zmq.NOBLOCK)
                except zmq.ZMQError as e:  # peer gone or its queue full: its problem, not ours
                    log.debug("reply dropped: %s", e)
            now = time.monotonic()
            if now >= next_expiry:
                next_expiry = now + self._expiry_interval()
                self.expire()

    def expire(self) -> None:
        """End the sessions silent for longer than the heartbeat timeout, judged
        at the last moment the loop had read everything queued: after a slow
        request, the heartbeats that waited behind it count first."""
        for s in self.sessions.expired(self._idle):
            self._end(s, "missed heartbeats")

    def _expiry_interval(self) -> float:
        return min(1.0, self.sessions.heartbeat_timeout / 4)

    def handle(self, body: bytes) -> bytes:
        """One request in, one reply out. Never raises."""
        self.requests += 1
        rid, op, session, digest = None, "?", None, None
        try:
            req = decode_request(body, self.max_message_bytes)
            rid, op = req.id, req.op
            if OPS[op].session or (req.session is not None and op != "hello"):
                session = self.sessions.get(req.session)
            elif self.token is not None and op != "hello":
                raise Unauthorized(f"{op}: this daemon has a token: open a session (hello with the token) first")
            if op in RETRIED_OPS:
                # A retry after a timeout (same id, same bytes) gets the first reply.
                digest = hashlib.blake2b(body, digest_size=16).digest()
                kept = session.replies.get(rid)
                if kept is not None and kept[0] == digest:
                    return kept[1]
            reply = self._reply(rid, op, session, req.args)
        except Exception as e:
            return self._error_reply(rid, op, e)
        if digest is not None:
            replies = session.replies
            replies[rid] = (digest, reply)
            replies.move_to_end(rid)
            if len(replies) > KEPT_REPLIES:
                replies.popitem(last=False)
        return reply

    def _reply(self, rid: int, op: str, session: Session | None, args: dict[str, Any]) -> bytes:
        try:
            self._bound(op, args)
            result = self._handlers[op](session, args)
            if self.gpu is not None and op in _DEVICE_OPS and self.pool.pending:
                self.pool.synchronize()
            return encode_reply(rid, result)
        except Exception as e:
            return self._error_reply(rid, op, e)

    def _error_reply(self, rid: int | None, op: str, e: Exception) -> bytes:
        if isinstance(e, KVPagerError):
            return encode_reply(getattr(e, "request_id", rid), None, ErrorInfo.from_exception(e))
        if isinstance(e, (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError)):
            # KVPool validates its arguments; what slips through is still the
            # caller's malformed input, not a reason to die.
            msg = f"{op}: bad arguments: {type(e).__name__}: {e}"
            return encode_reply(rid, None, ErrorInfo("invalid_argument", msg))
        log.error("internal error in %s", op, exc_info=e)  # a bug: keep serving, say so loudly
        return encode_reply(rid, None, ErrorInfo.from_exception(InternalError(f"{op}: {e!r}")))

    def _bound(self, op: str, a: dict[str, Any]) -> None:
        """The per-request limits: ids and tokens in one request (len() only)."""
        lim = self.limits
        for name in ("seq_ids", "prompts", "lengths", "upto", "token_ids", "query_lens", "salt"):
            v = a.get(name)
            if isinstance(v, (list, np.ndarray)) and len(v) > lim.ids:
                lim.check("ids", len(v), f"{op}: {name}")
        tokens = 0
        for name in ("prompts", "token_ids"):
            v = a.get(name)
            if isinstance(v, list):
                tokens += sum(len(p) for p in v if isinstance(p, (list, np.ndarray)))
        n = a.get("num_tokens")
        if isinstance(n, int) and isinstance(a.get("seq_ids"), (list, np.ndarray)):
            tokens += n * len(a["seq_ids"])
        elif isinstance(n, int):
            tokens += n
        elif isinstance(n, list) and all(type(x) is int for x in n):
            tokens += sum(n)
        if tokens > lim.tokens:
            lim.check("tokens", tokens, f"{op}: token ids")

    # -- sessions ----------------------------------------------------------------------------
    def _owned(self, session: Session, value: Any) -> list[int]:
        """The ids, checked to exist and belong to ``session`` (all before any change)."""
        ids = _ids(value)
        self.pool.check_owner(ids, session.name)
        return ids

    def _end(self, session: Session, why: str) -> int:
        ids = self.pool.owned(session.name)
        if ids:
            self.pool.free(ids)
        self.sessions.close(session)
        log.info("session %s (%s, pid %s) ended: %s; freed %d sequences",
                 session.name, session.client, session.pid, why, len(ids))
        return len(ids)

    # -- ops ---------------------------------------------------------------------------------
    def _op_hello(self, _: None, a: dict[str, Any]) -> dict[str, Any]:
        if self.token is not None:
            given = a.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.token.encode()):
                raise Unauthorized("hello: this daemon needs its token (Client(token=...), KVPAGER_TOKEN "
                                   "or KVPAGER_TOKEN_FILE)" + ("; the one given is wrong" if given else ""))
        pid, client = a.get("pid"), a.get("client", "?")
        if not isinstance(client, str):
            raise InvalidArgument(f"hello: client must be a string, got {type(client).__name__}")
        self.limits.check("client_name", len(client), "hello: client name length")
        s = self.sessions.open(client, pid if isinstance(pid, int) and not isinstance(pid, bool) else None)
        log.info("session %s opened by %s (pid %s)", s.name, s.client, s.pid)
        if self.memory is not None:
            memory = self.memory.handles()
        elif self.gpu is not None:
            if self._exported is None:
                self._exported = cuda_ipc.pool_handles(self.pool.backend, self.epoch)
            memory = self._exported
        else:
            memory = {"kind": "none"}
        return {
            "session": s.id,  # the secret: this reply is the only one that carries it
            "name": s.name,
            "epoch": self.epoch,
            "version": protocol.VERSION,
            "spec": self.pool.spec.to_dict(),
            "device": self.pool.device,
            "memory": memory,
            "heartbeat_timeout": self.sessions.heartbeat_timeout,
            "max_message_bytes": self.max_message_bytes,
            "server_pid": os.getpid(),
        }

    def _op_heartbeat(self, s: Session, a: dict[str, Any]) -> None:
        return None  # SessionTable.get already reset the clock

    def _op_bye(self, s: Session, a: dict[str, Any]) -> dict[str, int]:
        return {"freed": self._end(s, "bye")}

    def _op_allocate(self, s: Session, a: dict[str, Any]) -> list[list[Any]]:
        prompts = a["prompts"]
        if not isinstance(prompts, list):
            raise InvalidArgument("prompts must be a list of token-id lists")
        self.limits.check("sequences", s.num_seqs + len(prompts), "allocate: sequences of this session")
        self._check_capacity(prompts)
        share = a.get("share_in_batch", False)
        allocs = self.pool.allocate(prompts, a.get("salt"), owner=s.name, share_in_batch=share)
        s.num_seqs += len(allocs)
        return protocol.encode_allocations(allocs)

    def _check_capacity(self, prompts: list[Any]) -> None:
        """OutOfBlocks before any hashing when the prompts cannot fit even if
        every cached block were a hit: a huge prompt costs no loop time."""
        bs = self.pool.spec.block_size
        sizes = [len(p) for p in prompts if isinstance(p, (list, np.ndarray))]
        need = -(-max(sizes, default=0) // bs)
        if need * bs < 1 << 16:
            return  # small: hashing it costs less than counting the pool
        st = self.pool.stats()
        available = st.free_blocks + st.evictable_blocks
        if need - st.cached_blocks > available:
            raise OutOfBlocks(need, available)

    def _op_cached_tokens(self, s: Session | None, a: dict[str, Any]) -> list[int]:
        prompts = a["prompts"]
        if not isinstance(prompts, list):
            raise InvalidArgument("prompts must be a list of token-id lists")
        return self.pool.cached_tokens(prompts, a.get("salt"))

    def _op_append(self, s: Session, a: dict[str, Any]) -> bytes:
        # The decode hot path: KVPool checks the ids' types, and ownership rides on
        # append's own lookup of them.
        _check_token_ids(a.get("token_ids"))
        slots = self.pool.append_flat(a["seq_ids"], a.get("num_tokens", 1), a.get("token_ids"), owner=s.name)
        return protocol.encode_slots(slots)

    def _op_commit(self, s: Session, a: dict[str, Any]) -> list[int]:
        return self.pool.commit(self._owned(s, a["seq_ids"]), a.get("upto"))

    def _op_fork(self, s: Session, a: dict[str, Any]) -> list[list[int]]:
        ids, n = self._owned(s, a["seq_ids"]), a.get("n", 1)
        if isinstance(n, int) and not isinstance(n, bool):
            self.limits.check("ids", len(ids) * n, "fork: children in one request")
            self.limits.check("sequences", s.num_seqs + len(ids) * n, "fork: sequences of this session")
        children = self.pool.fork(ids, n)
        s.num_seqs += sum(map(len, children))
        return children

    def _op_free(self, s: Session, a: dict[str, Any]) -> None:
        ids = self._owned(s, a["seq_ids"])
        self.pool.free(ids)
        s.num_seqs -= len(ids)

    def _op_truncate(self, s: Session, a: dict[str, Any]) -> None:
        self.pool.truncate(self._owned(s, a["seq_ids"]), a["lengths"])

    def _op_swap_out(self, s: Session, a: dict[str, Any]) -> None:
        self.pool.swap_out(self._owned(s, a["seq_ids"]))

    def _op_swap_in(self, s: Session, a: dict[str, Any]) -> list[np.ndarray]:
        ids = self._owned(s, a["seq_ids"])
        self.pool.swap_in(ids)
        # The swapped-out blocks came back under new ids: the reply carries the
        # new tables, so a worker's mirror follows without another round trip.
        return self._op_tables(s, {"seq_ids": ids})

    # -- tensors through the session's staging buffer ----------------------------------------
    def _op_staging(self, s: Session, a: dict[str, Any]) -> dict[str, Any]:
        nbytes = _int(a["nbytes"], "nbytes")
        if nbytes < 0:
            raise InvalidArgument(f"staging: nbytes must be >= 0, got {nbytes}")
        self.limits.check("staging", nbytes, "staging: bytes of this session's buffer")
        return self.sessions.staging(s, nbytes).handles()

    def _staged(self, s: Session, ref: Any, what: str) -> np.ndarray:
        """A view of ``ref`` = [offset, shape] in the session's staging buffer."""
        if s.staging is None:
            raise InvalidArgument(f"{what}: this session has no staging buffer; ask for one with 'staging'")
        if not (isinstance(ref, list) and len(ref) == 2 and isinstance(ref[1], list)):
            raise InvalidArgument(f"{what} must be [offset, shape] in the staging buffer")
        offset = _int(ref[0], f"{what} offset")
        shape = tuple(_int(d, f"{what} shape") for d in ref[1])
        return s.staging.array(shape, self.pool.spec.np_dtype, offset)

    def _op_write(self, s: Session, a: dict[str, Any]) -> None:
        slots = a["slots"]
        slots = np.asarray(slots if isinstance(slots, (list, np.ndarray)) else [slots])
        self._check_writable(s, slots)
        self.pool.write(a["layer"], slots, self._staged(s, a["k"], "k"), self._staged(s, a["v"], "v"))

    def _check_writable(self, s: Session, slots: np.ndarray) -> None:
        """A session writes only slots of its own sequences' blocks, and never a
        block published in the prefix cache: other sessions read its K/V through
        the cache, so a published block is immutable. (A worker that maps the
        pool is trusted as its user is: see "Trust" in docs/protocol.md.)"""
        spec = self.pool.spec
        if slots.ndim != 1 or slots.dtype.kind not in "iu" or not slots.size:
            return  # KVPool.write names what is wrong
        slots = slots.astype(np.int64, copy=False)
        if ((slots < -1) | (slots >= spec.num_blocks * spec.block_size)).any():
            return  # out of range: KVPool.write says so
        blocks = np.unique(slots[slots >= 0] // spec.block_size)
        ids = self.pool.owned(s.name)
        try:
            mine = self.pool.tables(ids)[0].ravel() if ids else np.zeros(0, np.int64)  # one gather
        except SequenceSwapped:  # a swapped-out sequence has no device table: the long way
            tables = [info.block_table for info in self.pool.sequences(s.name)]
            mine = np.fromiter(itertools.chain.from_iterable(tables), np.int64)
        foreign = blocks[~np.isin(blocks, mine)]
        if len(foreign):
            raise NotOwner(f"write: block {int(foreign[0])} (slot {int(foreign[0]) * spec.block_size}...) is not "
                           "held by any sequence of this session")
        published = blocks[self.pool.blocks().cached[blocks]]
        if len(published):
            raise NotOwner(f"write: block {int(published[0])} is published in the prefix cache; its K/V "
                           "is immutable (write before commit)")

    def _op_attend(self, s: Session, a: dict[str, Any]) -> list[Any]:
        q = self._staged(s, a["q"], "q")
        out = self.pool.attend(a["layer"], _ids(a["seq_ids"]), q, a.get("query_lens"), a.get("scale"))
        offset = _int(a["out"], "out")
        s.staging.array(out.shape, out.dtype, offset)[...] = out  # a device copy on a GPU
        return [offset, list(out.shape)]

    # -- inspection ----------------------------------------------------------------------------
    def _op_tables(self, s: Session | None, a: dict[str, Any]) -> list[np.ndarray]:
        return list(self.pool.tables(_ids(a["seq_ids"])))

    def _op_sequences(self, s: Session | None, a: dict[str, Any]) -> list[dict[str, Any]]:
        # A page at a time: a SequenceInfo costs microseconds on the loop's thread.
        limit = _int(a.get("limit", SEQUENCES_PAGE), "limit")
        if not 1 <= limit <= SEQUENCES_PAGE:
            raise InvalidArgument(f"sequences: limit must be in [1, {SEQUENCES_PAGE}], got {limit}")
        if a.get("seq_ids") is not None:
            ids = _ids(a["seq_ids"])
            if len(ids) > limit:
                raise LimitExceeded(f"sequences: {len(ids)} ids in one request; at most {limit} "
                                    "(ask for pages: after / limit)", "ids", len(ids), limit)
        else:
            owner = a.get("owner")
            if owner is not None:
                ids = self.pool.owned(owner)  # a session name
            else:
                ids = sorted(itertools.chain.from_iterable(map(self.pool.owned, self.pool.owners())))
            ids = ids[bisect.bisect_right(ids, _int(a.get("after", -1), "after")):][:limit]
        infos = [self.pool.sequence(i) for i in ids]
        # Owners are public session names; the pid says which worker it is.
        by_name = self.sessions.by_name
        out = []
        for info in infos:
            d = protocol.encode_info(info)
            owner = by_name.get(info.owner)
            d["owner_pid"] = owner.pid if owner is not None else None
            out.append(d)
        return out

    def _op_blocks(self, s: Session | None, a: dict[str, Any]) -> list[np.ndarray]:
        return protocol.encode_blocks(self.pool.blocks())

    def _op_stats(self, s: Session | None, a: dict[str, Any]) -> dict[str, Any]:
        d = protocol.encode_stats(self.pool.stats())
        d["sessions"] = len(self.sessions)
        return d

    def _op_check(self, s: Session | None, a: dict[str, Any]) -> None:
        self.pool.check_integrity()
        open_ids = self.sessions.by_name
        orphans = [i for o in self.pool.owners() if o not in open_ids for i in self.pool.owned(o)]
        if orphans:
            raise IntegrityError(f"{len(orphans)} sequences belong to no open session, e.g. {orphans[:5]}")
        for s in open_ids.values():
            if s.num_seqs != len(self.pool.owned(s.name)):
                raise IntegrityError(f"session {s.name} counts {s.num_seqs} sequences but owns "
                                     f"{len(self.pool.owned(s.name))}")
