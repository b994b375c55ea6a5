"""The K/V half of `Client`: the daemon's pool mapped here, local K/V and step plans.

The pool is mapped once per process: POSIX shared memory on a CPU pool
(`kvpager.shm`, NumPy views), CUDA IPC on a GPU pool (`kvpager.cuda_ipc`,
CuPy views running the kvpager kernels here). `write` and `attend` run here
when the pool is mapped, else through the session's staging buffer
(`kvpager.client_staging`); step plans are built here from the mirror of this
session's block tables.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from kvpager import cpu_attention, cuda_ipc, validate
from kvpager.attend_options import check_scale, check_sinks, check_softcap, check_window, chunk_step
from kvpager.client_ids import as_ids, id_list
from kvpager.client_slots import SlotChecks
from kvpager.errors import DaemonUnavailable, InvalidArgument, SessionLost, StalePlan
from kvpager.plan import StepPlan, check_floor, check_queries, context_of, make_plan, table_floor
from kvpager.plan_guard import REMEDY, Foreign, Moves, check_positions, sequence_guard
from kvpager.plan_numpy import from_numpy, to_numpy
from kvpager.release_count import map_release_count
from kvpager.shm import SegmentMissing, map_pool


class KVAccess(SlotChecks):
    """Mixin of `Client`: needs ``spec``, ``memory``, ``gpu``, ``map_pool``, ``server_pid``,
    ``_mapped``, ``_device_index``, ``_closed``, ``_lost``, ``_mirror``, ``_lock``, ``_hello_args``, ``tables``
    and the staging path's ``remote_write`` / ``remote_attend``; what it may write: `SlotChecks`."""

    def write(self, layer: int, slots: Any, k: Any, v: Any) -> None:
        """As `KVPool.write`: through the mapped pool when there is one, else remote."""
        if self.map_pool:
            self.local_write(layer, slots, k, v)
        else:
            self.remote_write(layer, slots, k, v)

    def attend(self, layer: int, seq_ids: Any, q: Any, query_lens: Any = None, scale: float | None = None,
               *, window: int | None = None, softcap: float | None = None, sinks: Any = None,
               chunk: int | None = None) -> Any:
        """As `KVPool.attend` (``window`` / ``softcap`` / ``sinks`` / ``chunk`` included): computed
        here over the mapped pool when there is one (block tables from this client's mirror,
        no round trip), else by the daemon."""
        if self.map_pool:
            return self.local_attend(layer, seq_ids, q, query_lens, scale, window=window, softcap=softcap,
                                     sinks=sinks, chunk=chunk)
        return self.remote_attend(layer, seq_ids, q, query_lens, scale, window=window, softcap=softcap,
                                  sinks=sinks, chunk=chunk)

    def plan(self, seq_ids: Any, query_lens: Any = None, slots: Any = None, *, context_lens: Any = None,
             **options: Any) -> StepPlan:
        """As `KVPool.plan` (``context_lens`` included): a step plan over the mapped pool,
        built here from this client's mirror of its block tables (no round trip for its
        own sequences), then ``plan.write(layer, k, v)`` and ``plan.attend(layer, q)`` per
        layer run here too. A snapshot: make a new one after the sequences change."""
        seq_ids = as_ids(seq_ids)
        backend = self._pool()
        ids = id_list(seq_ids)
        follows = self._follows(ids)  # (read before the tables: a change during their round trip is seen)
        tables, seq_lens = self._plan_tables(seq_ids, slots, "plan")
        seq_lens = context_of(np.asarray(seq_lens), context_lens)
        query_lens, slots = self._check_step(ids, tables, seq_lens, query_lens, slots)
        plan = make_plan(backend, tables, seq_lens, query_lens, slots, **options)
        self._tie(plan, ids, follows, tables)
        return plan

    def refill(self, plan: StepPlan, seq_ids: Any, query_lens: Any = None, slots: Any = None, *,
               context_lens: Any = None) -> None:
        """As `KVPool.refill`: `StepPlan.update` from this client's tables of
        ``seq_ids``, the plan staying tied to them (it refuses its calls once they
        change under it: `kvpager.plan_guard`)."""
        if not isinstance(plan, StepPlan) or plan.backend is not self._pool():
            raise InvalidArgument(f"refill: {type(plan).__name__} is no step plan of this client's mapped pool")
        seq_ids = as_ids(seq_ids)
        ids = id_list(seq_ids)
        follows = self._follows(ids)
        tables, seq_lens = self._plan_tables(seq_ids, slots, "refill")
        seq_lens = context_of(np.asarray(seq_lens), context_lens)
        query_lens, slots = self._check_step(ids, tables, seq_lens, query_lens, slots)
        plan.update(tables, seq_lens, query_lens, slots)
        self._tie(plan, ids, follows, tables)

    def _check_step(self, ids: list[int] | None, tables: Any, seq_lens: np.ndarray, query_lens: Any,
                    slots: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """A plan's query lengths and slots, checked before it is made or refilled: its
        slots this session's to write (`_check_plan_slots`), each its own query token's
        position (`kvpager.plan_guard.check_positions`; not committed, where the mirror
        has the sequences)."""
        if query_lens is not None and ids is not None:
            query_lens = validate.per_seq(query_lens, len(ids), "query_lens")
        query_lens, slots = check_queries(self.spec, seq_lens, query_lens, slots)
        self._check_plan_slots(slots)
        if slots is not None and ids is not None:
            check_positions(ids, np.asarray(tables), seq_lens, query_lens, slots, self.spec.block_size,
                            None if self._lost else self._mirror.committed_of(ids))
        return query_lens, slots

    def _follows(self, ids: list[int] | None) -> tuple[Moves | Foreign, int] | None:
        """The count a plan over ``ids`` follows (`kvpager.plan_guard`) and its value
        now, read before the plan's tables are: a release, or a rank worker's
        driver's commit, while their round trip is under way moved it after the
        daemon's check and before the plan was tied (its writes then went into
        blocks the commit published, unasked). Its own sequences: its changes and
        the sessions the daemon ended; others' too: their releases, and a rank
        worker's driver's commits."""
        if ids is None:
            return None
        mirror = self._mirror
        moves: Moves | Foreign = mirror.moves
        if self._releases is not None and self._writes_for_driver():
            # a rank worker's plan, over its own sequences too: its slots may be its driver's (checked by the
            # daemon when made), which the driver's free or commit takes from it with no change of its own
            moves = Foreign(mirror.moves, self._releases, tuple(self._followed()))
        elif self._releases is not None and not all(i in mirror.rows for i in ids):
            moves = Foreign(mirror.moves, self._releases, (0,))
        elif self._releases is not None and len(self._releases) > 1:
            moves = Foreign(mirror.moves, self._releases, (1,))
        return moves, moves.count

    def _tie(self, plan: StepPlan, ids: list[int] | None, follows: tuple[Moves | Foreign, int] | None,
             tables: np.ndarray) -> None:
        """Tie ``plan`` to the sequences ``ids`` (its floor, and its guard), following
        ``follows`` (`_follows`, read before its ``tables``) from the count it had then.
        Its floor (the first position each sequence still holds) from the mirror, or,
        for sequences it does not mirror (a rank worker's driver's), from their
        tables: it was none, and an attend past a released block's start read the
        null block's zeros silently where `KVPool.plan` refuses it."""
        if ids is None or follows is None:
            return
        mirror = self._mirror
        mirrored = not self._lost and all(i in mirror.rows for i in ids)
        plan.floor = mirror.floors(ids) if mirrored else table_floor(np.asarray(tables), self.spec.block_size)
        session = self.session

        def rows_now(ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            # A plan of an earlier session (before a reconnect): a restarted daemon gives the same ids,
            # tables and slots again, and the plan's memory is the old daemon's (its writes went nowhere)
            if self.session != session:
                raise StalePlan("this step plan was made in an earlier session of this client (before a "
                                f"reconnect): its sequences and memory are gone; {REMEDY}")
            return self._rows_now(ids)

        plan.guard_with(sequence_guard(ids, rows_now), *follows)

    def _rows_now(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The tables, lengths and committed token counts of ``ids`` now: a step
        plan's guard's (`kvpager.plan_guard`); from the mirror, else the daemon.
        SessionLost where the daemon ended this session (`_check_not_ended`). Under the
        client's lock, as the calls that change the mirror are (`SERIALIZED`): a plan's
        layers are not, and a free of its sequence in another thread between the mirror's
        reads of them raised KeyError from the plan's write or attend."""
        with self._lock:
            self._check_not_ended()
            got = None if self._lost else self._mirror.rows_now(ids)
            if got is not None:
                return got
            tables, lens = self.tables(ids)
            infos = self._infos(ids)  # one round trip for them all (but where they pass the message limit)
            return tables, lens, np.array([info.num_committed for info in infos], np.int64)

    def synchronize(self) -> None:
        """As `KVPool.synchronize`: wait for this process's writes into the mapped
        pool to land (`commit` does it on a GPU pool). On a GPU: every stream of
        this process on the pool's device. On the CPU mapping they land when the
        write returns, so there is nothing to wait for."""
        if self.gpu and cuda_ipc.in_use():
            cuda_ipc.synchronize(self._device())

    def kv(self, layer: int) -> tuple[Any, Any]:
        """Zero-copy views of one layer's K and V in the daemon's pool, each
        [num_blocks, num_kv_heads, block_size, head_dim]: NumPy arrays on a CPU
        pool, CuPy arrays on a GPU pool."""
        self._check_layer(layer)
        self._check_views()
        return self._pool().layer_kv(int(layer))

    def torch_kv(self, layer: int) -> tuple[Any, Any]:
        """`kv` as torch tensors (``torch.from_dlpack``, no copy), on the pool's device
        (an FP8 pool: torch.float8_e4m3fn / float8_e5m2 views of the stored bytes)."""
        import torch

        out = []
        fp8 = {"float8_e4m3": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}.get(self.spec.kv_dtype or "")
        for x in self.kv(layer):
            if fp8 is not None:  # the raw bytes, as torch's float8 type (DLPack has no FP8)
                out.append(torch.from_dlpack(x.view(np.uint8)).view(fp8))
                continue
            t = torch.from_dlpack(x)
            if self.spec.dtype == "bfloat16" and t.dtype != torch.bfloat16:
                t = t.view(torch.bfloat16)  # a CuPy without bfloat16 stores its bits as uint16
            out.append(t)
        return out[0], out[1]

    def device_array(self) -> Any:
        """The whole device pool [num_blocks, layers, 2, kv_heads, block_size, head_dim], mapped."""
        self._check_views()
        return self._pool().kv

    def host_array(self) -> np.ndarray:
        """The whole host (swap) pool, mapped (CPU pools only: a GPU daemon keeps its own)."""
        if self.gpu:
            raise InvalidArgument("the host (swap) pool of a GPU daemon is not mapped into workers")
        self._check_views()
        return self._pool().host_kv

    def _check_views(self) -> None:
        """Before views of the mapped pool are handed out: SessionLost where this client
        is closed or its session lost (a restarted daemon's session_lost, found by the
        heartbeat thread: the mapping is the dead daemon's memory; else blocks the
        daemon gave to other sessions), InvalidArgument in a forked child. Once mapped,
        `kv` handed the views out regardless, where every other call refuses."""
        if self._closed:
            raise SessionLost("this client is closed")
        self._check_process()
        if self._lost:
            raise SessionLost("this session is lost: its sequences (and their blocks) are the daemon's again, "
                              "and a restarted daemon's memory is not the mapped one; reconnect() first")

    def local_write(self, layer: int, slots: Any, k: Any, v: Any) -> None:
        """Write K/V straight into the mapped pool (no daemon round trip; a rank
        worker's into its driver's sequences: one when its slots or the driver's
        blocks changed, `_check_driver_slots`). On a GPU the write is queued on
        this process's current CuPy stream: `commit` waits for it."""
        self._check_layer(layer)
        if self._lost:
            self._check_process()  # a forked child's copy writes nothing (its parent's tables and session)
        pool = self._pool()
        slots = self._check_slots(slots)
        if not self._writes_for_driver():
            self._check_own_slots(slots)
        else:  # a rank's worker writes its heads into the driver's sequences ("Ranks"): the daemon checks
            self._check_driver_slots(slots)
        shape = (len(slots), self.spec.num_kv_heads, self.spec.head_dim)
        pool.write(int(layer), slots, self._check_tensor(k, "k", shape), self._check_tensor(v, "v", shape))

    def local_attend(self, layer: int, seq_ids: Any, q: Any, query_lens: Any = None, scale: float | None = None,
                     *, window: int | None = None, softcap: float | None = None, sinks: Any = None,
                     chunk: int | None = None) -> Any:
        """Paged attention here, over the mapped pool (the CUDA kernels on a GPU
        pool: the result is a CuPy array). Block tables come from `tables`: this
        client's mirror for its own sequences, so a layer costs no round trip."""
        self._check_layer(layer)
        self._check_not_ended()  # (stopped past its timeout: its blocks may be another session's now)
        pool = self._pool()
        seq_ids = as_ids(seq_ids)
        tables, lens = self._tables(seq_ids, "attend")
        qlens = validate.query_lens(query_lens, id_list(seq_ids) or list(range(len(lens))), lens)  # (as KVPool)
        qlens = qlens.astype(np.int32)  # (each within its sequence's length)
        torch_q = type(q).__module__.startswith("torch")  # (answered in kind, as `KVPool.attend`)
        q = self._check_q(q, int(qlens.sum()))
        scale = check_scale(scale, self.spec.head_dim)
        window, softcap = check_window(window), check_softcap(softcap)
        if chunk is not None:  # rows of one chunk each (`kvpager.attend_options.chunk_step`)
            tables, lens, qlens = chunk_step(tables, lens, qlens, chunk, self.spec.block_size)
        # as KVPool.attend: no query may read a released entry (the null block's K/V, read silently)
        check_floor(table_floor(tables, self.spec.block_size), lens, qlens, window)
        if self.gpu:
            return pool.attend(int(layer), q, tables, lens, np.ascontiguousarray(qlens), scale,
                               window=window, softcap=softcap, sinks=sinks)
        out = cpu_attention.attend(pool.kv, int(layer), q, tables, lens, qlens, scale, window=window,
                                   softcap=softcap, kv_scales=pool.scales, sinks=check_sinks(sinks, q.shape[1]))
        return from_numpy(out) if torch_q else out

    def _pool(self) -> Any:
        if self._mapped is None:
            with self._lock:  # (`kv` is not serialized: two threads' first calls mapped the pool twice)
                return self._map()
        return self._mapped

    def _map(self) -> Any:
        """The pool mapped once (`_pool`, under the client's lock)."""
        if self._mapped is None:
            if self._memory_gone:  # (`ClientWire._forget_memory`: it mapped the views of a dead pool again)
                raise SessionLost("the daemon this client mapped is gone (it restarted): its memory is stale; "
                                  "reconnect() or open a new Client")
            kind = self.memory.get("kind")
            if kind == "ranks":
                raise InvalidArgument(
                    f"the daemon's pool has {self.memory.get('ranks')} tensor-parallel ranks, each holding a "
                    "share of the kv heads: open the client with the rank this worker serves (Client(rank=r))")
            if kind not in ("shm", "cuda_ipc"):
                raise InvalidArgument(
                    f"the daemon's pool is not mappable here (memory kind {kind!r}); "
                    "use remote_write / remote_attend"
                )
            if self._closed:
                raise SessionLost("this client is closed")
            if self._lost:  # (its daemon gone or restarted: no memory of this session's to map)
                raise SessionLost("this session is lost: its sequences (and their blocks) are the daemon's again, "
                                  "and a restarted daemon's memory is not the one it named; reconnect() first")
            try:  # (a segment missing: the daemon unlinked its memory as it stopped)
                mapped = map_pool(self.spec, self.memory) if kind == "shm" else \
                    cuda_ipc.map_pool(self.spec, self.memory, self._same_process())
            except SegmentMissing as e:  # (an InvalidArgument, as if the caller had named it)
                raise DaemonUnavailable(f"the daemon's pool memory is gone ({e}): the daemon stopped; "
                                        "reconnect() once it runs again") from None
            self._mapped = mapped
            # the mirror's changes move the count the plans over this mapping follow
            self._mirror.moves = mapped.moves
            self._releases = map_release_count(self.memory.get("releases"))  # (mapped at hello: the same)
        return self._mapped

    def _same_process(self) -> bool:
        """Whether the daemon runs in this process (a thread): CUDA IPC handles
        cannot be opened by their own process, so its pointers are used as they are."""
        return self.server_pid == os.getpid()

    def _device(self) -> int:
        """This process's index of the pool's GPU (BackendUnavailable naming both
        GPUs if it is not visible here)."""
        if self._device_index is None:
            self._device_index = cuda_ipc.find_device(self.memory["device_uuid"])
        return self._device_index

    def _as_array(self, x: Any, name: str) -> Any:
        """A tensor argument as this pool's array type: NumPy (CPU pool) or a CuPy
        array on the pool's GPU (GPU pool: CuPy, torch through DLPack, or NumPy copied over)."""
        dt = self.spec.np_dtype
        if self.gpu:
            dev = self._device()
            storage = self._mapped.dtype if self._mapped is not None else dt
            return cuda_ipc.to_device(x, name, storage, dev)
        if not isinstance(x, np.ndarray):  # a CPU torch tensor as NumPy, as `KVPool` takes one (was refused)
            x = to_numpy(x, name, dt)[0]
        if x.dtype != dt:
            raise InvalidArgument(f"{name} must be a numpy array of dtype {self.spec.dtype}, "
                                  f"got {getattr(x, 'dtype', type(x).__name__)}")
        return x

    def _check_layer(self, layer: Any) -> None:
        if type(layer) is not int or not 0 <= layer < self.spec.num_layers:  # (a plain int in range: at once)
            validate.layer(layer, self.spec)

    #: True once the memory of a daemon found gone was forgotten, until the next hello
    _memory_gone = False

    def _check_tensor(self, x: Any, name: str, shape: tuple[int, ...]) -> Any:
        if not self.gpu:  # a CPU torch tensor as NumPy, as `KVPool.write` / `attend` take one (they were refused)
            x = to_numpy(x, name, self.spec.np_dtype)[0]
        if tuple(getattr(x, "shape", ())) != shape:
            raise InvalidArgument(f"{name} must have shape {shape}, got {tuple(getattr(x, 'shape', ()))}")
        return self._as_array(x, name)

    def _check_q(self, q: Any, tokens: int) -> Any:
        hkv, d = self.spec.num_kv_heads, self.spec.head_dim
        hq = q.shape[1] if len(getattr(q, "shape", ())) == 3 else 0
        if hq < 1 or hq % hkv:
            raise InvalidArgument(
                f"q must be [tokens, num_q_heads, {d}] with num_q_heads a multiple of "
                f"num_kv_heads={hkv}, got shape {getattr(q, 'shape', None)}"
            )
        return self._check_tensor(q, "q", (tokens, hq, d))
