"""A tensor-parallel pool (`KVPool(devices=[...])`) against a one-rank pool of
all the heads, op for op: rank r's K/V is the one-rank pool's heads
[r*H/R, (r+1)*H/R) byte for byte, and the ranks' attention outputs, side by
side, are the one-rank pool's attention (prefix hits, forks, copy-on-write,
swap out / in, truncate, the remote tier's block copies)."""

from __future__ import annotations

import numpy as np
import pytest

from kvpager import InvalidArgument, KVPool, PoolSpec
from kvpager.backends.ranked import RankedBackend, check_devices, rank_spec
from kvpager.remote_format import format_id

BS = 8


def spec(heads: int = 4, host: int = 16) -> PoolSpec:
    return PoolSpec(num_layers=2, num_kv_heads=heads, head_dim=16, num_blocks=40, block_size=BS,
                    dtype="float32", num_host_blocks=host)


class Twin:
    """The same ops on a one-rank pool and an R-rank pool, checked after each."""

    def __init__(self, ranks: int, heads: int = 4, q_per_kv: int = 2, seed: int = 0):
        self.one = KVPool(spec(heads))
        self.tp = KVPool(spec(heads), devices=["cpu"] * ranks)
        self.R, self.H, self.Hq = ranks, heads, heads * q_per_kv
        self.rng = np.random.default_rng(seed)

    def write(self, slots: np.ndarray) -> None:
        """Random K/V of all heads: whole into the one-rank pool, each rank its heads."""
        s, h = self.one.spec, self.H // self.R
        for layer in range(s.num_layers):
            k, v = (self.rng.standard_normal((len(slots), self.H, s.head_dim)).astype(np.float32) for _ in "kv")
            self.one.write(layer, slots, k, v)
            for r in range(self.R):
                self.tp.rank(r).write(layer, slots, k[:, r * h : (r + 1) * h].copy(), v[:, r * h : (r + 1) * h].copy())

    def both(self, op: str, *args, **kw):
        a, b = getattr(self.one, op)(*args, **kw), getattr(self.tp, op)(*args, **kw)
        return a, b

    def check(self, seq_ids: list[int]) -> None:
        """Storage byte for byte, every layer's attention (plain and planned)."""
        h = self.H // self.R
        dev, host = self.one.backend.device_array(), self.one.backend.host_array()
        for r in range(self.R):
            mine = self.tp.backend.ranks[r]
            assert np.array_equal(mine.device_array().view(np.uint8), dev[:, :, :, r * h : (r + 1) * h].view(np.uint8))
            assert np.array_equal(mine.host_array(), host[:, :, :, r * h : (r + 1) * h])
        self.one.check_integrity()
        assert self.one.blocks() == self.tp.blocks()
        hq = self.Hq // self.R
        lens = [self.one.sequence(i).num_tokens for i in seq_ids]
        qlens = [min(3, n) for n in lens]
        q = self.rng.standard_normal((sum(qlens), self.Hq, 16)).astype(np.float32)
        for layer in range(self.one.spec.num_layers):
            want = self.one.attend(layer, seq_ids, q, qlens)
            parts = [self.tp.rank(r).attend(layer, seq_ids, q[:, r * hq : (r + 1) * hq].copy(), qlens)
                     for r in range(self.R)]
            np.testing.assert_allclose(np.concatenate(parts, axis=1), want, rtol=1e-5, atol=1e-6)
            planned = [self.tp.rank(r).plan(seq_ids, qlens).attend(layer, q[:, r * hq : (r + 1) * hq].copy(), 0.25)
                       for r in range(self.R)]
            np.testing.assert_allclose(np.concatenate(planned, axis=1),
                                       self.one.plan(seq_ids, qlens).attend(layer, q, 0.25), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ranks,heads,q_per_kv", [(2, 4, 2), (4, 4, 1), (2, 2, 4)])
def test_ranks_equal_one_pool_through_every_op(ranks, heads, q_per_kv):
    t = Twin(ranks, heads, q_per_kv)
    assert t.tp.ranks == ranks and t.one.ranks == 1
    system = list(range(100, 100 + 3 * BS))
    a1, a2 = t.both("allocate", [system + [1, 2, 3]])
    assert a1 == a2
    t.write(a1[0].slots)
    t.both("commit", a1[0].seq_id)
    # a prefix hit: the second sequence shares the system prompt's blocks
    b1, b2 = t.both("allocate", [system + [7, 8, 9, 10, 11]])
    assert b1[0].num_cached_tokens == 3 * BS and b1 == b2
    t.write(b1[0].slots)
    x, y = a1[0].seq_id, b1[0].seq_id
    t.check([x, y])
    # fork, then append to the child: copy-on-write of the shared, partly filled last block
    [[c]], [[c2]] = t.both("fork", x)
    assert c == c2
    s1, s2 = t.both("append", c, 2)
    assert np.array_equal(s1[0], s2[0])
    assert t.one.counters().cow_blocks == t.tp.counters().cow_blocks == 1
    t.write(s1[0])
    t.check([x, y, c])
    # swap out and in: the blocks move through every rank's host pool
    t.both("swap_out", y)
    assert t.one.sequence(y).swapped and t.tp.sequence(y).swapped
    t.check([x, c])
    t.both("swap_in", y)
    t.check([x, y, c])
    # truncate, then a decode step on the truncated sequence
    t.both("truncate", c, 3 * BS + 1)
    s1, s2 = t.both("append", c, 1)
    assert np.array_equal(s1[0], s2[0])
    t.write(s1[0])
    t.check([x, y, c])
    t.both("free", [x])
    t.check([y, c])
    t.tp.check_integrity()


def test_rank_views_and_stats():
    pool = KVPool(spec(4), devices=["cpu", "cpu"])
    assert [pool.rank(r).heads for r in range(2)] == [range(0, 2), range(2, 4)]
    assert pool.rank(1).spec.num_kv_heads == 2
    k, v = pool.rank(1).kv(0)
    assert k.shape == (40, 2, BS, 16)
    st = pool.stats()
    assert st.ranks == 2 and st.bytes_per_block == spec(4).bytes_per_block
    assert st.bytes_per_block_per_rank == spec(2).bytes_per_block == st.bytes_per_block // 2
    one = KVPool(spec(4))
    assert one.stats().ranks == 1 and one.rank(0).spec == one.spec
    assert one.rank(0).kv(1)[0].shape == (40, 4, BS, 16)


def test_block_bytes_are_the_ranks_bytes_back_to_back():
    """The remote tier's block copies: a block's value is rank 0's bytes, then
    rank 1's; restoring it into another two-rank pool gives the same K/V."""
    t = Twin(2)
    [a] = t.tp.allocate([list(range(2 * BS))])
    t.one.allocate([list(range(2 * BS))])
    t.write(a.slots)
    blocks = np.asarray(a.block_table, np.int64)
    out = np.zeros((2, spec(4).bytes_per_block), np.uint8)
    t.tp.backend.read_blocks(blocks, out)
    per = spec(2).bytes_per_block
    for r in range(2):
        rows = t.tp.backend.ranks[r].device_array()[blocks].reshape(2, -1).view(np.uint8)
        assert np.array_equal(out[:, r * per : (r + 1) * per], rows)
    other = KVPool(spec(4), devices=["cpu", "cpu"])
    other.backend.write_blocks(blocks[::-1].copy(), [bytes(out[0]), memoryview(out[1])])
    for r in range(2):
        got = other.backend.ranks[r].device_array()[blocks[::-1]]
        assert np.array_equal(got, t.tp.backend.ranks[r].device_array()[blocks])
    # a one-rank and a two-rank pool of one geometry never share remote keys
    assert format_id(spec(4)) != format_id(spec(4), 2) != format_id(spec(4), 4)


def test_bad_input_is_typed_and_changes_nothing():
    with pytest.raises(InvalidArgument, match="cannot be split over 3 ranks"):
        KVPool(spec(4), devices=["cpu"] * 3)
    with pytest.raises(InvalidArgument, match="appears twice"):
        check_devices(["cuda:0", "cuda:1", "cuda:0"])
    with pytest.raises(InvalidArgument, match="must all be 'cpu'"):
        check_devices(["cpu", "cuda:0"])
    with pytest.raises(InvalidArgument, match="non-empty"):
        KVPool(spec(4), devices=[])
    with pytest.raises(InvalidArgument, match="device must be"):
        check_devices("cuda:0,gpu1")
    with pytest.raises(InvalidArgument, match="not both"):
        KVPool(spec(4), "cuda:0", devices=["cpu", "cpu"])
    with pytest.raises(InvalidArgument, match="positive integer"):
        rank_spec(spec(4), 0)
    assert check_devices("cuda:1, cuda") == ["cuda:1", "cuda:0"]
    with pytest.raises(InvalidArgument, match="two ranks"):
        RankedBackend(spec(4), [KVPool(spec(4)).backend])
    pool = KVPool(spec(4), devices=["cpu", "cpu"])
    [a] = pool.allocate([list(range(BS + 2))])
    for bad in (2, -1, True, "0", None):
        with pytest.raises(InvalidArgument, match="rank must be"):
            pool.rank(bad)
    kv = np.zeros((len(a.slots), 4, 16), np.float32)
    before = [b.device_array().copy() for b in pool.backend.ranks]
    # the whole pool's per-layer ops name the rank views
    for call in (lambda: pool.write(0, a.slots, kv, kv), lambda: pool.attend(0, a.seq_id, np.zeros((1, 4, 16), np.float32)),
                 lambda: pool.plan(a.seq_id), lambda: pool.kv(0)):
        with pytest.raises(InvalidArgument, match=r"pool.rank\(r\)"):
            call()
    # a rank takes its own heads only
    with pytest.raises(InvalidArgument, match="shape"):
        pool.rank(0).write(0, a.slots, kv, kv)
    with pytest.raises(InvalidArgument, match="num_kv_heads=2"):
        pool.rank(1).attend(0, a.seq_id, np.zeros((1, 3, 16), np.float32))
    assert all(np.array_equal(b.device_array(), x) for b, x in zip(pool.backend.ranks, before))
    pool.check_integrity()
