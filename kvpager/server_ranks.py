"""The daemon's side of tensor parallelism (`kvpager.backends.ranked`).

One daemon serves one pool over R ranks (the GPUs of a TP group): one
allocator, one block table per sequence, and one memory export per rank: a
shared-memory segment pair on the CPU, a CUDA IPC handle of the rank's slab
on a GPU. A worker names its rank in hello (``rank``), and the session it
works for (``driver``, `hello_driver`); the reply carries that rank's memory
and the pool's rank count, and the session's remote write / attend run on
that rank's heads. A session that names no rank, on a pool of several, can
use every sequence op but maps nothing and cannot write or attend: it is
told to name a rank (see docs/protocol.md, "Ranks").
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import TYPE_CHECKING, Any

from kvpager import cuda_ipc
from kvpager.backends import make_backend
from kvpager.backends.ranked import RankedBackend, check_devices, make_ranked_backend, rank_spec
from kvpager.errors import InvalidArgument, KVPagerError, SessionLost
from kvpager.pool import KVPool
from kvpager.release_count import ReleaseCount
from kvpager.shm import PoolMemory, create_ranks, sweep_stale
from kvpager.spec import PoolSpec

if TYPE_CHECKING:
    from kvpager.pool_rank import PoolRank
    from kvpager.sessions import Session, SessionTable


log = logging.getLogger("kvpager.server")

#: a session's public name (`kvpager.sessions.SessionTable.open`); a secret never looks like one
_PUBLIC_NAME = re.compile(r"s[0-9]+")


def create_pool(spec: PoolSpec, device: str, devices: Any, epoch: str, **pool_args: Any
                ) -> tuple[KVPool, PoolMemory | None, list[PoolMemory] | None]:
    """The daemon's pool: (pool, its shared memory, or each rank's on a
    tensor-parallel CPU pool). ``devices`` (None: ``device`` alone) as `KVPool`'s."""
    if devices is not None:
        devices = check_devices(devices)
        if len(devices) == 1:
            device, devices = devices[0], None
    if devices is None:
        if device != "cpu":
            return KVPool(spec, backend=make_backend(spec, device), **pool_args), None, None
        sweep_stale()
        memory = PoolMemory.create(spec, epoch)
        try:
            return KVPool(spec, backend=memory.backend(), **pool_args), memory, None
        except BaseException:
            memory.close()
            raise
    rank_spec(spec, len(devices))  # heads divisible, before anything is made
    if devices[0] != "cpu":
        backend = make_ranked_backend(spec, devices)
        try:
            return KVPool(spec, backend=backend, **pool_args), None, None
        except BaseException:
            backend.close()
            raise
    sweep_stale()
    memories = create_ranks([rank_spec(spec, len(devices), r) for r in range(len(devices))], epoch)
    try:
        return KVPool(spec, backend=RankedBackend(spec, [m.backend() for m in memories]), **pool_args), None, memories
    except BaseException:
        for m in memories:
            m.close()
        raise


def rank_backends(pool: KVPool) -> list[Any]:
    """Each rank's backend (one for a one-rank pool)."""
    return list(getattr(pool.backend, "ranks", None) or [pool.backend])


def hello_rank(pool: KVPool, value: Any) -> int | None:
    """The rank a hello names, checked (None: none named)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < pool.ranks:
        raise InvalidArgument(f"hello: rank must be an int in [0, {pool.ranks}) (this pool has "
                              f"{pool.ranks} rank{'s' if pool.ranks > 1 else ''}), got {value!r}")
    return value


def hello_driver(sessions: SessionTable, rank: int | None, driver: Any) -> Session | None:
    """The session a rank worker writes for besides its own (``driver``: that
    session's secret, which its own workers are given; a rank session wrote
    into any session's sequences before). None where none is named;
    InvalidArgument for one without a rank, not a string or a session's public
    name (no retry finds that one open), SessionLost for one that is not open
    (saying it is the driver's: a worker read that its own was lost). The
    driver's heartbeat clock is left alone: a worker's hello kept a driver
    whose process was gone open for good."""
    if driver is None:
        return None
    if rank is None or not isinstance(driver, str):
        raise InvalidArgument("hello: driver is the session (its secret) whose sequences a tensor-parallel rank "
                              "worker writes into, given with rank; got "
                              + (type(driver).__name__ if rank is not None else "no rank"))
    found = sessions.find(driver)
    if found is None and _PUBLIC_NAME.fullmatch(driver):
        # A session's public name (Client.session_name, `kvpager sessions`), not its secret: told as
        # session_lost ("the driver ... is not open"), a worker reconnected on it again and again
        raise InvalidArgument(f"hello: driver {driver!r} is a session's public name; a rank worker names its "
                              "driver by the session's secret (the driver's Client, or its Client.session)")
    if found is None:
        err = SessionLost("hello: the driver named (the session this rank worker would write for) is not open "
                          "on this daemon: it said bye, missed heartbeats or the daemon restarted; give the "
                          "driver's current session (its Client, or Client.session after its reconnect)")
        err.epoch = sessions.epoch
        raise err
    return found


def hello_memory(server: Any, rank: int | None) -> dict[str, Any]:
    """The hello reply's ``memory`` for a session of ``rank``: what to map, and
    (``releases``) the daemon's count of releases, which a mapped worker's plans
    over other sessions' sequences follow (`kvpager.plan_guard.Foreign`)."""
    pool = server.pool
    if pool.ranks > 1 and rank is None:
        return {"kind": "ranks", "ranks": pool.ranks}  # nothing to map without a rank
    r = rank or 0
    if server.rank_memory is not None:
        memory = server.rank_memory[r].handles()
    elif server.memory is not None:
        memory = server.memory.handles()
    elif server.gpu is not None:
        if r not in server._exported:
            server._exported[r] = cuda_ipc.pool_handles(rank_backends(pool)[r], server.epoch)
        memory = dict(server._exported[r])
    else:
        return {"kind": "none"}
    if server.releases is not None:
        memory["releases"] = server.releases.handle()
    return memory


def release_count(server: Any) -> ReleaseCount | None:
    """The daemon's count of releases, in shared memory, where workers map its pool
    (None where none can): the pool's `Moves` moves it from now on."""
    if server.memory is None and server.rank_memory is None and server.gpu is None:
        return None
    try:
        count = ReleaseCount(server.epoch)
    except (OSError, KVPagerError) as e:  # a GPU daemon needs no /dev/shm otherwise: it still serves
        log.warning("no count of releases for workers (%s): their step plans over other sessions' "
                    "sequences recheck only when their own sequences change", e)
        return None
    server.pool.backend.moves.shared = count.array
    return count


def close_release_count(server: Any) -> None:
    """The pool stops moving the count (it may outlive the daemon), then the count goes."""
    if server.releases is not None:
        server.pool.backend.moves.shared = None
        server.releases.close()
        server.releases = None


def session_kv(server: Any, s: Session, op: str) -> KVPool | PoolRank:
    """Where a session's remote write / attend run: the pool, or its rank's view."""
    pool = server.pool
    if pool.ranks == 1:
        return pool
    if s.rank is None:
        raise InvalidArgument(f"{op}: this pool has {pool.ranks} tensor-parallel ranks: open the session "
                              "with the rank this worker serves (Client(rank=r)) to write or attend")
    return pool.rank(s.rank)


def on_rank_device(server: Any, s: Session) -> Any:
    """A context with the session's rank's GPU current (a no-op on the CPU and
    with one rank): its staging copies and kernels run there."""
    if server.gpu is None or server.pool.ranks == 1 or s.rank is None:
        return contextlib.nullcontext()
    import cupy

    return cupy.cuda.Device(server.sessions.rank_devices[s.rank])
