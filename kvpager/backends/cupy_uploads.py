"""Pinned host buffers for step-plan uploads, reused once their copy has run.

A host-to-device copy from pageable memory goes through the driver's bounce
buffers: when the stream is busy (the host running ahead of the GPU, as it
should) the call blocks until the GPU catches up. From page-locked memory it
is a real asynchronous copy, but the host buffer may not be rewritten or
handed to anyone else until the copy has executed. `Uploads` keeps that
promise: each buffer carries the event recorded after its last copy, a plan
waits for it before refilling its own buffer (`Upload.wait`), and a released
buffer goes back to the free list with its event, to be handed out again
only once the event has completed. A host that runs several uploads ahead of
the GPU waits for the oldest instead of pinning more memory.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

#: Free buffers kept per backend; past this, released ones whose copy has run are let go.
_KEEP = 16
#: Released buffers still being read past which a new upload waits for one instead of pinning more.
_WAIT_PAST = 4


class Upload:
    """One pinned host buffer (``host``: a uint8 view of ``nbytes``) and the
    event of its last copy."""

    __slots__ = ("mem", "host", "event", "__weakref__")

    def __init__(self, mem: Any, nbytes: int, event: Any):
        self.mem, self.event = mem, event
        self.host = np.frombuffer(mem, dtype=np.uint8, count=nbytes)

    def wait(self) -> None:
        """Block until the last copy from this buffer has run (usually it has)."""
        if not self.event.done:
            self.event.synchronize()

    def copy_to(self, dev_ptr: int, stream: int) -> None:
        """``host`` -> ``dev_ptr`` on ``stream``, asynchronously; records the event."""
        from cupy.cuda import runtime

        runtime.memcpyAsync(dev_ptr, self.host.ctypes.data, self.host.nbytes,
                            runtime.memcpyHostToDevice, stream)
        runtime.eventRecord(self.event.ptr, stream)


class Uploads:
    """The free list of one backend's pinned upload buffers."""

    def __init__(self) -> None:
        self._free: list[tuple[Any, int, Any]] = []  # (mem, capacity, event)

    def take(self, nbytes: int, owner: Any) -> Upload:
        """A buffer of at least ``nbytes`` whose last copy has run, returned to
        the free list when ``owner`` is garbage-collected."""
        import cupy

        ready = next((i for i, (_, cap, event) in enumerate(self._free)
                      if cap >= nbytes and event.done), None)
        if ready is None and len(self._free) >= _WAIT_PAST:
            # The host is that many uploads ahead of the GPU: wait for the oldest
            # big enough rather than pin more memory (cudaHostAlloc costs far more).
            ready = next((i for i, (_, cap, _e) in enumerate(self._free) if cap >= nbytes), None)
            if ready is not None:
                self._free[ready][2].synchronize()
        if ready is not None:
            mem, cap, event = self._free.pop(ready)
        else:
            cap = max(4096, 1 << (nbytes - 1).bit_length())  # powers of two: buffers get reused
            mem = cupy.cuda.alloc_pinned_memory(cap)
            event = cupy.cuda.Event(block=False, disable_timing=True)
        up = Upload(mem, nbytes, event)
        weakref.finalize(owner, self._give, mem, cap, event)
        return up

    def _give(self, mem: Any, cap: int, event: Any) -> None:
        free = self._free
        free.append((mem, cap, event))
        if len(free) > _KEEP:
            # Let the oldest whose copy has run go back to CuPy's pinned pool (which
            # may hand it to anyone); one still being read stays, however many.
            done = next((i for i, (_, _, e) in enumerate(free) if e.done), None)
            if done is not None:
                del free[done]
