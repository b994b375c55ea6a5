"""`Client`: the daemon's pool with `KVPool`'s method names and result types.

Moving a worker from the embedded pool to the daemon is one line::

    pool = KVPool(spec)        ->        pool = Client()          # KVPAGER_ENDPOINT or the default socket

The client maps the daemon's pool once per process: POSIX shared memory on
the CPU backend (NumPy views), CUDA IPC on a GPU (CuPy views; `torch_kv` for
torch tensors through DLPack). `kv`, `write` and `attend` then run here on
zero-copy views, with the kvpager kernels on a GPU, and only ids and slots
cross the socket. Without a mapping, `remote_write` / `remote_attend` move
tensors through a per-session staging buffer (shared memory, or IPC-mapped
device memory on a GPU).

The client keeps a mirror of its own sequences' block tables (`TableMirror`),
updated from the replies of the ops that change them: `tables`, `attend` and
`plan` read it, so a scheduler step costs one round trip, not one per layer.

On a GPU, `commit` first waits for this process's device work (every stream):
no other process can match a block whose K/V is still being written.

A `Client` is safe for one thread at a time (a lock guards its socket); its
heartbeat thread has its own socket. Do not share one across ``fork()``.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from kvpager import cuda_ipc, env
from kvpager.backends.ranked import rank_spec
from kvpager.channel import Channel
from kvpager.client_control import ControlMethods, undo_pin
from kvpager.client_kv import KVAccess
from kvpager.client_tables import TableMirror, id_list
from kvpager.endpoints import check_endpoint, default_endpoint, probe
from kvpager.errors import (
    DaemonUnavailable,
    InternalError,
    InvalidArgument,
    MessageTooLarge,
    RequestTimeout,
    SessionLost,
)
from kvpager.plan import StepPlan, make_plan
from kvpager.protocol import (
    RETRIED_OPS,
    SEQUENCES_PAGE,
    VERSION,
    Reply,
    decode_allocations,
    decode_blocks,
    decode_info,
    decode_remote_stats,
    decode_slots,
    decode_stats,
    decode_tables,
    pack,
    unpack,
)
from kvpager.spec import PoolSpec
from kvpager.types import Allocation, BlockMap, PoolStats, RemoteStats, SequenceInfo

log = logging.getLogger("kvpager.client")


class Client(KVAccess, ControlMethods):
    """A session with the kvpager daemon at ``endpoint`` (default: KVPAGER_ENDPOINT,
    else the private ipc:// socket). Every call waits at most ``timeout`` seconds
    (default KVPAGER_TIMEOUT). ``token``: the daemon's token, if it has one
    (default KVPAGER_TOKEN, else the file KVPAGER_TOKEN_FILE). ``control_token``:
    the daemon's control token, for quotas and kept pins (default
    KVPAGER_CONTROL_TOKEN, else the file KVPAGER_CONTROL_TOKEN_FILE). Raises
    DaemonUnavailable if nothing listens, Unauthorized without the right token.
    ``rank``: on a tensor-parallel daemon (``kvpager serve --devices``), the rank
    this worker serves: it maps that rank's storage only, and `spec`, `kv`,
    `write`, `attend` and `plan` are over that rank's kv heads."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float | None = None,
        heartbeat: bool = True,
        map_pool: bool = True,
        name: str | None = None,
        token: str | None = None,
        control_token: str | None = None,
        rank: int | None = None,
    ):
        self.endpoint = check_endpoint(endpoint or default_endpoint())
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
            raise InvalidArgument(f"rank must be an int >= 0 (this worker's tensor-parallel rank), got {rank!r}")
        self.timeout = env.timeout_s() if timeout is None else float(timeout)
        if not 0 < self.timeout < float("inf"):
            raise InvalidArgument(f"timeout must be a positive number of seconds, got {timeout!r}")
        why = probe(self.endpoint)
        if why is not None:
            raise DaemonUnavailable(
                f"no kvpager daemon at {self.endpoint} ({why}); start one with `kvpager serve` "
                "or point KVPAGER_ENDPOINT at a running one"
            )
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        # (id, bytes, op) of a RETRIED_OPS request that timed out, until its outcome is known
        self._unsettled: tuple[int, bytes, str] | None = None
        self._chan = Channel(self.endpoint)
        #: the session's secret: sent with every request, shown nowhere
        self.session: str | None = None
        #: the session's public name: the owner of its sequences in `sequences()`
        self.session_name: str | None = None
        self.epoch: str | None = None
        self._closed = False
        # True once the session is known lost or closed: the mirror is not read
        # again (set by the heartbeat thread too, which never touches the mirror).
        self._lost = False
        self._hello_args: dict[str, Any] = {"client": name or f"{socket.gethostname()}:{os.getpid()}",
                                            "pid": os.getpid(), "host": socket.gethostname()}
        token = token if token is not None else env.token()
        if token:
            self._hello_args["token"] = token  # a daemon with a token asks for it (docs/protocol.md, "Trust")
        control_token = control_token if control_token is not None else env.control_token()
        if control_token:
            self._hello_args["control_token"] = control_token
        if rank is not None:
            self._hello_args["rank"] = rank  # maps that rank's storage (docs/protocol.md, "Ranks")
        self._want_map, self._want_heartbeat = map_pool, heartbeat
        self._hb_stop = threading.Event()
        self._hb: threading.Thread | None = None
        self._hello()

    def _hello(self) -> None:
        """Open a session: its secret, the pool's geometry and memory, heartbeats."""
        try:
            info = self._call("hello", self._hello_args)
        except RequestTimeout as e:
            self._chan.close()
            raise DaemonUnavailable(f"no kvpager daemon answers at {self.endpoint}: {e}") from None
        self.session, self.epoch = info["session"], info["epoch"]
        self.session_name = info.get("name")
        #: the whole pool's geometry (all kv heads); `spec` is this worker's rank's
        self.pool_spec = PoolSpec.from_dict(info["spec"])
        #: tensor-parallel ranks of the pool, and the one this session serves (None: none named)
        self.ranks: int = int(info.get("ranks") or 1)
        self.rank: int | None = info.get("rank")
        self.spec = (rank_spec(self.pool_spec, self.ranks, self.rank) if self.ranks > 1 and self.rank is not None
                     else self.pool_spec)
        self.device: str = info["device"]
        self.memory: dict[str, Any] = info["memory"]
        self.heartbeat_timeout: float = info["heartbeat_timeout"]
        self.max_message_bytes: int = info["max_message_bytes"]
        self.server_pid: int | None = info.get("server_pid")
        #: the daemon's remote tier (kind, url, ttl), or None (also from a daemon that predates it)
        self.remote: dict[str, Any] | None = info.get("remote")
        self.control: bool = bool(info.get("control"))  # quotas and kept pins allowed
        self.gpu = self.memory.get("kind") == "cuda_ipc"
        self._mirror = TableMirror(self.spec.block_size)  # this session's block tables
        self.map_pool = self._want_map and self.memory.get("kind") in ("shm", "cuda_ipc")
        self._mapped: Any = None  # NumpyBackend (shm) or CupyBackend (cuda_ipc) over the pool
        self._staging: Any = None  # shm Segment or cuda_ipc DeviceBuffer
        self._device_index: int | None = None
        if self._want_heartbeat:
            self._hb_stop = threading.Event()
            self._hb = threading.Thread(target=self._heartbeat_loop, name="kvpager-heartbeat", daemon=True)
            self._hb.start()

    def reconnect(self) -> None:
        """A new session after `SessionLost` (the daemon restarted, or dropped this
        session): the old session's sequences are gone, and so is everything
        mapped from a restarted daemon; this client's ids, tables and mappings
        start afresh from the new hello."""
        if self._closed:
            raise SessionLost("this client is closed")
        self._hb_stop.set()
        if self._hb is not None:
            self._hb.join(5)
            self._hb = None
        if self._staging is not None:
            self._staging.close()
        self._forget_session()
        self._forget_memory()
        self._unsettled = None
        self._chan.reset()
        self.session = self.session_name = None
        self._lost = False
        self._hello()

    # -- transport ------------------------------------------------------------------------------
    def _call(self, op: str, args: dict[str, Any]) -> Any:
        if self._closed:
            raise SessionLost("this client is closed")
        rid = next(self._ids)
        body = pack([VERSION, rid, self.session, op, args])
        if len(body) > getattr(self, "max_message_bytes", len(body)):
            raise MessageTooLarge(
                f"{op}: message of {len(body)} bytes is over the daemon's limit of {self.max_message_bytes} "
                "(KVPAGER_MAX_MESSAGE on the daemon); split the batch"
            )
        with self._lock:
            self._settle()
            reply = self._request(rid, body, op)
        if reply.error is not None:
            raise self._error(reply)
        return reply.result

    def _request(self, rid: int, body: bytes, op: str) -> Reply:
        try:
            return self._chan.request(body, rid, op, self.timeout)
        except RequestTimeout:
            if op in RETRIED_OPS:
                self._unsettled = (rid, body, op)  # it may still run: settled before the next request
            raise

    def _settle(self) -> None:
        """The outcome of a request that timed out: sent again with the same id
        on the reopened socket, the daemon answers with its first execution's
        reply (or runs it now, once). What it created, the caller never learnt
        of (it got RequestTimeout): those sequences are freed, so none is left
        orphaned. Raises RequestTimeout again while the daemon stays silent."""
        while self._unsettled is not None:
            rid, body, op = self._unsettled
            reply = self._chan.request(body, rid, op, self.timeout)
            self._unsettled = None
            if reply.error is None and op == "pin":  # a pin the caller never learnt of: undone
                undo = undo_pin(unpack(body)[4], reply.result)
                if undo:
                    frid = next(self._ids)
                    self._request(frid, pack([VERSION, frid, self.session, "unpin", undo]), "unpin")
                continue
            if reply.error is not None or op not in ("allocate", "fork"):
                continue  # nothing created; the mirror already forgot what the op touched
            if op == "allocate":
                created = [int(a[0]) for a in reply.result]
            else:
                created = [int(c) for kids in reply.result for c in kids]
            if created:
                log.warning("a %s that timed out was applied later: freeing its %d new sequences",
                            op, len(created))
                frid = next(self._ids)
                self._request(frid, pack([VERSION, frid, self.session, "free", {"seq_ids": created}]), "free")

    def _error(self, reply: Reply) -> Exception:
        exc = reply.error.exception()
        if isinstance(exc, SessionLost):
            self._forget_session()
        if isinstance(exc, SessionLost) and self.epoch and getattr(exc, "epoch", self.epoch) != self.epoch:
            exc.args = (exc.args[0] + "; the daemon restarted (pool epoch changed): memory mapped "
                        "from the old daemon is stale, open a new Client",)
            self._forget_memory()
        return exc

    def _forget_session(self) -> None:
        """The daemon freed this session's sequences (or will, on bye): drop the mirror."""
        self._lost = True
        mirror = getattr(self, "_mirror", None)  # absent while hello is under way
        if mirror is not None:
            mirror.clear()

    def _forget_memory(self) -> None:
        """Drop mappings of a daemon that is gone: they are unmapped once no view is left."""
        self._mapped = self._staging = None
        if self.gpu:
            cuda_ipc.forget_pool(self.memory)

    def _heartbeat_loop(self) -> None:
        chan, ids = Channel(self.endpoint), itertools.count(-1, -1)  # ids apart from the calls
        interval = max(0.05, self.heartbeat_timeout / 3)
        try:
            while not self._hb_stop.wait(interval):
                rid = next(ids)
                try:
                    reply = chan.request(pack([VERSION, rid, self.session, "heartbeat", {}]), rid,
                                         "heartbeat", max(interval, 1.0))
                except Exception as e:  # a missed beat is not fatal; the next may get through
                    log.debug("heartbeat failed: %s", e)
                    continue
                if reply.error is not None and reply.error.code == "session_lost":
                    log.warning("heartbeat: %s", reply.error.message)
                    self._lost = True  # the mirror is stale; the next call learns why
                    return
        finally:
            chan.close()

    def close(self) -> None:
        """Say bye (the daemon frees this session's sequences) and close the socket."""
        if self._closed:
            return
        self._hb_stop.set()
        if self._hb is not None:
            self._hb.join(5)
        if self._staging is not None:  # unmapped before bye frees it on the daemon
            self._staging.close()
            self._staging = None
        self._forget_session()
        self._unsettled = None  # bye frees whatever it created
        try:
            self._call("bye", {})
        except Exception as e:
            log.debug("bye failed: %s", e)
        self._closed = True
        self._chan.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def heartbeat(self) -> None:
        self._call("heartbeat", {})

    # -- sequence ops (as KVPool) ------------------------------------------------------------------
    # Each op that changes block tables updates the mirror of this session's
    # sequences from its ok reply (see `TableMirror`): attention and plans
    # need no round trip.
    def allocate(
        self, prompts: Seq[Seq[int]], salt: Any = None, *, owner: None = None, share_in_batch: bool = False
    ) -> list[Allocation]:
        """As `KVPool.allocate`; the sequences belong to this client's session."""
        if owner is not None:
            raise InvalidArgument("owner: a daemon sequence always belongs to the calling session")
        args: dict[str, Any] = {"prompts": prompts}
        if salt is not None:
            args["salt"] = salt
        if share_in_batch:
            args["share_in_batch"] = share_in_batch
        if self.remote:  # only a daemon with a tier knows the argument
            args["remote_tokens"] = True
        allocs = decode_allocations(self._call("allocate", args))
        self._mirror.allocated(allocs)
        return allocs

    def cached_tokens(self, prompts: Seq[Seq[int]], salt: Any = None) -> list[int]:
        """As `KVPool.cached_tokens`: a read-only probe of the prefix cache."""
        args: dict[str, Any] = {"prompts": prompts}
        if salt is not None:
            args["salt"] = salt
        return self._call("cached_tokens", args)

    def append(self, seq_ids: Any, num_tokens: Any = 1, token_ids: Any = None) -> list[np.ndarray]:
        """As `KVPool.append`: the new tokens' slot ids per sequence."""
        flat = self._append(seq_ids, num_tokens, token_ids)
        n = 1 if isinstance(seq_ids, (int, np.integer)) else len(seq_ids)
        return decode_slots(flat, n, num_tokens)

    def append_flat(self, seq_ids: Any, num_tokens: Any = 1, token_ids: Any = None) -> np.ndarray:
        """As `KVPool.append_flat`: every sequence's new slots in one int64 array."""
        return decode_slots(self._append(seq_ids, num_tokens, token_ids), 1, None)[0]

    def _append(self, seq_ids: Any, num_tokens: Any, token_ids: Any) -> bytes:
        args: dict[str, Any] = {"seq_ids": seq_ids}
        if not (isinstance(num_tokens, int) and num_tokens == 1):
            args["num_tokens"] = num_tokens
        if token_ids is not None:
            args["token_ids"] = token_ids
        ids = id_list(seq_ids)
        raw = self._mutate("append", args, ids)
        self._mirror.appended(ids, num_tokens, decode_slots(raw, 1, None)[0])
        return raw

    def commit(self, seq_ids: Any, upto: Any = None) -> list[int]:
        """As `KVPool.commit`. On a GPU pool mapped in this process, it first waits
        until this process's device work (K/V writes on any stream) has completed."""
        self.synchronize()
        args = {"seq_ids": seq_ids} if upto is None else {"seq_ids": seq_ids, "upto": upto}
        return self._call("commit", args)

    def fork(self, seq_ids: Any, n: int = 1) -> list[list[int]]:
        children = self._call("fork", {"seq_ids": seq_ids, "n": n})
        self._mirror.forked(id_list(seq_ids), children)
        return children

    def free(self, seq_ids: Any) -> None:
        ids = id_list(seq_ids)
        self._mutate("free", {"seq_ids": seq_ids}, ids)
        self._mirror.freed(ids)

    def truncate(self, seq_ids: Any, lengths: Any) -> None:
        ids = id_list(seq_ids)
        self._mutate("truncate", {"seq_ids": seq_ids, "lengths": lengths}, ids)
        self._mirror.truncated(ids, lengths)

    def release_before(self, seq_ids: Any, positions: Any) -> list[int]:
        """As `KVPool.release_before`; this worker's mirror follows (null entries)."""
        ids = id_list(seq_ids)
        counts = self._mutate("release", {"seq_ids": seq_ids, "positions": positions}, ids)
        if ids is not None:
            self._mirror.released(ids, counts)
        return counts

    def swap_out(self, seq_ids: Any) -> None:
        ids = id_list(seq_ids)
        self._mutate("swap_out", {"seq_ids": seq_ids}, ids)
        self._mirror.swapped_out(ids)

    def swap_in(self, seq_ids: Any) -> None:
        ids = id_list(seq_ids)
        got = self._mutate("swap_in", {"seq_ids": seq_ids}, ids)
        try:
            if got is None:  # a daemon from before swap_in answered with the tables
                got = self._call("tables", {"seq_ids": ids})
            tables, lens = decode_tables(got)
        except Exception:
            self._mirror.forget(ids)
            raise
        self._mirror.swapped_in(ids, tables, lens)

    def _mutate(self, op: str, args: dict[str, Any], ids: list[int] | None) -> Any:
        """``_call`` for an op that changes the tables of ``ids``. Without a
        clear outcome (no reply in time, or a daemon bug) the op may have been
        applied: the mirror forgets ``ids``, whose tables then come from the daemon."""
        try:
            return self._call(op, args)
        except (RequestTimeout, InternalError):
            if ids:
                self._mirror.forget(ids)
            raise

    # -- K/V ---------------------------------------------------------------------------------------
    def write(self, layer: int, slots: Any, k: Any, v: Any) -> None:
        """As `KVPool.write`: through the mapped pool when there is one, else remote."""
        if self.map_pool:
            self.local_write(layer, slots, k, v)
        else:
            self.remote_write(layer, slots, k, v)

    def attend(self, layer: int, seq_ids: Any, q: Any, query_lens: Any = None, scale: float | None = None,
               *, window: int | None = None, softcap: float | None = None) -> Any:
        """As `KVPool.attend` (``window`` / ``softcap`` included): computed here over
        the mapped pool when there is one (block tables from this client's mirror,
        no round trip), else by the daemon."""
        if self.map_pool:
            return self.local_attend(layer, seq_ids, q, query_lens, scale, window=window, softcap=softcap)
        return self.remote_attend(layer, seq_ids, q, query_lens, scale, window=window, softcap=softcap)

    def plan(self, seq_ids: Any, query_lens: Any = None, slots: Any = None, **options: Any) -> StepPlan:
        """As `KVPool.plan`: a step plan over the mapped pool, built here from this
        client's mirror of its block tables (no round trip for its own sequences),
        then ``plan.write(layer, k, v)`` and ``plan.attend(layer, q)`` per layer run
        here too. A snapshot: make a new one after the sequences change."""
        tables, seq_lens = self.tables(seq_ids)
        plan = make_plan(self._pool(), tables, seq_lens, query_lens, slots, **options)
        ids = id_list(seq_ids)
        if ids is not None and not self._lost:
            plan.floor = self._mirror.floors(ids)
        return plan

    def tables(self, seq_ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Padded int32 block tables [B, max_blocks] and lengths [B], as `KVPool.block_tables`:
        from this client's mirror when it owns every sequence, else from the daemon."""
        if not self._lost:
            ids = id_list(seq_ids)
            if ids is not None:
                got = self._mirror.gather(ids)
                if got is not None:
                    return got
        return decode_tables(self._call("tables", {"seq_ids": seq_ids}))

    # -- inspection --------------------------------------------------------------------------------
    def sequence(self, seq_id: int) -> SequenceInfo:
        return decode_info(self._call("sequences", {"seq_ids": [seq_id]})[0])

    def sequences(self) -> list[SequenceInfo]:
        """Every live sequence of every session, in id order (asked a page at a
        time, so the daemon never spends long on one request)."""
        out: list[SequenceInfo] = []
        while True:
            after = out[-1].seq_id if out else -1
            page = self._call("sequences", {"after": after, "limit": SEQUENCES_PAGE})
            out.extend(decode_info(d) for d in page)
            if len(page) < SEQUENCES_PAGE:
                return out

    def blocks(self) -> BlockMap:
        return decode_blocks(self._call("blocks", {}))

    def stats(self) -> PoolStats:
        return decode_stats(self._call("stats", {}))

    def remote_stats(self) -> RemoteStats | None:
        """As `KVPool.remote_stats`: the daemon's remote tier counters, or None."""
        d = self._call("stats", {}).get("remote")
        return decode_remote_stats(d) if d is not None else None

    def check_integrity(self) -> None:
        """The daemon's `KVPool.check_integrity`, plus: every sequence has an open session."""
        self._call("check", {})

    def synchronize(self) -> None:
        """As `KVPool.synchronize`: wait for this process's writes into the mapped
        pool to land (`commit` does it on a GPU pool). On a GPU: every stream of
        this process on the pool's device. On the CPU mapping they land when the
        write returns, so there is nothing to wait for."""
        if self.gpu and cuda_ipc.in_use():
            cuda_ipc.synchronize(self._device())
