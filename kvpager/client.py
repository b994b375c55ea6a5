"""`Client`: the daemon's pool with `KVPool`'s method names and result types.

Moving a worker from the embedded pool to the daemon is one line::

    pool = KVPool(spec)        ->        pool = Client()          # KVPAGER_ENDPOINT or the default socket

On the CPU backend the client maps the daemon's pool (POSIX shared memory)
once per process: `kv`, `write` and `attend` then run here on zero-copy views,
and only ids and slots cross the socket. Without a mapping, `remote_write` /
`remote_attend` move tensors through a per-session staging buffer.

A `Client` is safe for one thread at a time (a lock guards its socket); its
heartbeat thread has its own socket. Do not share one across ``fork()``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np
import zmq

from kvpager import env
from kvpager.backends.numpy_backend import NumpyBackend, paged_attention
from kvpager.endpoints import default_endpoint, probe
from kvpager.errors import (
    DaemonUnavailable,
    InvalidArgument,
    MessageTooLarge,
    RequestTimeout,
    SessionLost,
)
from kvpager.protocol import (
    VERSION,
    Reply,
    decode_allocations,
    decode_blocks,
    decode_info,
    decode_reply,
    decode_slots,
    decode_stats,
    pack,
)
from kvpager.shm import Segment, map_pool
from kvpager.spec import PoolSpec
from kvpager.types import Allocation, BlockMap, PoolStats, SequenceInfo

log = logging.getLogger("kvpager.client")
_ALIGN = 64


class _Channel:
    """One DEALER socket and its request/reply loop with a deadline."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.rcvtimeo = -1
        self.sock = self._open()

    def _open(self) -> zmq.Socket:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        self.rcvtimeo = -1
        return sock

    def reset(self) -> None:
        """A socket that timed out may still receive the late reply: replace it."""
        self.sock.close(0)
        self.sock = self._open()

    def close(self) -> None:
        self.sock.close(0)

    def request(self, body: bytes, rid: int, op: str, timeout: float) -> Reply:
        deadline = time.monotonic() + timeout
        sock = self.sock
        # A blocking recv bounded by RCVTIMEO costs one call per reply; the
        # option is set again only when the timeout changes.
        ms = max(1, math.ceil(timeout * 1000))
        if ms != self.rcvtimeo:
            sock.setsockopt(zmq.RCVTIMEO, ms)
            self.rcvtimeo = ms
        try:
            sock.send(body, zmq.NOBLOCK)
            while True:
                reply = decode_reply(sock.recv())
                if reply.id == rid or reply.id is None:
                    return reply
                # A late reply to an earlier request: drop it, wait out the rest.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.rcvtimeo = max(1, math.ceil(remaining * 1000))
                sock.setsockopt(zmq.RCVTIMEO, self.rcvtimeo)
        except zmq.Again:
            pass
        self.reset()
        why = probe(self.endpoint)
        if why is not None:
            raise DaemonUnavailable(f"the kvpager daemon at {self.endpoint} is gone ({why})")
        raise RequestTimeout(
            f"no reply from the kvpager daemon at {self.endpoint} to {op!r} within {timeout:g}s; "
            "raise KVPAGER_TIMEOUT or pass timeout= to Client"
        )


class Client:
    """A session with the kvpager daemon at ``endpoint`` (default: KVPAGER_ENDPOINT,
    else the private ipc:// socket). Every call waits at most ``timeout`` seconds
    (default KVPAGER_TIMEOUT). Raises DaemonUnavailable if nothing listens."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float | None = None,
        heartbeat: bool = True,
        map_pool: bool = True,
        name: str | None = None,
    ):
        self.endpoint = endpoint or default_endpoint()
        self.timeout = env.timeout_s() if timeout is None else float(timeout)
        why = probe(self.endpoint)
        if why is not None:
            raise DaemonUnavailable(
                f"no kvpager daemon at {self.endpoint} ({why}); start one with `kvpager serve` "
                "or point KVPAGER_ENDPOINT at a running one"
            )
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._chan = _Channel(self.endpoint)
        self.session: str | None = None
        self.epoch: str | None = None
        self._closed = False
        try:
            info = self._call("hello", {"client": name or f"{socket.gethostname()}:{os.getpid()}",
                                        "pid": os.getpid(), "host": socket.gethostname()})
        except RequestTimeout as e:
            self._chan.close()
            raise DaemonUnavailable(f"no kvpager daemon answers at {self.endpoint}: {e}") from None
        self.session, self.epoch = info["session"], info["epoch"]
        self.spec = PoolSpec.from_dict(info["spec"])
        self.device: str = info["device"]
        self.memory: dict[str, Any] = info["memory"]
        self.heartbeat_timeout: float = info["heartbeat_timeout"]
        self.max_message_bytes: int = info["max_message_bytes"]
        self.map_pool = map_pool and self.memory.get("kind") == "shm"
        self._mapped: NumpyBackend | None = None
        self._staging: Segment | None = None
        self._hb_stop = threading.Event()
        self._hb: threading.Thread | None = None
        if heartbeat:
            self._hb = threading.Thread(target=self._heartbeat_loop, name="kvpager-heartbeat", daemon=True)
            self._hb.start()

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
            reply = self._chan.request(body, rid, op, self.timeout)
        if reply.error is not None:
            raise self._error(reply)
        return reply.result

    def _error(self, reply: Reply) -> Exception:
        exc = reply.error.exception()
        if isinstance(exc, SessionLost) and self.epoch and getattr(exc, "epoch", self.epoch) != self.epoch:
            exc.args = (exc.args[0] + "; the daemon restarted (pool epoch changed): memory mapped "
                        "from the old daemon is stale, open a new Client",)
            self._mapped = None
        return exc

    def _heartbeat_loop(self) -> None:
        chan, ids = _Channel(self.endpoint), itertools.count(1)
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
        try:
            self._call("bye", {})
        except Exception as e:
            log.debug("bye failed: %s", e)
        self._closed = True
        self._chan.close()
        if self._staging is not None:
            self._staging.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def heartbeat(self) -> None:
        self._call("heartbeat", {})

    # -- sequence ops (as KVPool) ------------------------------------------------------------------
    def allocate(self, prompts: Seq[Seq[int]], salt: Any = None, *, owner: None = None) -> list[Allocation]:
        """As `KVPool.allocate`; the sequences belong to this client's session."""
        if owner is not None:
            raise InvalidArgument("owner: a daemon sequence always belongs to the calling session")
        args: dict[str, Any] = {"prompts": prompts}
        if salt is not None:
            args["salt"] = salt
        return decode_allocations(self._call("allocate", args))

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
        return self._call("append", args)

    def commit(self, seq_ids: Any, upto: Any = None) -> list[int]:
        args = {"seq_ids": seq_ids} if upto is None else {"seq_ids": seq_ids, "upto": upto}
        return self._call("commit", args)

    def fork(self, seq_ids: Any, n: int = 1) -> list[list[int]]:
        return self._call("fork", {"seq_ids": seq_ids, "n": n})

    def free(self, seq_ids: Any) -> None:
        self._call("free", {"seq_ids": seq_ids})

    def truncate(self, seq_ids: Any, lengths: Any) -> None:
        self._call("truncate", {"seq_ids": seq_ids, "lengths": lengths})

    def swap_out(self, seq_ids: Any) -> None:
        self._call("swap_out", {"seq_ids": seq_ids})

    def swap_in(self, seq_ids: Any) -> None:
        self._call("swap_in", {"seq_ids": seq_ids})

    # -- K/V ---------------------------------------------------------------------------------------
    def write(self, layer: int, slots: Any, k: Any, v: Any) -> None:
        """As `KVPool.write`: through the mapped pool when there is one, else remote."""
        if self.map_pool:
            self.local_write(layer, slots, k, v)
        else:
            self.remote_write(layer, slots, k, v)

    def attend(self, layer: int, seq_ids: Any, q: Any, query_lens: Any = None, scale: float | None = None) -> Any:
        """As `KVPool.attend`: computed here over the mapped pool when there is
        one (block tables from the daemon), else by the daemon."""
        if self.map_pool:
            return self.local_attend(layer, seq_ids, q, query_lens, scale)
        return self.remote_attend(layer, seq_ids, q, query_lens, scale)

    def kv(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Zero-copy views of one layer's K and V in the daemon's pool, each
        [num_blocks, num_kv_heads, block_size, head_dim]."""
        self._check_layer(layer)
        return self._pool().layer_kv(int(layer))

    def device_array(self) -> np.ndarray:
        """The whole device pool [num_blocks, layers, 2, kv_heads, block_size, head_dim], mapped."""
        return self._pool().kv

    def host_array(self) -> np.ndarray:
        """The whole host (swap) pool, mapped."""
        return self._pool().host_kv

    def local_write(self, layer: int, slots: Any, k: Any, v: Any) -> None:
        """Write K/V straight into the mapped pool (no daemon round trip)."""
        self._check_layer(layer)
        slots = self._check_slots(slots)
        shape = (len(slots), self.spec.num_kv_heads, self.spec.head_dim)
        self._pool().write(int(layer), slots, self._check_tensor(k, "k", shape), self._check_tensor(v, "v", shape))

    def local_attend(self, layer: int, seq_ids: Any, q: Any, query_lens: Any = None, scale: float | None = None) -> Any:
        """Paged attention here, over the mapped pool, with the daemon's block tables."""
        self._check_layer(layer)
        pool = self._pool()
        tables, lens = self.tables(seq_ids)
        qlens = np.broadcast_to(np.asarray(1 if query_lens is None else query_lens, np.int32), lens.shape)
        if len(lens) and (qlens.min() < 1 or (qlens > lens).any()):
            raise InvalidArgument(f"query_lens must be in [1, sequence length], got {qlens.tolist()}")
        q = self._check_q(q, int(qlens.sum()))
        scale = 1.0 / math.sqrt(self.spec.head_dim) if scale is None else float(scale)
        return paged_attention(pool.kv, int(layer), q, tables, lens, qlens, scale)

    def remote_write(self, layer: int, slots: Any, k: Any, v: Any) -> None:
        """Send K/V to the daemon through this session's staging buffer."""
        dt = self.spec.np_dtype
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, np.ndarray) or t.dtype != dt:
                raise InvalidArgument(f"{name} must be a numpy array of dtype {self.spec.dtype}")
        voff = _aligned(k.nbytes)
        stage = self._stage(voff + v.nbytes)
        stage.array(k.shape, dt, 0)[...] = k
        stage.array(v.shape, dt, voff)[...] = v
        self._call("write", {"layer": layer, "slots": np.asarray(slots),
                             "k": [0, list(k.shape)], "v": [voff, list(v.shape)]})

    def remote_attend(self, layer: int, seq_ids: Any, q: Any, query_lens: Any = None, scale: float | None = None) -> Any:
        """Paged attention computed by the daemon; q and the output cross through staging."""
        if not isinstance(q, np.ndarray) or q.dtype != self.spec.np_dtype:
            raise InvalidArgument(f"q must be a numpy array of dtype {self.spec.dtype}")
        out = _aligned(q.nbytes)
        stage = self._stage(out + q.nbytes)
        stage.array(q.shape, q.dtype, 0)[...] = q
        args: dict[str, Any] = {"layer": layer, "seq_ids": seq_ids, "q": [0, list(q.shape)], "out": out}
        if query_lens is not None:
            args["query_lens"] = query_lens
        if scale is not None:
            args["scale"] = scale
        offset, shape = self._call("attend", args)
        return np.array(stage.array(tuple(shape), q.dtype, offset))

    def tables(self, seq_ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Padded int32 block tables [B, max_blocks] and lengths [B], as `KVPool.block_tables`."""
        tables, lens = self._call("tables", {"seq_ids": seq_ids})
        return tables, lens

    # -- inspection --------------------------------------------------------------------------------
    def sequence(self, seq_id: int) -> SequenceInfo:
        return decode_info(self._call("sequences", {"seq_ids": [seq_id]})[0])

    def sequences(self) -> list[SequenceInfo]:
        """Every live sequence of every session, in id order."""
        return [decode_info(d) for d in self._call("sequences", {})]

    def blocks(self) -> BlockMap:
        return decode_blocks(self._call("blocks", {}))

    def stats(self) -> PoolStats:
        return decode_stats(self._call("stats", {}))

    def check_integrity(self) -> None:
        """The daemon's `KVPool.check_integrity`, plus: every sequence has an open session."""
        self._call("check", {})

    def synchronize(self) -> None:
        """As `KVPool.synchronize`: wait for this process's writes into the mapped
        pool to land before a commit. On the CPU mapping they land when the
        write returns, so there is nothing to wait for."""

    # -- helpers -----------------------------------------------------------------------------------
    def _pool(self) -> NumpyBackend:
        if self._mapped is None:
            if self.memory.get("kind") != "shm":
                raise InvalidArgument(
                    f"the daemon's pool is not mappable here (memory kind {self.memory.get('kind')!r}); "
                    "use remote_write / remote_attend"
                )
            if self._closed:
                raise SessionLost("this client is closed")
            self._mapped = map_pool(self.spec, self.memory)
        return self._mapped

    def _stage(self, nbytes: int) -> Segment:
        if self._staging is None or self._staging.size < nbytes:
            info = self._call("staging", {"nbytes": nbytes})
            if self._staging is not None:
                self._staging.close()
            self._staging = Segment.attach(info["name"], info["size"])
        return self._staging

    def _check_layer(self, layer: Any) -> None:
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or not 0 <= layer < self.spec.num_layers:
            raise InvalidArgument(f"layer must be an int in [0, {self.spec.num_layers}), got {layer!r}")

    def _check_slots(self, slots: Any) -> np.ndarray:
        arr = np.asarray(slots)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise InvalidArgument(f"slots must be a 1-D integer array, got dtype {arr.dtype} shape {arr.shape}")
        arr = arr.astype(np.int64, copy=False)
        bs, limit = self.spec.block_size, self.spec.num_blocks * self.spec.block_size
        bad = (arr < -1) | (arr >= limit) | ((arr >= 0) & (arr < bs))
        if bad.any():
            raise InvalidArgument(
                f"slot {int(arr[bad][0])} is outside [{bs}, {limit}) (block 0 is the null block; -1 marks padding)"
            )
        return arr

    def _check_tensor(self, x: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise InvalidArgument(f"{name} must be a numpy array, got {type(x).__name__}")
        if tuple(x.shape) != shape:
            raise InvalidArgument(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if x.dtype != self.spec.np_dtype:
            raise InvalidArgument(f"{name} must have dtype {self.spec.dtype}, got {x.dtype}")
        return x

    def _check_q(self, q: Any, tokens: int) -> np.ndarray:
        hkv, d = self.spec.num_kv_heads, self.spec.head_dim
        hq = q.shape[1] if isinstance(q, np.ndarray) and q.ndim == 3 else 0
        if hq < 1 or hq % hkv:
            raise InvalidArgument(
                f"q must be [tokens, num_q_heads, {d}] with num_q_heads a multiple of "
                f"num_kv_heads={hkv}, got shape {getattr(q, 'shape', None)}"
            )
        return self._check_tensor(q, "q", (tokens, hq, d))


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
