"""CUDA IPC for the daemon's GPU pools: export (daemon) and mapping (clients).

The daemon's pool is one raw ``cudaMalloc`` slab (`CupyBackend`); its
``cudaIpcGetMemHandle`` handle travels in the hello reply, and a worker opens
it once per process with ``cudaIpcOpenMemHandle`` to read and write the pool
in place. Per-session staging buffers (remote write/attend) are separate
``cudaMalloc`` allocations exported the same way (`DeviceBuffer`).

A process cannot open its own IPC handle (cudaErrorDeviceUninitialized), so
every export also carries the pointer in the daemon's address space: a client
living in the daemon's process (same pid) uses it directly.

CuPy is imported lazily: a client that only allocates and commits on a GPU
pool (the CLI, a scheduler) needs no CUDA here.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from typing import Any

import numpy as np

from kvpager import cuda_release
from kvpager.errors import BackendUnavailable, InvalidArgument
from kvpager.spec import PoolSpec


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise BackendUnavailable(f"the daemon's pool is on a GPU: mapping it needs CuPy ({e})") from None
    return cupy


def device_uuid(index: int) -> str:
    """The UUID of visible device ``index``, as nvidia-smi prints it (GPU-xxxxxxxx-...)."""
    h = bytes(_cupy().cuda.runtime.getDeviceProperties(index)["uuid"]).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def find_device(uuid: str) -> int:
    """The index, among this process's visible devices, of the GPU ``uuid``;
    BackendUnavailable naming both sides' GPUs if it is not visible here."""
    cupy = _cupy()
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise BackendUnavailable(f"the daemon's pool lives on GPU {uuid}, but CUDA is not usable here: {e}") from None
    seen = [device_uuid(i) for i in range(count)]
    if uuid in seen:
        return seen.index(uuid)
    raise BackendUnavailable(
        f"the daemon's pool lives on GPU {uuid}, but this process sees "
        f"{', '.join(seen) or 'no GPU'} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
        "run the worker where that GPU is visible, or use a daemon on this process's GPU"
    )


class DeviceBuffer:
    """Device memory shared between the daemon and one client: created (cudaMalloc)
    and exported by the daemon, opened by the client. ``array`` gives CuPy views."""

    kind = "cuda_ipc"

    def __init__(self, ptr: int, size: int, device: int, release: Any, handle: bytes = b""):
        self.ptr, self.size, self.device, self.handle = int(ptr), int(size), int(device), handle
        # Views keep this object alive (it is their memory's owner); the memory
        # goes when the last of them does, or at close().
        self._release = (weakref.finalize(self, cuda_release.release, release, self.device, self.ptr)
                         if release else None)

    @classmethod
    def create(cls, size: int, device: int) -> DeviceBuffer:
        """Daemon side: a fresh zeroed allocation and its IPC handle."""
        rt = _cupy().cuda.runtime
        with _cupy().cuda.Device(device):
            ptr = rt.malloc(size)
            try:
                rt.memset(ptr, 0, size)
                handle = bytes(rt.ipcGetMemHandle(ptr))
            except BaseException:
                rt.free(ptr)
                raise
        return cls(ptr, size, device, _free, handle)

    @classmethod
    def open(cls, info: dict[str, Any], device: int, same_process: bool) -> DeviceBuffer:
        """Client side: the buffer ``info`` names (a staging reply), opened here."""
        size = int(info["offset"]) + int(info["size"])
        if same_process:  # the daemon's own address space: its pointer is valid here
            return cls(int(info["pointer"]), size, device, None)
        return cls(open_handle(info["handle"], device), size, device, _close_handle)

    def handles(self) -> dict[str, Any]:
        """The staging reply."""
        return {"kind": self.kind, "handle": self.handle, "pointer": self.ptr, "offset": 0, "size": self.size}

    def array(self, shape: tuple[int, ...], dtype: Any, offset: int = 0) -> Any:
        """A CuPy view (no copy); InvalidArgument if it does not fit."""
        cupy = _cupy()
        dt = np.dtype(dtype)
        nbytes = math.prod(int(d) for d in shape) * dt.itemsize  # (Python ints: a huge shape cannot wrap)
        if offset < 0 or offset % max(dt.itemsize, 16) or offset + nbytes > self.size or min(shape, default=1) < 0:
            raise InvalidArgument(
                f"staging range offset={offset} shape={tuple(shape)} ({nbytes} bytes of {dt}) does not fit "
                f"the {self.size}-byte device staging buffer, or is not 16-byte aligned"
            )
        if self.ptr == 0:
            raise InvalidArgument("this staging buffer is closed")
        mem = cupy.cuda.UnownedMemory(self.ptr, self.size, self, device_id=self.device)
        return cupy.ndarray(shape, dt, memptr=cupy.cuda.MemoryPointer(mem, offset))

    def close(self) -> None:
        """Wait for the device, then free (daemon) or unmap (client)."""
        if self._release is not None and self._release.alive:
            with _cupy().cuda.Device(self.device):
                _cupy().cuda.Device(self.device).synchronize()
            self._release()
        self.ptr = 0


def _free(device: int, ptr: int) -> None:
    cupy = _cupy()
    with cupy.cuda.Device(device):
        cupy.cuda.runtime.free(ptr)


# -- the pool, mapped once per process ----------------------------------------------------
_lock = threading.Lock()
_opened: dict[bytes, tuple[int, int]] = {}  # handle -> (pointer, references)
_pools: dict[bytes, Any] = {}  # handle -> CupyBackend over the opened slab
_handles_by_ptr: dict[int, bytes] = {}


def open_handle(handle: bytes, device: int) -> int:
    """cudaIpcOpenMemHandle, counted: the same handle opened twice in one process
    is mapped once."""
    cupy = _cupy()
    handle = bytes(handle)
    with _lock:
        ptr, refs = _opened.get(handle, (0, 0))
        if not refs:
            try:
                with cupy.cuda.Device(device):
                    ptr = int(cupy.cuda.runtime.ipcOpenMemHandle(handle))
            except cupy.cuda.runtime.CUDARuntimeError as e:
                raise BackendUnavailable(
                    f"cannot open the daemon's CUDA IPC handle on cuda:{device}: {e} "
                    "(a process cannot open its own handles; the daemon may have exited)"
                ) from None
        _opened[handle] = (ptr, refs + 1)
        _handles_by_ptr[ptr] = handle
        return ptr



def _close_handle(device: int, ptr: int) -> None:
    cupy = _cupy()
    with _lock:
        handle = _handles_by_ptr.get(ptr)
        _, refs = _opened.get(handle, (ptr, 1))
        if refs > 1:
            _opened[handle] = (ptr, refs - 1)
            return
        _opened.pop(handle, None)
        _handles_by_ptr.pop(ptr, None)
    with cupy.cuda.Device(device):
        cupy.cuda.runtime.ipcCloseMemHandle(ptr)


def pool_handles(backend: Any, epoch: str) -> dict[str, Any]:
    """Daemon side: the hello reply's ``memory`` for a `CupyBackend` pool."""
    return {
        "kind": "cuda_ipc",
        "handle": backend.ipc_handle(),
        "device_uuid": backend.device_uuid(),
        "pointer": int(backend._dev_ptr),
        "offset": 0,
        "size": int(backend.slab_nbytes),
        "epoch": epoch,
    }


def map_pool(spec: PoolSpec, memory: dict[str, Any], same_process: bool) -> Any:
    """Client side: a `CupyBackend` over the daemon's slab as mapped in this process
    (once per process and handle): ``kv`` is a zero-copy CuPy view, and its
    write / attend run the kvpager kernels here."""
    from kvpager.backends.cupy_backend import CupyBackend

    device = find_device(memory["device_uuid"])
    if int(memory["size"]) < spec.device_bytes:
        raise InvalidArgument(f"the exported slab has {memory['size']} bytes; the pool needs {spec.device_bytes}")
    key = bytes(memory["handle"])
    backend = _pools.get(key)
    if backend is None:
        buf = DeviceBuffer.open(memory, device, same_process)
        backend = CupyBackend.over_pointer(spec, device, buf.ptr + int(memory["offset"]), owner=buf)
        _pools[key] = backend
    return backend


def in_use() -> bool:
    """Whether this process has mapped a daemon's pool or staging buffer."""
    return bool(_pools or _opened)


def forget_pool(memory: dict[str, Any]) -> None:
    """Drop this process's mapping of a dead daemon's pool (stale epoch). It is
    unmapped once no view of it is left."""
    _pools.pop(bytes(memory.get("handle", b"")), None)


def to_device(x: Any, name: str, dtype: np.dtype, device: int) -> Any:
    """``x`` as a CuPy array on ``device``: CuPy arrays as they are, DLPack
    tensors (torch) without a copy, NumPy arrays copied over."""
    cupy = _cupy()
    with cupy.cuda.Device(device):
        if isinstance(x, cupy.ndarray):
            out = x
        elif isinstance(x, np.ndarray):
            out = cupy.asarray(x)
        elif hasattr(x, "__dlpack__"):
            try:
                out = cupy.from_dlpack(x)
            except Exception as e:
                raise InvalidArgument(f"{name}: cannot take a {type(x).__name__} as a CuPy array: {e}") from None
        else:
            raise InvalidArgument(f"{name} must be a CuPy, DLPack (torch) or NumPy array, got {type(x).__name__}")
    if out.dtype != dtype:
        raise InvalidArgument(f"{name} must have dtype {dtype}, got {out.dtype}")
    if out.device.id != device:
        raise InvalidArgument(f"{name} is on cuda:{out.device.id}; the pool is on this process's cuda:{device}")
    return out


def synchronize(device: int) -> None:
    """Wait for everything issued on ``device`` by this process, on every stream
    (a worker's torch streams too)."""
    cupy = _cupy()
    with cupy.cuda.Device(device):
        cupy.cuda.Device(device).synchronize()
