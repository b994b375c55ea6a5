"""A careless worker's tensors: CPU torch tensors given to a `Client`'s `write` and
`attend` over the mapped CPU pool were refused ("must be a numpy array") where
`KVPool.write` / `attend` and every step plan take them (moving a worker from the
embedded pool to the daemon is one line); now taken, and `attend` answers a
torch q with a torch tensor, as `KVPool.attend`. Every daemon stopped."""

from __future__ import annotations

import numpy as np
import pytest
from daemon_helpers import SMALL, running_server

from kvpager import KVPool
from kvpager.client import Client
from kvpager.errors import InvalidArgument

torch = pytest.importorskip("torch")


def test_a_workers_write_and_attend_take_cpu_torch_tensors_as_the_embedded_pool_does():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(20, SMALL.num_kv_heads, SMALL.head_dim, generator=gen)
    v = torch.randn(20, SMALL.num_kv_heads, SMALL.head_dim, generator=gen)
    q = torch.randn(3, 2 * SMALL.num_kv_heads, SMALL.head_dim, generator=gen)
    pool = KVPool(SMALL)
    try:
        with running_server() as server, Client(server.endpoint) as c:
            [mine] = c.allocate([list(range(20))])
            [ref] = pool.allocate([list(range(20))])
            for layer in range(SMALL.num_layers):
                c.write(layer, mine.slots, k, v)  # (InvalidArgument before)
                pool.write(layer, ref.slots, k, v)
            got = c.attend(1, [mine.seq_id], q, [3])
            want = pool.attend(1, [ref.seq_id], q, [3])
            assert isinstance(got, torch.Tensor) and got.shape == q.shape
            torch.testing.assert_close(got, want)
            np.testing.assert_array_equal(c.kv(0)[1][list(mine.block_table)], pool.kv(0)[1][list(ref.block_table)])
            # a numpy q is still answered with numpy
            assert isinstance(c.attend(1, [mine.seq_id], q.numpy(), [3]), np.ndarray)
            # what the embedded pool refuses, refused alike, nothing written
            before = c.kv(0)[0].copy()
            for bad in (k.double(), k.transpose(0, 1), k.to(torch.bfloat16)):
                with pytest.raises(InvalidArgument):
                    c.write(0, mine.slots, bad, bad)
            np.testing.assert_array_equal(c.kv(0)[0], before)
            server.pool.check_integrity()
    finally:
        pool.close()
