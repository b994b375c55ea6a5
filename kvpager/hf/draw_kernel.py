"""The launch of ``cuda/sample_rows.cu`` on a pass's logits (torch tensors on a
GPU): every row's penalties, filters and draw in one kernel, a CTA a row,
on torch's current stream; the tokens its NumPy twin (`kvpager.hf.draws`)
gives, bit for bit.

A row's parameters reach the device in one asynchronous copy of one packed
buffer (`pack`); the kernel also counts each drawn token into the prompts'
seen / generated tables where ``record``."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch

from kvpager import kernels, launch
from kvpager.hf.draws import scale_bits
from kvpager.hf.passes import array_to_device

DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
#: a CTA's threads: 1024 took 0.58-0.64x the time of 512 at 64 rows of a 128k vocabulary, 0.90-1.05x at
#: 256 (H200; docs/benchmarks.md "Latest: session 39")
THREADS = 1024
#: MAX_TILES tiles of THREADS * PER tokens (sample_rows.cu), at the fewest threads it builds with (256)
MAX_VOCAB = 256 * 256 * 8


def pack(u: np.ndarray, ints: np.ndarray, floats: np.ndarray) -> np.ndarray:
    """One uint8 buffer of a pass's rows: ``u`` float64 [n], then ``ints`` int64
    [n, 2] (top-k, the row's table index), then ``floats`` float32 [n, 7]."""
    n = len(u)
    out = np.empty(52 * n, dtype=np.uint8)
    out[: 8 * n].view(np.float64)[:] = u
    out[8 * n : 24 * n].view(np.int64)[:] = ints.reshape(-1)
    out[24 * n :].view(np.float32)[:] = floats.reshape(-1)
    return out


def usable(logits: torch.Tensor) -> bool:
    """Whether the kernel takes these logits (else the twin does, on the host)."""
    return logits.is_cuda and logits.dtype in DTYPES and 0 < logits.shape[1] <= MAX_VOCAB


class RowSampler:
    """The kernel on one GPU, its launches kept by (logits dtype, rows)."""

    def __init__(self, device: torch.device, threads: int = THREADS):
        self.device, self.threads = device, threads
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self._launches: dict[tuple[int, int], tuple[launch.Launch, list[Any]]] = {}

    def __call__(self, logits: torch.Tensor, u: np.ndarray, ints: np.ndarray, floats: np.ndarray,
                 seen: torch.Tensor | None, counts: torch.Tensor | None, record: bool) -> torch.Tensor:
        """int64 [n] tokens of ``logits`` [n, V] (`usable`); ``seen`` (bool) and
        ``counts`` (int32) [prompts, V] or None, ``ints[:, 1]`` indexing them."""
        n, vocab = logits.shape
        if n == 0:  # (a grid of no CTAs is a launch error)
            return torch.empty(0, dtype=torch.int64, device=self.device)
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        params = array_to_device(pack(u, ints, floats), self.device)
        scratch = torch.empty((n, vocab), dtype=torch.float32, device=self.device)
        tokens = torch.empty(n, dtype=torch.int64, device=self.device)
        run, cells = self._launch(DTYPES[logits.dtype], n)
        base = params.data_ptr()
        values = (logits.data_ptr(), logits.stride(0), vocab, base + 24 * n, base + 8 * n, base,
                  seen.data_ptr() if seen is not None else 0, counts.data_ptr() if counts is not None else 0,
                  int(record), float(2.0 ** scale_bits(vocab)), scratch.data_ptr(), tokens.data_ptr())
        for cell, value in zip(cells, values):
            cell.value = value
        run(launch.current_stream(self.index))
        return tokens

    def _launch(self, dtype: int, n: int) -> tuple[launch.Launch, list[Any]]:
        key = (dtype, n)
        got = self._launches.get(key)
        if got is None:
            fn = kernels.get_kernel("sample_rows.cu", "sample_rows", {"LOGIT_DTYPE": dtype, "THREADS": self.threads},
                                    self.index)
            cells = [launch.ptr(), launch.i64(), launch.i32(), launch.ptr(), launch.ptr(), launch.ptr(),
                     launch.ptr(), launch.ptr(), launch.i32(), ctypes.c_float(), launch.ptr(), launch.ptr()]
            got = self._launches[key] = (launch.Launch(fn, (n,), self.threads, 0, cells, self.index), cells)
        return got
