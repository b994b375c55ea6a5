"""`Client`'s staging path: `remote_write` / `remote_attend` move tensors
through the session's staging buffer (shared memory, or IPC-mapped device
memory on a GPU) and let the daemon work: for a worker that does not map the
pool, and to compare against the mapped path."""

from __future__ import annotations

from typing import Any

from kvpager import cuda_ipc
from kvpager.attend_options import check_sinks
from kvpager.client_ids import as_ids
from kvpager.errors import InvalidArgument
from kvpager.plan_numpy import from_numpy
from kvpager.shm import Segment
from kvpager.validate import is_tensor

_ALIGN = 64


class ClientStaging:
    """Mixed into `Client`, which supplies ``gpu``, ``_staging``, ``_call``, ``_settle``, ``_unsettled``, ``_lock``,
    ``_device``, ``_same_process``, ``_as_array`` and ``_check_slots``."""

    def remote_write(self, layer: int, slots: Any, k: Any, v: Any) -> None:
        """Send K/V to the daemon through this session's staging buffer."""
        self._check_process()  # (a forked child's copy: staging is shared with its parent)
        slots = self._check_slots(slots)  # before anything is staged, as the mapped path checks them
        k, v = self._as_array(k, "k"), self._as_array(v, "v")
        self._settle_staged()
        voff = _aligned(k.nbytes)
        stage = self._stage(voff + v.nbytes)
        stage.array(k.shape, k.dtype, 0)[...] = k
        stage.array(v.shape, v.dtype, voff)[...] = v
        self._staged_ready()
        self._call("write", {"layer": layer, "slots": slots,
                             "k": [0, list(k.shape)], "v": [voff, list(v.shape)]})

    def remote_attend(self, layer: int, seq_ids: Any, q: Any, query_lens: Any = None, scale: float | None = None,
                      *, window: int | None = None, softcap: float | None = None, sinks: Any = None,
                      chunk: int | None = None) -> Any:
        """Paged attention computed by the daemon; q and the output cross through
        staging. Returns a NumPy array (CPU pool) or a CuPy array (GPU pool)."""
        self._check_process()
        seq_ids = as_ids(seq_ids)
        self._check_held_before(seq_ids)
        tensor = not self.gpu and is_tensor(q)  # (its output a tensor too, as `KVPool.attend` gives)
        q = self._as_array(q, "q")
        if sinks is not None:  # checked here, sent as one float32 array
            sinks = check_sinks(sinks, q.shape[1] if q.ndim == 3 else -1, any_device=True)
        self._settle_staged()
        out = _aligned(q.nbytes)
        stage = self._stage(out + q.nbytes)
        stage.array(q.shape, q.dtype, 0)[...] = q
        self._staged_ready()
        args: dict[str, Any] = {"layer": layer, "seq_ids": seq_ids, "q": [0, list(q.shape)], "out": out}
        if query_lens is not None:
            args["query_lens"] = query_lens
        if scale is not None:
            args["scale"] = scale
        if window is not None:
            args["window"] = window
        if softcap is not None:
            args["softcap"] = softcap
        if sinks is not None:
            args["sinks"] = sinks
        if chunk is not None:
            args["chunk"] = chunk
        offset, shape = self._call("attend", args)
        # The daemon answers once its output is complete (it synchronizes first).
        out = stage.array(tuple(shape), q.dtype, offset).copy()
        return from_numpy(out) if tensor else out

    def _settle_staged(self) -> None:
        """The outcome of a request that timed out, before staging is written: a staged
        write or attend that timed out may still run on the daemon, reading staging as
        it is then (a late write stored the next write's K/V in its own slots; a late
        attend's output overwrote the next write's staged K). Settled by its retry
        (`ClientWire._settle`: the daemon keeps their replies); RequestTimeout again
        while the daemon stays silent, staging untouched."""
        if self._unsettled is not None:
            with self._lock:
                self._settle()

    def _stage(self, nbytes: int) -> Any:
        if self._staging is None or self._staging.size < nbytes:
            if self._staging is not None:  # unmap before the daemon frees it for a bigger one
                self._staging.close()
                self._staging = None
            info = self._call("staging", {"nbytes": nbytes})
            if info.get("kind", "shm") == "shm":
                try:
                    self._staging = Segment.attach(info["name"], info["size"])
                except InvalidArgument:
                    # gone between the reply and here: the daemon ended this session meanwhile
                    # (a worker stopped past its heartbeat timeout) says so as SessionLost
                    self._call("heartbeat", {})
                    raise
            else:
                self._staging = cuda_ipc.DeviceBuffer.open(info, self._device(), self._same_process())
        return self._staging

    def _staged_ready(self) -> None:
        """On a GPU, the copies into staging must have landed before the daemon reads it."""
        if self.gpu:
            cuda_ipc.synchronize(self._device())


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
