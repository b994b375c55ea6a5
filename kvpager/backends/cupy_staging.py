"""The CuPy backend's block copies for the remote tier: whole blocks through a pinned staging buffer.

`StagedBlocks` is mixed into `CupyBackend`. A transfer copies at most
`_STAGE_BYTES` at a time: device -> mapped pinned host by the swap kernel, then
a host copy (reads), or the other way round (restores), each chunk synchronised
so the bytes are in place on return. The buffer is kept for the next transfer
and grows when one needs more rows; `CupyBackend.close` frees it.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

import cupy
import numpy as np
from cupy.cuda import runtime

from kvpager import block_moves

#: cudaHostAlloc flags: pinned memory every context sees, mapped into the device's address space.
HOST_ALLOC_PORTABLE = 1
HOST_ALLOC_MAPPED = 2
#: Bytes of the pinned buffer that stages blocks to and from the remote tier
#: (a transfer of more blocks goes in chunks of this size).
_STAGE_BYTES = 64 << 20


def _free_host(ptr: int) -> None:
    runtime.freeHost(ptr)


class StagedBlocks:
    """`Backend.read_blocks` / `write_blocks` of `CupyBackend` (which supplies
    ``spec``, ``index``, ``_dev_ptr``, ``_stage_rows`` / ``_stage_fin`` set to
    0 / None at construction, ``_mapped_pointer`` and ``_check_open``)."""

    def _stage(self, rows: int) -> tuple[np.ndarray, int]:
        """A pinned host buffer mapped into the device, at least ``rows`` blocks
        long: its uint8 rows and its device address (kept for the next call)."""
        bpb = self.spec.bytes_per_block
        if self._stage_rows < rows:
            self._free_stage()
            ptr = runtime.hostAlloc(rows * bpb, HOST_ALLOC_MAPPED | HOST_ALLOC_PORTABLE)
            self._stage_fin = weakref.finalize(self, _free_host, ptr)
            buf = (ctypes.c_byte * (rows * bpb)).from_address(ptr)
            self._stage_host = np.frombuffer(buf, dtype=np.uint8).reshape(rows, bpb)
            self._stage_dev = self._mapped_pointer(ptr)
            self._stage_rows = rows
        return self._stage_host, self._stage_dev

    def _free_stage(self) -> None:
        if self._stage_fin is not None:
            self._stage_host = None
            self._stage_fin()
            self._stage_fin, self._stage_rows = None, 0

    def _chunks(self, n: int) -> range:
        return range(0, n, max(1, _STAGE_BYTES // self.spec.bytes_per_block))

    def read_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        """One swap launch per staging chunk (device -> pinned host), then a host copy into ``out``."""
        self._check_open()
        spec, chunks = self.spec, self._chunks(len(blocks))
        with cupy.cuda.Device(self.index):
            for start in chunks:
                part = np.asarray(blocks[start : start + chunks.step], dtype=np.int64)
                host, dev = self._stage(min(len(blocks), chunks.step))
                pairs = np.stack([part, np.arange(len(part), dtype=np.int64)], axis=1)
                block_moves.swap(self._dev_ptr, dev, spec, pairs, spec.num_blocks, self._stage_rows,
                             self.index, "read")
                cupy.cuda.get_current_stream().synchronize()
                out[start : start + len(part)] = host[: len(part)]

    def write_blocks(self, blocks: np.ndarray, payloads: Any) -> None:
        """Host copies into the pinned staging buffer, then one swap launch per
        chunk (pinned host -> device), synchronised: the K/V is in place on return."""
        self._check_open()
        spec, chunks = self.spec, self._chunks(len(blocks))
        with cupy.cuda.Device(self.index):
            for start in chunks:
                part = np.asarray(blocks[start : start + chunks.step], dtype=np.int64)
                host, dev = self._stage(min(len(blocks), chunks.step))
                for i, data in enumerate(payloads[start : start + len(part)]):
                    host[i] = np.frombuffer(data, dtype=np.uint8)
                pairs = np.stack([np.arange(len(part), dtype=np.int64), part], axis=1)
                block_moves.swap(dev, self._dev_ptr, spec, pairs, self._stage_rows, spec.num_blocks,
                             self.index, "restore")
                cupy.cuda.get_current_stream().synchronize()
