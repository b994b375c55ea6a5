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

A `Client` may be called from several threads: each call runs whole, with
its update of the client's mirror of its tables, before another thread's
(`SERIALIZED`; two threads appending at once left the mirror out of step
with the daemon before). Its heartbeat thread has its own socket. Do not
share one across ``fork()``.

`Client` is one class made of mixins by responsibility: requests, retries
and heartbeats (`kvpager.client_wire`), sequence ops and inspection
(`kvpager.client_seqs`), several of a step's sequence ops in one round trip
(`kvpager.client_batch`), the mapped pool, local K/V and step plans
(`kvpager.client_kv`), the staging path (`kvpager.client_staging`), control
(`kvpager.client_control`). This module opens, reopens and closes the session.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from collections import deque
from typing import Any

from kvpager.backends.ranked import rank_spec
from kvpager.channel import Channel
from kvpager.client_batch import ClientBatch
from kvpager.client_control import ControlMethods
from kvpager.client_hello import (
    ask_hello,
    check_options,
    checked_timeout,
    hello_arguments,
    rank_layout,
    rank_layout_refusal,
)
from kvpager.client_kv import KVAccess
from kvpager.client_lifetime import (  # noqa: F401 (EXIT_WAIT, SERIALIZED: their names here)
    _LIVE,
    EXIT_WAIT,
    SERIALIZED,
    _dropped,
    _dropped_quiet,
    hook_process_exit,
    serialize,
)
from kvpager.client_seqs import ClientSequences
from kvpager.client_staging import ClientStaging
from kvpager.client_tables import TableMirror
from kvpager.client_wire import ClientWire, beat_interval, heartbeat_loop
from kvpager.endpoints import AT_CAP, endpoint_or_default, probe
from kvpager.errors import (
    DaemonUnavailable,
    InvalidArgument,
    ProtocolError,
    RequestTimeout,
    SessionLost,
)
from kvpager.protocol import OPS
from kvpager.release_count import map_release_count
from kvpager.spec import PoolSpec

log = logging.getLogger("kvpager.client")


class Client(ClientWire, ClientSequences, ClientBatch, KVAccess, ClientStaging, ControlMethods):
    """A session with the kvpager daemon at ``endpoint`` (default: KVPAGER_ENDPOINT,
    else the private ipc:// socket). Every call waits at most ``timeout`` seconds
    (default KVPAGER_TIMEOUT) for its reply, and for that of a request of this
    client that timed out before it (`RequestTimeout`, settled first); threads
    sharing a client make their calls one at a time, each after those before it
    (against a stalled daemon, the n-th waits about n timeouts). ``token``: the daemon's token, if it has one
    (default KVPAGER_TOKEN, else the file KVPAGER_TOKEN_FILE). ``control_token``:
    the daemon's control token, for quotas and kept pins (default
    KVPAGER_CONTROL_TOKEN, else the file KVPAGER_CONTROL_TOKEN_FILE). Raises
    DaemonUnavailable if nothing listens, Unauthorized without the right token.
    ``name``: this session's client name in the daemon's session list (default
    ``host:pid``; the daemon bounds its length, KVPAGER_MAX_CLIENT_NAME).
    ``rank``: on a tensor-parallel daemon (``kvpager serve --devices``), the rank
    this worker serves: it maps that rank's storage only, and `spec`, `kv`,
    `write`, `attend` and `plan` are over that rank's kv heads. ``driver``:
    with ``rank`` on a pool of several ranks, the session it works for (the
    one that allocates: its `Client`, or that client's ``session`` secret,
    passed to the worker): its writes go into that session's sequences only;
    one worker a rank of a driver (`RankTaken`), and the worker's session ends
    with the driver's (docs/protocol.md, "Ranks"). ``quiet``: an inspection (a
    monitoring loop): the daemon logs this session's open and clean end at debug."""

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
        driver: Any = None,
        quiet: bool = False,
    ):
        self.endpoint = endpoint_or_default(endpoint)
        check_options(name, token, control_token, rank, quiet)
        secret = None
        if driver is not None:  # the session this rank worker writes for: its secret, or its Client
            secret = driver.session if isinstance(driver, Client) else driver
            if not isinstance(secret, str) or rank is None:
                raise InvalidArgument("driver: the session (its Client, or Client.session) a rank worker writes "
                                      f"for, given with rank; got {type(driver).__name__}"
                                      + ("" if rank is not None else " without a rank"))
        # (`driver` given as its Client is followed: a reconnect says its current session)
        self._driver = weakref.ref(driver) if isinstance(driver, Client) else None
        self.timeout = checked_timeout(timeout)
        why = probe(self.endpoint)
        if why is not None:
            raise DaemonUnavailable(
                f"the kvpager daemon at {self.endpoint} takes no new connections now ({why})" if why.startswith(AT_CAP)
                else f"no kvpager daemon at {self.endpoint} ({why}); start one with `kvpager serve` "
                "or point KVPAGER_ENDPOINT at a running one"
            )
        self._hello_args = hello_arguments(name, token, control_token, rank, secret, quiet)
        self._lock = threading.RLock()  # a call and its mirror update whole (`SERIALIZED`), its socket
        self._ids = itertools.count(1)
        # (id, bytes, op) of a RETRIED_OPS request that timed out, until its outcome is known
        self._unsettled: tuple[int, bytes, str] | None = None
        self._waiting: int | None = None  # the thread whose call waits for its reply (`_wait_reply`)
        self._depth = 0  # calls of `SERIALIZED` methods under way in the thread holding the lock
        self._close_after = False  # a `close` made while a call waited: made once that call is done
        #: sequences whose free was never sent (an earlier request's settling timed out): freed after it
        self._orphans: list[list[int]] = []
        self._chan = Channel(self.endpoint)
        #: the session's secret: sent with every request, shown nowhere
        self.session: str | None = None
        #: the session's public name: the owner of its sequences in `sequences()`
        self.session_name: str | None = None
        self.epoch: str | None = None
        self._closed = False
        self._pid = os.getpid()  # the process whose socket this is (`_forked`)
        # True once the session is known lost or closed: the mirror is not read
        # again (set by the heartbeat thread too, which never touches the mirror).
        self._lost = False
        #: ids this client's sequences had in its sessions lost since (`_check_held_before`)
        self._held_before: set[int] = set()
        self._want_map, self._want_heartbeat = map_pool, heartbeat
        _LIVE.add(self)
        hook_process_exit()
        self._hb_stop = threading.Event()
        self._hb: threading.Thread | None = None
        self._finalizer: weakref.finalize | None = None
        # (session, ids) to free at the next call, whose owner could not call (`free_later`)
        self._later: deque[tuple[str | None, list[int]]] = deque()
        try:
            self._hello()
        except BaseException:  # a refused hello: no session, and no socket left to the garbage collector
            self._chan.close()
            raise

    def _hello(self) -> None:
        """Open a session: its secret, the pool's geometry and memory, heartbeats."""
        driver = self._driver() if self._driver is not None else None
        if driver is not None and isinstance(driver.session, str):  # (a driver that reconnected: its new one)
            self._hello_args["driver"] = driver.session
        try:
            info = ask_hello(self._call, self._hello_args)
        except RequestTimeout as e:  # (its socket stays: `__init__` closes it, a `reconnect` may try again)
            raise DaemonUnavailable(f"no kvpager daemon answers at {self.endpoint}: {e}") from None
        self._check_rank_layout(info)
        try:
            self._take_hello(info)
        except (TypeError, KeyError, AttributeError, ValueError, IndexError) as e:
            raise ProtocolError(f"{self.endpoint} answered hello with no kvpager daemon's reply "
                                f"({type(e).__name__}: {e})") from None
        if self.rank is not None and self._rank_layout is None:
            self._rank_layout = rank_layout(self.ranks, self.spec)
        self._mirror = TableMirror(self.spec.block_size)  # this session's block tables
        # (slots checked in an earlier session are not this one's: `_check_own_slots`, `_check_driver_slots`)
        self._own_slots = self._driver_slots = None
        self.map_pool = self._want_map and self.memory.get("kind") in ("shm", "cuda_ipc")
        if self.map_pool:  # the sessions the daemon ended, counted from now (`_check_not_ended`)
            self._releases = map_release_count(self.memory.get("releases"))
            self._ends_seen = int(self._releases[1]) if self._releases is not None and len(self._releases) > 1 else 0
        self._mapped: Any = None  # NumpyBackend (shm) or CupyBackend (cuda_ipc) over the pool
        self._memory_gone = False
        self._staging: Any = None  # shm Segment or cuda_ipc DeviceBuffer
        self._device_index: int | None = None
        if self._want_heartbeat:
            # The thread holds the client weakly: a client dropped without `close` is collected,
            # and its thread then ends its session (`heartbeat_loop`); it held the client for good.
            self._hb_stop, gone = threading.Event(), threading.Event()
            self._hb = threading.Thread(target=heartbeat_loop, args=(weakref.ref(self), self._hb_stop, gone,
                                                                    self.session, self.endpoint,
                                                                    self.heartbeat_timeout),
                                        name="kvpager-heartbeat", daemon=True)
            if self._finalizer is not None:  # (a reconnect's new thread: the last one's is done)
                self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _dropped, self._hb_stop, gone, self.session, self.endpoint,
                                               max(beat_interval(self.heartbeat_timeout), 1.0))
            self._finalizer.atexit = False  # (at exit `_close_at_exit` closes it)
            self._hb.start()
        else:  # no thread to end it: a client collected without `close` says bye from a thread of its own
            if self._finalizer is not None:  # (a reconnect's: the last session is ended)
                self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _dropped_quiet, self.session, self.endpoint,
                                               self.timeout)
            self._finalizer.atexit = False  # (at exit `_close_at_exit` closes it)

    def _take_hello(self, info: dict[str, Any]) -> None:
        """The session, geometry, memory and options of a ``hello`` reply."""
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
        if not isinstance(self.memory, dict):
            raise TypeError(f"its memory must be a map, got {type(self.memory).__name__}")
        self.heartbeat_timeout: float = info["heartbeat_timeout"]
        self.max_message_bytes: int = info["max_message_bytes"]
        self.server_pid: int | None = info.get("server_pid")
        #: the daemon's remote tier (kind, url, ttl), or None (also from a daemon that predates it)
        self.remote: dict[str, Any] | None = info.get("remote")
        self.control: bool = bool(info.get("control"))  # quotas and kept pins allowed
        #: allocate and cached_tokens take `window` (a daemon that predates it: prefix hits only)
        self.windowed_hits: bool = bool(info.get("windowed_hits"))
        #: tables takes a step plan's slots and checks them (a rank worker's plans; a daemon that predates it: no)
        self.plan_slots: bool = bool(info.get("plan_slots"))
        #: the ops the daemon answers; a daemon that predates the list answers every op
        #: but `record_tokens`, which came with it
        self.ops: frozenset[str] = frozenset(info["ops"] if "ops" in info else set(OPS) - {"record_tokens", "batch"})
        self.gpu = self.memory.get("kind") == "cuda_ipc"
        #: the word of the mapped counts that counts the commits of the session whose sequences this
        #: one writes (its driver's, or its own); None: a daemon that predates it
        word = info.get("commit_word")
        self._commit_word: int | None = word if type(word) is int and word >= 2 else None

    def _check_rank_layout(self, info: dict[str, Any]) -> None:
        """`client_hello.rank_layout_refusal` of a hello reply: the new session ended
        and InvalidArgument raised; the client keeps its geometry and stays lost."""
        why = rank_layout_refusal(self._rank_layout, info, self.endpoint)
        if why is None:
            return
        self.session = info["session"]
        try:
            self._bye()
        finally:
            self.session = None
        raise InvalidArgument(why)

    _rank_layout: tuple[int, int, int] | None = None

    def reconnect(self) -> None:
        """A new session after `SessionLost` (the daemon restarted, or dropped this
        session): the old session's sequences are gone, and so is everything
        mapped from a restarted daemon; this client's ids, tables and mappings
        start afresh from the new hello. Called while its session is still open,
        it says bye for it first (its sequences freed, a rank worker's rank free
        for the new session)."""
        if self._closed:
            raise SessionLost("this client is closed")
        self._check_process()
        open_before = not self._lost and self.session is not None
        self._stop_heartbeat()
        self._hb = None
        if self._staging is not None:
            self._staging.close()
        self._forget_session()
        if open_before:  # (called while its session was open: it held its sequences, and a rank
            self._bye()  # worker its rank, RankTaken to the new hello, until its heartbeats ran out)
        self._forget_memory()
        self._unsettled = None
        self._orphans.clear()  # (the session they were held in is gone)
        self._later.clear()
        self._chan.reset()
        self.session = self.session_name = None
        self._hello()  # (until it succeeds the session stays lost: a failed one can be tried again)
        self._lost = False

    def close(self) -> None:
        """Say bye (the daemon frees this session's sequences) and close the socket."""
        if self._closed:
            return
        if self._forked():  # a child's copy: the parent's socket and session are not its to end
            self._closed = self._lost = True
            return
        if self._waiting == threading.get_ident():  # (a signal handler's, while a call of this thread waits:
            self._close_after = True  # its socket and mirror in use, closed under it: a ZMQError) kept for later
            return
        self._stop_heartbeat()
        if self._staging is not None:  # unmapped before bye frees it on the daemon
            self._staging.close()
            self._staging = None
        self._forget_session()
        self._unsettled = None  # bye frees whatever it created
        self._orphans.clear()
        self._later.clear()  # (bye frees them)
        if self._finalizer is not None:  # (said here)
            self._finalizer.detach()
        self._bye()
        self._closed = True
        self._chan.close()
        if not getattr(self, "gpu", True):  # (its views of the pool's segments: a closed client keeps no mapping alive by itself)
            self._mapped = None

    def _bye(self) -> None:
        """End this client's session on the daemon (it frees its sequences), unless
        the daemon was found gone and still is: a bye would wait out the whole
        timeout for nothing (`kvpager top` hung 10 s after its error line)."""
        if not (self._chan.gone and probe(self.endpoint) is not None):
            try:
                self._call("bye", {})
            except Exception as e:
                log.debug("bye failed: %s", e)

    def _stop_heartbeat(self) -> None:
        """Stop the heartbeat thread, waiting at most this client's timeout for a beat in
        flight (close against a stalled daemon waited 5 s past a timeout of 0.5 before;
        a thread that outlives the wait ends at its next wake-up: `heartbeat_loop`)."""
        self._hb_stop.set()
        if self._hb is not None:
            self._hb.join(min(5.0, self.timeout))

    def __enter__(self) -> Client:
        return self

    def _not_copied(self, *args: object) -> Any:
        """A client is one session over one socket, with its heartbeat thread and its
        mirror of the daemon's tables: a copy shared them (closing it closed the
        other's socket, whose next call raised zmq's own error), pickling failed on
        a lock with a TypeError. Refused by name."""
        raise InvalidArgument("a Client cannot be copied or pickled (it is one session over one socket); open "
                              "another Client with the same endpoint, in this process or the other")

    __copy__ = __deepcopy__ = __reduce_ex__ = _not_copied

    def __exit__(self, *exc: object) -> None:
        self.close()

    def heartbeat(self) -> None:
        self._call("heartbeat", {})

    def free_later(self, seq_ids: Any, session: str | None) -> None:
        """Free ``seq_ids`` of ``session`` at this client's next call, if that is
        still its session (a reconnect since gave their ids to other sequences),
        ids no longer live left out: for a finalizer (a `kvpager.hf.PagedCache`
        collected without `close`), which may run in the middle of a call of this
        very thread, where a request would take that call's reply."""
        self._later.append((session, [int(s) for s in seq_ids]))


serialize(Client)
