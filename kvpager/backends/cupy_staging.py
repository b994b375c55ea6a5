"""Mapped pinned host memory for the CuPy backend, and the remote tier's
whole-block copies through it.

Pinned host memory allocated as mapped (``cudaHostAllocMapped``) has a
device address, so one swap kernel moves any number of scattered blocks
between it and the device slab. The backend's host (swap) pool is such
memory; so is `Staging`, the buffer through which `read_blocks` /
`write_blocks` copy whole blocks for the remote tier: grown on demand,
kept for the next call, a transfer of more blocks than it holds done in
chunks of ``_STAGE_BYTES``.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

import numpy as np

from kvpager import block_moves, cuda_release
from kvpager.spec import PoolSpec

HOST_ALLOC_PORTABLE = 1
HOST_ALLOC_MAPPED = 2
#: Bytes of the pinned buffer that stages blocks to and from the remote tier
#: (a transfer of more blocks goes in chunks of this size).
_STAGE_BYTES = 64 << 20


def mapped_pointer(host_ptr: int) -> int:
    """The device-side address of mapped pinned memory (cudaHostGetDevicePointer)."""
    from cupy.cuda import runtime

    get = getattr(runtime, "hostGetDevicePointer", None)
    if get is not None:
        return int(get(host_ptr, 0))
    return int(runtime.pointerGetAttributes(host_ptr).devicePointer)


def free_host(ptr: int) -> None:
    from cupy.cuda import runtime

    runtime.freeHost(ptr)


class Staging:
    """The pinned staging buffer of one backend's pool (``spec``) on GPU ``device``."""

    def __init__(self, spec: PoolSpec, device: int):
        self.spec, self.device = spec, device
        self.rows, self._fin = 0, None
        self._host: np.ndarray | None = None
        self._dev = 0

    def take(self, rows: int) -> tuple[np.ndarray, int]:
        """A pinned host buffer mapped into the device, at least ``rows`` blocks
        long: its uint8 rows and its device address (kept for the next call)."""
        from cupy.cuda import runtime

        bpb = self.spec.bytes_per_block
        if self.rows < rows:
            self.free()
            ptr = runtime.hostAlloc(rows * bpb, HOST_ALLOC_MAPPED | HOST_ALLOC_PORTABLE)
            self._fin = weakref.finalize(self, cuda_release.release, free_host, ptr)
            buf = (ctypes.c_byte * (rows * bpb)).from_address(ptr)
            self._host = np.frombuffer(buf, dtype=np.uint8).reshape(rows, bpb)
            self._dev = mapped_pointer(ptr)
            self.rows = rows
        return self._host, self._dev

    def free(self) -> None:
        if self._fin is not None:
            self._host = None
            self._fin()
            self._fin, self.rows = None, 0

    def _chunks(self, n: int) -> range:
        return range(0, n, max(1, _STAGE_BYTES // self.spec.bytes_per_block))

    def read_blocks(self, dev_ptr: int, blocks: np.ndarray, out: np.ndarray) -> None:
        """Blocks of the device pool at ``dev_ptr`` into ``out``: one swap launch per
        staging chunk (device -> pinned host), then a host copy into ``out``."""
        import cupy

        spec, chunks = self.spec, self._chunks(len(blocks))
        with cupy.cuda.Device(self.device):
            for start in chunks:
                part = np.asarray(blocks[start : start + chunks.step], dtype=np.int64)
                host, dev = self.take(min(len(blocks), chunks.step))
                pairs = np.stack([part, np.arange(len(part), dtype=np.int64)], axis=1)
                block_moves.swap(dev_ptr, dev, spec, pairs, spec.num_blocks, self.rows,
                                 self.device, "read")
                cupy.cuda.get_current_stream().synchronize()
                out[start : start + len(part)] = host[: len(part)]

    def write_blocks(self, dev_ptr: int, blocks: np.ndarray, payloads: Any) -> None:
        """``payloads`` into blocks of the device pool at ``dev_ptr``: host copies into
        the pinned staging buffer, then one swap launch per chunk (pinned host ->
        device), synchronised: the K/V is in place on return."""
        import cupy

        spec, chunks = self.spec, self._chunks(len(blocks))
        with cupy.cuda.Device(self.device):
            for start in chunks:
                part = np.asarray(blocks[start : start + chunks.step], dtype=np.int64)
                host, dev = self.take(min(len(blocks), chunks.step))
                for i, data in enumerate(payloads[start : start + len(part)]):
                    host[i] = np.frombuffer(data, dtype=np.uint8)
                pairs = np.stack([np.arange(len(part), dtype=np.int64), part], axis=1)
                block_moves.swap(dev, dev_ptr, spec, pairs, self.rows, spec.num_blocks,
                                 self.device, "restore")
                cupy.cuda.get_current_stream().synchronize()
