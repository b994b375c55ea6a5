"""Regression: a pool garbage-collected while a CUDA graph was being captured
freed its device slab from its finalizer in the middle of the capture, which
CUDA refuses and which invalidates the capture (a flaky failure of whichever
captured step the collector happened to run in). Now the free waits for the
capture to end (`kvpager.cuda_release`). Skips without CuPy, torch or a GPU."""

from __future__ import annotations

import gc

import pytest
from gpu_helpers import cupy_torch_or_skip

cupy, torch = cupy_torch_or_skip()

from kvpager import KVPool, PoolSpec, cuda_release  # noqa: E402

pytestmark = pytest.mark.gpu


def test_a_pool_collected_during_a_capture_is_freed_after_it():
    spec = PoolSpec(num_layers=2, num_kv_heads=8, head_dim=128, num_blocks=4096, block_size=16,
                    dtype="bfloat16")  # a 512 MiB slab
    pool = KVPool(spec, device="cuda:0")
    pool.allocate([[1, 2, 3]])
    x = torch.zeros(8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    # Earlier tests' garbage goes now: a torch CUDA graph among it may not be destroyed
    # during a capture either (torch's own rule), so the collection inside finds the pool alone.
    gc.collect()
    with torch.cuda.graph(graph):
        y = x + 1
        del pool
        gc.collect()  # the pool's finalizer runs while the capture is under way
        kept = cuda_release.pending()
        y += 1
    # (before: the capture's end raised, the capture invalidated by the free)
    assert kept >= 1
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, x + 2)  # the capture is whole
    free_before = torch.cuda.mem_get_info()[0]
    cuda_release.flush()
    assert cuda_release.pending() == 0
    assert torch.cuda.mem_get_info()[0] - free_before >= spec.device_bytes * 0.9  # and the slab is freed now
