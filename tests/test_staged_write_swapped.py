"""A staged write's check of the blocks its session holds (`StagingOps._held`)
when one of the session's sequences is swapped out: the daemon then built a
`SequenceInfo` for every sequence of the session, on its loop, for the first
write after each change of the session (a commit is one). A client holding
65,000 forks of one sequence and one sequence swapped out held the loop
250 ms for each commit and write (3 ms without the swapped one), as long as it
liked. The rows are gathered in one pass now, swapped-out ones included, and
the check refuses and allows what it did.
Against a daemon in a thread on a fresh ipc:// endpoint; a client without the
mapped pool, so every write is staged and checked by the daemon."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from daemon_helpers import running_server

from kvpager import Client, PoolSpec
from kvpager.errors import NotOwner

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=24, block_size=8, dtype="float32",
                num_host_blocks=8)
BS = SPEC.block_size


def _kv(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k, v = (rng.standard_normal((n, SPEC.num_kv_heads, SPEC.head_dim)).astype(np.float32) for _ in range(2))
    return k, v


def _no_infos(server: Any) -> None:
    """The daemon's pool refuses to list sequences one `SequenceInfo` at a time from
    now: a staged write's check that did so is answered `internal`."""

    def refused(*args: Any, **kw: Any) -> Any:
        raise AssertionError("a staged write's check built a SequenceInfo for every sequence of the session")

    server.pool.sequences = refused


def test_a_swapped_out_sequence_leaves_the_held_blocks_one_gather():
    with running_server(SPEC) as server, Client(server.endpoint, map_pool=False) as c:
        n = BS + 3  # one full block and a partial one
        [a] = c.allocate([list(range(n))])
        [[child]] = c.fork(a.seq_id)  # shares both of a's blocks
        [s] = c.allocate([list(range(500, 500 + BS + 2))])  # two blocks of its own
        c.swap_out(child)  # its blocks are shared: they stay on the device, held by it
        c.swap_out(s.seq_id)  # its blocks go to the host and are free on the device
        c.free(a.seq_id)  # the child alone holds a's blocks now, swapped out
        _no_infos(server)
        # a block the swapped-out child still holds on the device: the session's to write
        c.write(0, a.slots, *_kv(1, n))
        k, _ = server.pool.kv(0)
        slots = np.asarray(a.slots, np.int64)
        np.testing.assert_array_equal(np.asarray(k[slots // BS, :, slots % BS]), _kv(1, n)[0])
        # blocks the other sequence moved to the host are no longer the session's
        with pytest.raises(NotOwner, match="not held by any sequence of this session"):
            c.write(0, s.slots, *_kv(2, len(s.slots)))
        # after a change of the session (a copy-on-write of a fresh fork's shared block), looked at again
        [b] = c.allocate([list(range(900, 900 + 3))])
        [[bc]] = c.fork(b.seq_id)
        [slot] = c.append(bc, 1)[0]  # copy-on-write: the fork's last block is a copy now
        c.write(1, [slot], *_kv(3, 1))
        c.write(1, list(b.slots), *_kv(4, 3))
