"""Forked samples appended in one batch: a shared, partly filled last block
whose every reference is a row of the batch is copied for all of its sharers
but the last, which writes it in place, so the batch never needs more blocks
than appending its sequences one at a time (vLLM holds such samples as
separate requests at that pool size). A block shared with a sequence outside
the batch, or pinned, is copied for every sharer; a published one is
un-published by the row that writes it in place, as one at a time.

Each case runs with the compiled decode step and with the NumPy one
(``KVPAGER_NATIVE=0``'s), as a decode step and as a multi-token append: the
batch's peak need against one-at-a-time's (and the batch run in a pool left
with exactly that), the copies made, the block accounting, and the bytes:
each sequence writes its own K/V after the step and reads back the shared
prefix, then its own."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from kvpager import KVPool, PoolSpec, native
from kvpager.errors import OutOfBlocks

BS = 16
HEADS, DIM = 2, 4
STEPS = {"native": native.DECODE, "numpy": None}


@dataclass
class Case:
    """A pool, the batch to append to and the K/V every live sequence should hold
    (one value a position: K is it, V its negative)."""

    pool: KVPool
    batch: list[int]
    expect: dict[int, list[float]] = field(default_factory=dict)
    in_place: list[int] = field(default_factory=list)  # rows of the batch that keep their last block
    copies: int = 0  # copies the batch makes


def kv_of(values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    k = np.repeat(np.asarray(values, np.float32)[:, None, None], HEADS, 1).repeat(DIM, 2)
    return k, -k


def prompt_seq(c: Case, n: int, base: float) -> int:
    """A committed prompt of ``n`` tokens whose K/V is written (values base + position)."""
    [a] = c.pool.allocate([list(range(int(base), int(base) + n))])
    values = [base + p for p in range(n)]
    c.pool.write(0, a.slots, *kv_of(values))
    c.pool.commit(a.seq_id)
    c.expect[a.seq_id] = values
    return a.seq_id


def fork(c: Case, parent: int, n: int) -> list[int]:
    [kids] = c.pool.fork([parent], n)
    for s in kids:
        c.expect[s] = list(c.expect[parent])
    return kids


def truncate(c: Case, ids: list[int], n: int) -> None:
    c.pool.truncate(ids, [n] * len(ids))
    for s in ids:
        c.expect[s] = c.expect[s][:n]


def new_case(native_step: object) -> Case:
    c = Case(KVPool(PoolSpec(num_layers=1, num_kv_heads=HEADS, head_dim=DIM, num_blocks=48, block_size=BS,
                             dtype="float32")), [])
    c.pool.manager.native = native_step
    return c


def samples(k: int):
    """A 37-token prompt forked into k samples, all in the batch: k - 1 copies."""
    def build(c: Case) -> None:
        a = prompt_seq(c, 37, 100)
        c.batch = [a, *fork(c, a, k - 1)]
        c.in_place, c.copies = [c.batch[-1]], k - 1
    return build


def mixed(c: Case) -> None:
    """Samples of one prompt interleaved with sequences of their own (one at a block
    boundary, one mid-block), and a pair whose block a third sample outside the batch
    holds too: both of that pair copy."""
    a = prompt_seq(c, 37, 100)
    kids = fork(c, a, 2)
    boundary, own = prompt_seq(c, 32, 500), prompt_seq(c, 20, 700)
    d = prompt_seq(c, 40, 900)
    [d1, _outside] = fork(c, d, 2)
    c.batch = [a, boundary, kids[0], d, own, kids[1], d1]
    c.in_place, c.copies = [kids[1], own], 2 + 2


def published(c: Case) -> None:
    """Two sequences cut back into a published block they share (truncated after a
    fork): the first copies it, the second writes it in place and un-publishes it;
    beside them a forked pair, the parent outside the batch."""
    a = prompt_seq(c, 40, 100)
    [b] = fork(c, a, 1)
    truncate(c, [a, b], 20)
    assert c.pool.manager.pool.cache.cached[c.pool.sequence(a).block_table[1]]
    p = prompt_seq(c, 21, 300)
    [q] = fork(c, p, 1)
    c.batch = [a, q, b]
    c.in_place, c.copies = [b], 1 + 1


def pinned(c: Case) -> None:
    """As `published`, the block pinned besides: a third reference, so both copy;
    and a forked pair beside them, all in the batch."""
    a = prompt_seq(c, 40, 100)
    assert c.pool.pin([list(range(100, 140))]) == [32]
    [b] = fork(c, a, 1)
    truncate(c, [a, b], 20)
    p = prompt_seq(c, 21, 300)
    [q] = fork(c, p, 1)
    c.batch = [a, p, b, q]
    c.in_place, c.copies = [q], 2 + 1


CASES = {"2 samples": samples(2), "3 samples": samples(3), "4 samples": samples(4), "mixed": mixed,
         "published": published, "pinned": pinned}


def peak_need(c: Case, run) -> int:
    """The most blocks ``run`` takes beyond what its own copies give back: the
    free and evictable blocks before it less the fewest left right after any
    taking."""
    bp = c.pool.manager.pool
    before = lowest = bp.get_num_free_blocks()
    take = bp.get_new_blocks

    def counted(n, *a, **kw):
        nonlocal lowest
        out = take(n, *a, **kw)
        lowest = min(lowest, bp.get_num_free_blocks())
        return out

    bp.get_new_blocks = counted
    try:
        run()
    finally:
        del bp.get_new_blocks
    return before - lowest


def leave(c: Case, room: int) -> None:
    """Fill the pool until ``room`` blocks are left (nothing in it is evictable)."""
    bp = c.pool.manager.pool
    assert not bp.num_evictable
    fill = bp.get_num_free_blocks() - room
    if fill:
        c.pool.allocate([list(range(10**6, 10**6 + fill * BS))])
    assert bp.get_num_free_blocks() == room


def counts_for(c: Case, how: str) -> list[int]:
    if how == "decode":
        return [1] * len(c.batch)
    if how == "three":
        return [3] * len(c.batch)
    return [1 + i % 4 for i in range(len(c.batch))]  # a few each, BS - 1 at most


def append(c: Case, ids: list[int], counts: list[int]) -> list[np.ndarray]:
    if len(set(counts)) == 1:
        return c.pool.append(ids, counts[0])
    return c.pool.append(ids, counts)


def check_bytes(c: Case) -> None:
    """Every live sequence's K/V read back through its table: what it should hold."""
    k_all, v_all = c.pool.kv(0)
    for s, values in c.expect.items():
        table = np.asarray(c.pool.sequence(s).block_table)
        pos = np.arange(len(values))
        k = k_all[table[pos // BS], :, pos % BS]
        v = v_all[table[pos // BS], :, pos % BS]
        want_k, want_v = kv_of(values)
        np.testing.assert_array_equal(k, want_k, err_msg=f"sequence {s}")
        np.testing.assert_array_equal(v, want_v, err_msg=f"sequence {s}")


@pytest.mark.parametrize("how", ["decode", "three", "mixed counts"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("step", list(STEPS))
def test_a_batch_needs_what_one_at_a_time_needs_and_writes_the_right_bytes(step, case, how):
    if step == "native" and STEPS[step] is None:
        pytest.skip("kvpager._native was not built")
    # one at a time
    one = new_case(STEPS[step])
    CASES[case](one)
    counts = counts_for(one, how)
    single = peak_need(one, lambda: [append(one, [s], [n]) for s, n in zip(one.batch, counts)])
    one.pool.check_integrity()
    # the batch
    c = new_case(STEPS[step])
    CASES[case](c)
    lasts = {s: c.pool.sequence(s).block_table[-1] for s in c.in_place}
    cow = c.pool.counters().cow_blocks
    batch = peak_need(c, lambda: append(c, c.batch, counts))
    assert batch <= single
    assert c.pool.counters().cow_blocks - cow == c.copies
    for s in c.in_place:  # the in-place rows kept their blocks (no copy for them)
        assert c.pool.sequence(s).block_table[(len(c.expect[s])) // BS] == lasts[s]
    c.pool.check_integrity()
    # each sequence writes its own K/V at its new slots, then reads everything back
    slots = [c.pool.sequence(s).num_tokens for s in c.batch]
    for i, (s, n) in enumerate(zip(c.batch, counts)):
        own = [10_000 * (i + 1) + j for j in range(n)]
        pos = np.arange(slots[i] - n, slots[i])
        table = np.asarray(c.pool.sequence(s).block_table)
        c.pool.write(0, table[pos // BS] * BS + pos % BS, *kv_of(own))
        c.expect[s] = c.expect[s] + own
    check_bytes(c)
    # and the batch runs in a pool left with exactly what one at a time needs
    tight = new_case(STEPS[step])
    CASES[case](tight)
    leave(tight, single)
    append(tight, tight.batch, counts)
    tight.pool.check_integrity()


@pytest.mark.parametrize("step", list(STEPS))
def test_the_slots_returned_are_the_ones_read_back(step):
    """The slots `append` returns (not the tables) written: the in-place sample's
    slot is in the prompt's block, the others' in their copies."""
    if step == "native" and STEPS[step] is None:
        pytest.skip("kvpager._native was not built")
    c = new_case(STEPS[step])
    samples(4)(c)
    shared = c.pool.sequence(c.batch[0]).block_table[-1]
    slots = c.pool.append(c.batch, 1)
    blocks = [int(s[0]) // BS for s in slots]
    assert blocks[-1] == shared and shared not in blocks[:-1] and len(set(blocks)) == 4
    for i, (s, slot) in enumerate(zip(c.batch, slots)):
        c.pool.write(0, slot, *kv_of([float(i + 1)]))
        c.expect[s].append(float(i + 1))
    check_bytes(c)
    c.pool.free(c.batch)
    c.pool.check_integrity()
    assert c.pool.stats().used_blocks == 0


def test_the_pool_of_the_trace_holds_two_samples_decoding_together():
    """The trace of the report: 4 usable blocks, a 37-token prompt (3 blocks) and
    one fork: the pair's decode step fits the one block left, as one at a time."""
    for step in STEPS.values():
        pool = KVPool(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=5, dtype="float32"))
        pool.manager.native = step
        [a] = pool.allocate([list(range(37))])
        [[child]] = pool.fork([a.seq_id])
        pool.append([a.seq_id, child], 1)
        pool.check_integrity()
        assert pool.stats().free_blocks == 0
        with pytest.raises(OutOfBlocks, match="needed 2, available 0"):
            pool.append([a.seq_id, child], BS)
