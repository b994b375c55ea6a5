"""POSIX shared memory for the CPU backend's pools and the staging buffers.

The daemon creates every segment (mode 0600) and unlinks it on shutdown or
when the session that used it ends; clients only attach. We call
``shm_open`` ourselves instead of `multiprocessing.shared_memory`, whose
resource tracker (before Python 3.13) unlinks a segment when any process
that merely attached to it exits: a worker's exit would pull the pool out
from under the daemon.

Segment names are ``kvp<pid>_<epoch8>_<tag>``: short enough for macOS (31
bytes). A daemon holds a shared `flock` on its long-lived segments (the pool's,
its count of releases) for as long as it lives, so a later daemon tells a dead
daemon's leftovers by the lock, whatever pid namespace either runs in (by the pid
alone, a daemon in another container sharing /dev/shm removed a live daemon's
pool, and a daemon restarted as the same pid, a container's, never removed the
segments of the one that crashed); a daemon of an older kvpager, which takes no
lock, by its pid.
Staging buffers get a random tag (`random_tag`) and every segment is created
exclusively (``O_EXCL``): another user cannot create a name first and have
the daemon use it, nor make the next name fail by guessing it.
"""

from __future__ import annotations

import _posixshmem
import contextlib
import errno
import fcntl
import logging
import math
import mmap
import os
import re
import secrets
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvpager.backends.numpy_backend import NumpyBackend
from kvpager.errors import BackendUnavailable, InvalidArgument
from kvpager.spec import PoolSpec

log = logging.getLogger("kvpager.shm")

_NAME = re.compile(r"kvp(\d+)_([0-9a-f]{8})_\w+$")
_SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory; used only to sweep


class Segment:
    """One mapped shared-memory segment. ``buf`` is a writable memoryview."""

    def __init__(self, name: str, size: int, create: bool, readonly: bool = False, hold: bool = False):
        """``hold``: a segment made here keeps its descriptor open under a shared
        `flock` until it is closed: the sign that its daemon lives (`sweep_stale`)."""
        flags = (os.O_RDONLY if readonly and not create else os.O_RDWR) | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = _posixshmem.shm_open("/" + name, flags, mode=0o600)
        except FileNotFoundError:
            raise SegmentMissing(f"shared memory segment {name!r} does not exist") from None
        except FileExistsError:
            raise SegmentExists(f"shared memory segment {name!r} already exists (another process made it)") from None
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):  # (an internal error with a traceback before)
                raise BackendUnavailable(f"no file descriptor left to open shared memory ({name}): this process "
                                         f"holds as many as its limit allows ({e.strerror}); fewer connections, or "
                                         "a higher limit (ulimit -n)") from None
            raise
        held = None
        try:
            if create:
                if hold:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    held = fd
                os.ftruncate(fd, size)
                if hasattr(os, "posix_fallocate"):
                    # Reserve the pages now: a full /dev/shm then fails here with
                    # ENOSPC instead of killing whoever touches a page (SIGBUS).
                    os.posix_fallocate(fd, 0, size)
            else:
                actual = os.fstat(fd).st_size
                if actual < size:
                    raise InvalidArgument(f"shared memory segment {name!r} has {actual} bytes, expected {size}")
            self._mmap = mmap.mmap(fd, size, prot=mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException as e:
            held = None  # (closed below with the rest)
            if create:
                _posixshmem.shm_unlink("/" + name)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.ENOMEM):
                raise BackendUnavailable(
                    f"no room in shared memory (/dev/shm) for {size} bytes ({name}): in a container, "
                    "give it more (docker run --shm-size=16g, or --ipc=host), or make the pool smaller "
                    "(kvpager serve --blocks / --memory, fewer --host-blocks)") from None
            raise
        finally:
            if held is None:
                os.close(fd)
        self.name, self.size, self.owner = name, size, create
        self.buf = memoryview(self._mmap)
        # The creator unlinks at close, or at the latest when this object is
        # collected or the interpreter exits (a server that never ran): the creating
        # process only. A child forked from it (a daemon run in-process, then
        # ``os.fork()``) inherits this object and its finalizer, and its exit
        # unlinked the running daemon's pool: workers that came later found none.
        self._unlink = weakref.finalize(self, _unlink, name, os.getpid(), held) if create else None

    @classmethod
    def create(cls, name: str, size: int, hold: bool = False) -> Segment:
        return cls(name, size, create=True, hold=hold)

    @classmethod
    def attach(cls, name: str, size: int, readonly: bool = False) -> Segment:
        return cls(name, size, create=False, readonly=readonly)

    def handles(self) -> dict[str, Any]:
        """The daemon's staging reply for this segment."""
        return {"kind": "shm", "name": self.name, "offset": 0, "size": self.size}

    def array(self, shape: tuple[int, ...], dtype: Any, offset: int = 0) -> np.ndarray:
        """A view of the segment (no copy); InvalidArgument if it does not fit."""
        dt = np.dtype(dtype)
        nbytes = math.prod(int(d) for d in shape) * dt.itemsize  # (Python ints: a huge shape cannot wrap)
        if offset < 0 or offset % dt.itemsize or offset + nbytes > self.size or min(shape, default=1) < 0:
            raise InvalidArgument(
                f"staging range offset={offset} shape={tuple(shape)} ({nbytes} bytes of {dt}) does not fit "
                f"segment {self.name} of {self.size} bytes, or is misaligned"
            )
        return np.ndarray(shape, dt, buffer=self.buf, offset=offset)

    def close(self) -> None:
        """Unmap; unlink too if this process created it. Views still alive keep
        the mapping (then it goes with them)."""
        if self._unlink is not None:
            self._unlink()
        try:
            self.buf.release()
            self._mmap.close()
        except (BufferError, ValueError):
            pass  # NumPy views still point into it; unmapped when they go


def _unlink(name: str, creator: int | None = None, held: int | None = None) -> None:
    """Unlink segment ``name``, in its ``creator`` process only (None: in any), then
    close its ``held`` descriptor (its lock goes once no forked child holds it either)."""
    try:
        if creator is not None and os.getpid() != creator:
            return
        with contextlib.suppress(FileNotFoundError):
            _posixshmem.shm_unlink("/" + name)
    finally:
        if held is not None:
            os.close(held)


class SegmentMissing(InvalidArgument):
    """A segment to attach that does not exist: a name no daemon made, or the memory
    of a daemon that is gone (it unlinks its segments when it stops)."""


class SegmentExists(BackendUnavailable):
    """A segment to create exclusively already exists."""


def segment_name(epoch: str, tag: str) -> str:
    return f"kvp{os.getpid()}_{epoch[:8]}_{tag}"


def random_tag(prefix: str = "s") -> str:
    """An unguessable segment tag (80 random bits; names stay under 31 bytes)."""
    return prefix + secrets.token_hex(5)


def sweep_stale() -> list[str]:
    """Unlink segments left by daemons of this user that died without cleanup
    (SIGKILL). Linux only: elsewhere there is no directory to list."""
    removed = []
    try:
        entries = os.scandir(_SHM_DIR)
    except OSError:
        return removed
    uid = os.getuid()
    daemons: dict[tuple[str, str], list[str]] = {}  # (pid, epoch): the segments one daemon made
    with entries:
        for entry in entries:
            m = _NAME.match(entry.name)
            try:
                if m and entry.stat().st_uid == uid:
                    daemons.setdefault((m.group(1), m.group(2)), []).append(entry.name)
            except OSError:
                continue
    for (pid, _), names in daemons.items():
        if any(_held(name) for name in names):
            continue  # its daemon lives (in this pid namespace or another)
        if int(pid) != os.getpid() and _alive(int(pid)):
            continue  # a daemon of an older kvpager, which holds no lock, or another program now
        for name in names:
            with contextlib.suppress(OSError):
                _posixshmem.shm_unlink("/" + name)
                removed.append(name)
    if removed:
        log.info("removed %d shared memory segments of dead daemons", len(removed))
    return removed


def _held(name: str) -> bool:
    """Whether a live process holds the lock of segment ``name`` (`Segment`'s ``hold``)."""
    try:
        fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # (a lock taken here goes with it)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class PoolMemory:
    """The device and host pools of a CPU `KVPool`, in shared memory."""

    spec: PoolSpec
    device: Segment
    host: Segment | None

    @classmethod
    def create(cls, spec: PoolSpec, epoch: str, suffix: str = "") -> PoolMemory:
        """``suffix``: tells apart the segments of a tensor-parallel pool's ranks."""
        dev = Segment.create(segment_name(epoch, "dev" + suffix), spec.device_bytes, hold=True)
        try:
            host = (Segment.create(segment_name(epoch, "host" + suffix), spec.host_bytes, hold=True)
                    if spec.host_bytes else None)
        except BaseException:
            dev.close()
            raise
        return cls(spec, dev, host)

    def backend(self) -> NumpyBackend:
        """A NumPy backend whose pools live in these segments."""
        return NumpyBackend(
            self.spec, device_buffer=self.device.buf, host_buffer=self.host.buf if self.host else None
        )

    def handles(self) -> dict[str, Any]:
        """The "memory" entry of the hello reply (kind "shm")."""
        seg = lambda s: None if s is None else {"name": s.name, "offset": 0, "size": s.size}  # noqa: E731
        return {"kind": "shm", "device": seg(self.device), "host": seg(self.host)}

    def close(self) -> None:
        self.device.close()
        if self.host is not None:
            self.host.close()


def create_ranks(specs: list[PoolSpec], epoch: str) -> list[PoolMemory]:
    """One `PoolMemory` per rank of a tensor-parallel CPU pool (``specs``: each
    rank's geometry, `rank_spec`); segments made before a failure are unlinked."""
    made: list[PoolMemory] = []
    try:
        for r, spec in enumerate(specs):
            made.append(PoolMemory.create(spec, epoch, f"r{r}"))
    except BaseException:
        for m in made:
            m.close()
        raise
    return made


# Mappings made by clients, one per segment per process (see `map_pool`).
_mapped: dict[str, Segment] = {}


def map_segment(handle: dict[str, Any]) -> Segment:
    """Attach a segment named in a hello reply, once per process."""
    seg = _mapped.get(handle["name"])
    if seg is None:
        seg = _mapped[handle["name"]] = Segment.attach(handle["name"], int(handle["offset"]) + int(handle["size"]))
    return seg


def forget_segments(memory: dict[str, Any]) -> None:
    """Drop this process's mappings of the segments a hello reply's ``memory`` names
    (a daemon found gone): each is unmapped once no view of it is left. They were
    kept for the process's life: a worker that outlived three restarts of its daemon
    held three unlinked pools."""
    for part in ("device", "host"):
        handle = memory.get(part)
        if isinstance(handle, dict):
            _mapped.pop(handle.get("name"), None)


def map_pool(spec: PoolSpec, memory: dict[str, Any]) -> NumpyBackend:
    """A NumPy backend over the daemon's pools as mapped in this process: its
    ``kv``/``host_kv`` are zero-copy views, its write/attend run here."""
    dev, host = memory["device"], memory.get("host")
    dbuf = map_segment(dev).buf[int(dev["offset"]) : int(dev["offset"]) + spec.device_bytes]
    hbuf = None
    if host is not None:
        hbuf = map_segment(host).buf[int(host["offset"]) : int(host["offset"]) + spec.host_bytes]
    return NumpyBackend(spec, device_buffer=dbuf, host_buffer=hbuf)
