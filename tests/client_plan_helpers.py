"""Shared pieces of the tests of a worker's mirror of its block tables
(`Client` + `TableMirror`) against the daemon: the pool, snapshots of the
mirror, the check that it gathers exactly the daemon's tables, random K/V
writes and attention both ways."""

from __future__ import annotations

import numpy as np
import pytest

from kvpager.client import Client
from kvpager.errors import SequenceSwapped
from kvpager.spec import PoolSpec

BS = 8
SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=48, block_size=BS,
                dtype="float32", num_host_blocks=12)
WAIT = 30  # seconds: the bound of every wait


def snapshot(c: Client):
    m = c._mirror
    return (dict(m.rows), set(m.swapped), m.table.table.copy(), m.table.num_blocks.copy(),
            m.table.num_tokens.copy())


def assert_unchanged(before, c: Client) -> None:
    after = snapshot(c)
    assert after[:2] == before[:2]
    for x, y in zip(after[2:], before[2:]):
        np.testing.assert_array_equal(x, y)


def assert_mirrors_daemon(c: Client) -> None:
    """The mirror holds exactly this session's sequences, swapped as the daemon
    says, and gathers the daemon's tables (counted by the daemon, not the mirror)."""
    own = [s for s in c.sequences() if s.owner == c.session_name]
    assert sorted(c._mirror.rows) == [s.seq_id for s in own]
    assert c._mirror.swapped == {s.seq_id for s in own if s.swapped}
    resident = [s.seq_id for s in own if not s.swapped]
    tables, lens = c._mirror.gather(resident)
    want_tables, want_lens = c._call("tables", {"seq_ids": resident})
    assert tables.dtype == want_tables.dtype and lens.dtype == want_lens.dtype
    np.testing.assert_array_equal(tables, want_tables)
    np.testing.assert_array_equal(lens, want_lens)
    for s in own:
        if s.swapped:
            with pytest.raises(SequenceSwapped):
                c.tables([s.seq_id])
            with pytest.raises(SequenceSwapped):
                c._call("tables", {"seq_ids": [s.seq_id]})


def write_random(c: Client, slots, rng) -> None:
    shape = (len(slots), SPEC.num_kv_heads, SPEC.head_dim)
    for layer in range(c.spec.num_layers):
        c.write(layer, slots, rng.standard_normal(shape).astype(np.float32),
                rng.standard_normal(shape).astype(np.float32))


def attend_both(c: Client, ids: list[int], qlens: list[int], rng):
    q = rng.standard_normal((sum(qlens), 4, SPEC.head_dim)).astype(np.float32)
    for layer in range(c.spec.num_layers):
        local = c.local_attend(layer, ids, q, qlens)
        remote = c.remote_attend(layer, ids, q, qlens)
        np.testing.assert_array_equal(local, remote)
