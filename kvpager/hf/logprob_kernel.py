"""The launch of ``cuda/token_logprobs.cu`` on a pass's logits (torch tensors on a
GPU): each row's token log-probability and its k most likely tokens' in one
kernel, a CTA a row, one read of the row, on torch's current stream. Its
reference is the torch path of `kvpager.hf.logprobs.TokenLogprobs.of`.

Built for a few top sizes (`TOPS`); a launch takes the smallest that holds its
``k`` (the kernel keeps that many a thread, in registers), none past the
largest (the torch path takes those)."""

from __future__ import annotations

from typing import Any

import torch

from kvpager import kernels, launch

DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
#: the top sizes built: a thread's list, in registers (sm_90, none spilled: 61 registers up to 16 at
#: 1,024 threads, 108 for 32 at 512)
TOPS = (0, 1, 2, 4, 8, 16, 32)
#: a CTA's threads, by top size: 1,024 up to 16 (64 registers a thread at most), 512 for 32; None: those
THREADS: int | None = None


def usable(logits: torch.Tensor, k: int) -> bool:
    """Whether the kernel takes these logits and this ``k`` (else the torch path)."""
    return (logits.is_cuda and logits.dtype in DTYPES and logits.dim() == 2 and logits.shape[1] > 0
            and k <= TOPS[-1] and logits.stride(1) == 1 and logits.shape[1] < 2**31)


class LogprobKernel:
    """The kernel on one GPU, its launches kept by (logits dtype, top size, rows)."""

    def __init__(self, device: torch.device, threads: int | None = None):
        self.device, self.threads = device, threads or THREADS
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self._launches: dict[tuple[int, int, int], tuple[launch.Launch, list[Any]]] = {}

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """float64 [n, 1 + 2k] (`TokenLogprobs.of`'s layout) of ``tokens`` (int64 [n])
        under the first n rows of ``logits`` [>= n, vocab] (`usable`)."""
        n = tokens.shape[0]
        out = torch.empty((n, 1 + 2 * k), dtype=torch.float64, device=self.device)
        if n == 0:  # (a grid of no CTAs is a launch error)
            return out
        tokens = tokens.reshape(n)
        if tokens.dtype != torch.int64 or not tokens.is_contiguous():
            tokens = tokens.to(torch.int64).contiguous()
        top = next(t for t in TOPS if t >= k)
        run, cells = self._launch(DTYPES[logits.dtype], top, n)
        for cell, value in zip(cells, (logits.data_ptr(), logits.stride(0), logits.shape[1], tokens.data_ptr(), k,
                                       out.data_ptr())):
            cell.value = value
        run(launch.current_stream(self.index))
        return out

    def _launch(self, dtype: int, top: int, n: int) -> tuple[launch.Launch, list[Any]]:
        key = (dtype, top, n)
        got = self._launches.get(key)
        if got is None:
            threads = self.threads or (1024 if top <= 16 else 512)
            fn = kernels.get_kernel("token_logprobs.cu", "token_logprobs",
                                    {"LOGIT_DTYPE": dtype, "TOP": top, "THREADS": threads}, self.index)
            cells = [launch.ptr(), launch.i64(), launch.i32(), launch.ptr(), launch.i32(), launch.ptr()]
            got = self._launches[key] = (launch.Launch(fn, (n,), threads, 0, cells, self.index), cells)
        return got
