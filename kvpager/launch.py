"""Kernel launches with their arguments packed once, for the per-layer hot path.

A CuPy ``RawKernel`` call converts every argument on every launch (tens of
microseconds for a dozen arguments, every layer of every step). A `Launch`
packs the arguments into ctypes cells once, when a step is planned; a layer
then changes the few cells that differ (tensor pointers, the layer index)
and calls ``cuLaunchKernel`` on the caller's stream: a couple of
microseconds, nothing allocated, nothing synchronized, so it can be captured
in a CUDA graph.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

from kvpager.errors import InternalError

_CUDA_ERROR_INVALID_CONTEXT = 201
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
_libcuda: Any = None


class _LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: an attribute id, then its 64-byte value union at offset 8."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig (cuLaunchKernelEx)."""

    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


def _driver() -> Any:
    global _libcuda
    if _libcuda is None:
        lib = ctypes.CDLL("libcuda.so.1")
        # No argtypes: `Launch` passes ctypes cells made once (CUfunction, 7 unsigned
        # ints, stream, params, extra), which ctypes hands over as they are; with
        # argtypes each call converts eleven arguments again (~0.8 us a launch).
        lib.cuLaunchKernel.restype = ctypes.c_int
        ex = getattr(lib, "cuLaunchKernelEx", None)  # CUDA 11.8 and later
        if ex is not None:
            ex.restype = ctypes.c_int
        _libcuda = lib
    return _libcuda


def ptr(value: int = 0) -> ctypes.c_uint64:
    return ctypes.c_uint64(value)


def i32(value: int = 0) -> ctypes.c_int32:
    return ctypes.c_int32(value)


def i64(value: int = 0) -> ctypes.c_int64:
    return ctypes.c_int64(value)


def f32(value: float = 0.0) -> ctypes.c_float:
    return ctypes.c_float(value)


class Launch:
    """One kernel with a fixed grid, block and shared memory, and argument cells.

    ``args`` are ctypes cells in the kernel's parameter order; keep references
    to the ones to change and set their ``.value`` before calling.
    ``programmatic`` (compute capability 9.0 and later): launched with
    programmatic stream serialization, so it may start while the kernel before
    it in the stream still runs (once that one's CTAs have all called
    ``griddepcontrol.launch_dependents``); it must itself wait for that
    kernel's results (``griddepcontrol.wait``, `pdl_wait` in
    kvpager_common.cuh) before it reads them. A CUDA graph capture keeps the
    dependency as a programmatic edge."""

    def __init__(self, fn: Any, grid: tuple[int, ...], block: int, smem: int, args: list[Any],
                 device: int, programmatic: bool = False):
        self.func = fn.kernel.ptr  # the CUfunction of the compiled RawKernel
        self.grid = (tuple(int(g) for g in grid) + (1, 1))[:3]
        self.block, self.smem, self.device = int(block), int(smem), device
        self.args = args
        self.params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        # Without cuLaunchKernelEx (a driver before CUDA 11.8) a plain launch: a kernel's
        # griddepcontrol.wait returns at once when nothing was launched programmatically.
        self.programmatic = bool(programmatic) and getattr(_driver(), "cuLaunchKernelEx", None) is not None
        if self.programmatic:
            self._attr = _LaunchAttribute(id=_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
            self._config = _LaunchConfig((ctypes.c_uint * 3)(*self.grid), (ctypes.c_uint * 3)(self.block, 1, 1),
                                         self.smem, None, ctypes.pointer(self._attr), 1)
            self._config_ref = ctypes.byref(self._config)
            self._launch_ex = _driver().cuLaunchKernelEx
        self._launch = _driver().cuLaunchKernel
        self._head = (ctypes.c_void_p(self.func), *map(ctypes.c_uint, (*self.grid, self.block, 1, 1, self.smem)))

    def _run(self, stream: int) -> int:
        if self.programmatic:
            self._config.stream = stream
            return self._launch_ex(self._config_ref, self._head[0], self.params, None)
        return self._launch(*self._head, ctypes.c_void_p(stream), self.params, None)

    def __call__(self, stream: int) -> None:
        if self.programmatic:
            rc = self._run(stream)
        else:  # the common case inline: a launch is on every layer's host path
            rc = self._launch(*self._head, ctypes.c_void_p(stream), self.params, None)
        if rc:
            if rc == _CUDA_ERROR_INVALID_CONTEXT:  # a thread that never touched this GPU
                from cupy.cuda import runtime

                runtime.setDevice(self.device)
                rc = self._run(stream)
            if rc:
                raise InternalError(f"cuLaunchKernel{'Ex' if self.programmatic else ''} failed with CUDA error "
                                    f"{rc} (grid {self.grid}, "
                                    f"block {self.block}, shared memory {self.smem})")


_torch_stream: Any = None


def current_stream(device: int) -> int:
    """The caller's current stream on ``device``: torch's where torch has
    initialised CUDA in this process (its default stream is CuPy's too), else
    CuPy's."""
    if _torch_stream is not None:
        return _torch_stream(device)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return torch_stream()(device)
    import cupy

    return int(cupy.cuda.get_current_stream().ptr)


def torch_stream() -> Any:
    """torch's raw current-stream getter (device index -> stream handle); call
    it only once torch has initialised CUDA (it stays initialised)."""
    global _torch_stream
    if _torch_stream is None:
        import torch

        _torch_stream = torch._C._cuda_getCurrentRawStream
    return _torch_stream


class ForkJoin:
    """Two independent launches side by side inside a CUDA graph capture.

    On a capturing stream the first launch goes on a second stream forked from
    it (an event recorded on the capturing stream, waited for by the second),
    the second launch on the capturing stream, then the second stream joins
    back (the reverse); the graph gets two branches that run concurrently on
    every replay. Outside a capture both go on the one stream, in order: a
    stream and two events a call would cost the host more than the overlap
    gives an eager step. The stream and events are made at the first capture."""

    def __init__(self, device: int):
        self.device = device
        self._side = self._fork = self._join = 0
        self._finalizer: Any = None

    def __call__(self, stream: int, first: Launch, second: Launch) -> None:
        from cupy.cuda import runtime

        if runtime.streamIsCapturing(stream) != runtime.streamCaptureStatusActive:
            first(stream)
            second(stream)
            return
        if not self._side:
            self._create()
        runtime.eventRecord(self._fork, stream)
        runtime.streamWaitEvent(self._side, self._fork, 0)
        first(self._side)
        second(stream)
        runtime.eventRecord(self._join, self._side)
        runtime.streamWaitEvent(stream, self._join, 0)

    def _create(self) -> None:
        import weakref

        import cupy
        from cupy.cuda import runtime

        with cupy.cuda.Device(self.device):
            side = runtime.streamCreateWithFlags(runtime.streamNonBlocking)
            fork = runtime.eventCreateWithFlags(runtime.eventDisableTiming)
            join = runtime.eventCreateWithFlags(runtime.eventDisableTiming)
        self._side, self._fork, self._join = side, fork, join
        from kvpager import cuda_release

        self._finalizer = weakref.finalize(self, cuda_release.release, _destroy, self.device, side, fork, join)


def _destroy(device: int, side: int, fork: int, join: int) -> None:
    import cupy
    from cupy.cuda import runtime

    with cupy.cuda.Device(device):
        runtime.eventDestroy(fork)
        runtime.eventDestroy(join)
        runtime.streamDestroy(side)
