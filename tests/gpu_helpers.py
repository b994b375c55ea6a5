"""The GPU tests' shared preamble."""

from __future__ import annotations

from typing import Any

import pytest


def cupy_or_skip() -> Any:
    """CuPy, or skip the calling test module where CuPy or a CUDA device is missing."""
    cupy = pytest.importorskip("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        count = 0
    if count == 0:
        pytest.skip("no CUDA device", allow_module_level=True)
    return cupy


def cupy_torch_or_skip() -> tuple[Any, Any]:
    """CuPy and torch, or skip the calling test module where either, a CUDA device
    or torch's CUDA is missing."""
    cupy = cupy_or_skip()
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here", allow_module_level=True)
    return cupy, torch


class CapturedDecode:
    """A two-layer decode step captured in a CUDA graph, the scaffolding the captured-step
    tests share: sequences of ``lens`` random tokens, prefilled with random K/V in both
    layers of ``pool``; static buffers ``q``, ``k``, ``v`` ([layer, bucket, heads, head
    dim], zero past the live rows) that a replay reads; a refillable plan of each
    sequence's next token (``bucket`` rows, tables ``width`` blocks wide); and
    ``step(plan, q, k, v)`` run once on a side stream (kernels compiled, launches packed)
    and then captured. Its outputs are ``outs``; a test refills the buffers (`fill`) and
    the plan (``plan.update``) and calls ``graph.replay()``."""

    def __init__(self, pool: Any, lens: list[int], bucket: int, width: int, num_q_heads: int, step: Any,
                 seed: int):
        import numpy as np
        import torch

        self.g = torch.Generator().manual_seed(seed)
        spec = pool.spec
        hkv, d, dtype = spec.num_kv_heads, spec.head_dim, getattr(torch, spec.dtype)
        allocs = pool.allocate([list(range(100 + i, 100 + i + n)) for i, n in enumerate(lens)])
        self.ids = [a.seq_id for a in allocs]
        prefill = pool.plan(self.ids, lens, np.concatenate([a.slots for a in allocs]))
        for layer in range(2):
            prefill.write(layer, self.rand(sum(lens), hkv, d, dtype=dtype), self.rand(sum(lens), hkv, d, dtype=dtype))
        self.k, self.v = (torch.zeros(2, bucket, hkv, d, dtype=dtype, device="cuda") for _ in range(2))
        self.q = torch.zeros(2, bucket, num_q_heads, d, dtype=dtype, device="cuda")
        self.fill(len(self.ids))
        self.plan = pool.plan(self.ids, None, pool.append_flat(self.ids, 1), num_rows=bucket, width=width,
                              num_q_heads=num_q_heads)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(self.plan, self.q, self.k, self.v)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outs = step(self.plan, self.q, self.k, self.v)

    def rand(self, *shape: int, dtype: Any) -> Any:
        import torch

        return torch.randn(*shape, generator=self.g).to(dtype).cuda()

    def fill(self, n: int) -> None:
        """New random q, k and v in the first ``n`` rows of the static buffers, zeros after."""
        for t in (self.k, self.v, self.q):
            t.zero_()
            t[:, :n] = self.rand(2, n, t.shape[2], t.shape[3], dtype=t.dtype)
