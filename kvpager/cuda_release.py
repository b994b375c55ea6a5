"""Releasing CUDA resources from finalizers without breaking a CUDA graph capture.

A pool, a mapped buffer or a plan's side stream that is garbage-collected
frees its memory (``cudaFree`` / ``cudaFreeHost``) or destroys its stream and
events from a finalizer, at whatever moment the collector runs: possibly
while this thread is capturing a CUDA graph (a model's decode step under
``torch.cuda.graph``). CUDA forbids those calls during a capture, and making
one invalidates the capture. `release` makes the call at once when no capture
is under way in this thread, else keeps it and makes it at the next `release`
or `flush` outside a capture (a backend's creation and close flush).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

_pending: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
_lock = threading.Lock()


def capturing() -> bool:
    """Whether this thread's current stream (torch's, or CuPy's where it is not the
    legacy default stream) is capturing a CUDA graph. Never initialises CUDA."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
                return True
        except Exception:  # noqa: BLE001 - no usable CUDA here: nothing is capturing
            pass
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        try:
            stream = cupy.cuda.get_current_stream()
            # the legacy stream is not asked: that query fails while another stream captures
            if stream.ptr and stream.is_capturing():
                return True
        except Exception:  # noqa: BLE001
            pass
    return False


def release(fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` (a cudaFree-like release) now, or after the capture under way."""
    if capturing():
        with _lock:
            _pending.append((fn, args))
        return
    flush()
    fn(*args)


def flush() -> None:
    """Make the releases kept during a capture (none while one is still under way)."""
    if not _pending or capturing():
        return
    with _lock:
        items = _pending[:]
        del _pending[:]
    for fn, args in items:
        fn(*args)


def pending() -> int:
    """How many releases wait for a capture to end."""
    return len(_pending)
