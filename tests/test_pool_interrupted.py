"""An embedded `KVPool` op left half-way by an exception no check raised
(KeyboardInterrupt at any line of it: Ctrl-C in a notebook during generate;
MemoryError; a bug): the pool's bookkeeping is checked, and a pool found
broken refuses every op on its sequences and K/V with IntegrityError, naming
what broke it, instead of serving tables and hits that no longer hold (Ctrl-C
during allocates broke 15 pools in 60, and they served on). One left between
its bookkeeping change and the end of the K/V copies it asked for (swap out or
in, an append's copy-on-write, in a batch too) is broken whatever the check
says: its bookkeeping held, and attention read another block's K/V (or zeros)
with no error. One left before anything changed goes on."""

from __future__ import annotations

import random
import signal

import numpy as np
import pytest

from kvpager import KVPool, PoolSpec
from kvpager.errors import IntegrityError, InvalidArgument, NotSwapped, OutOfBlocks

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=4000, block_size=16, dtype="float32")


def test_an_allocate_left_after_taking_blocks_breaks_the_pool_for_good(monkeypatch):
    pool = KVPool(SPEC)
    [a] = pool.allocate([list(range(3, 43))])
    append = pool.append_flat  # (a bound method taken before: refused all the same)
    real = pool.manager.pool.get_new_blocks

    def taken_then_interrupted(n):
        real(n)
        raise KeyboardInterrupt

    monkeypatch.setattr(pool.manager.pool, "get_new_blocks", taken_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        pool.allocate([[5] * 40, [6] * 40])  # (a batch: one prompt takes an inline path)
    monkeypatch.undo()
    assert pool.broken is not None and "allocate was left half-way by KeyboardInterrupt" in pool.broken
    for op in (lambda: pool.allocate([[1]]), lambda: pool.tables([a.seq_id]), lambda: append([a.seq_id]),
               lambda: pool.free([a.seq_id]), lambda: pool.kv(0)):
        with pytest.raises(IntegrityError, match="this KVPool is broken: allocate was left half-way"):
            op()
    assert pool.stats().num_sequences == 1  # inspection still answers
    pool.close()
    with pytest.raises(InvalidArgument, match="closed"):
        pool.allocate([[1]])


def test_an_op_left_before_it_changed_anything_goes_on(monkeypatch):
    pool = KVPool(SPEC)
    [a] = pool.allocate([list(range(3, 43))])
    pool.commit(a.seq_id)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pool.manager.pool, "match", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pool.allocate([list(range(3, 43)), [9] * 20])
    monkeypatch.undo()
    assert pool.broken is None
    b, _ = pool.allocate([list(range(3, 43)), [9] * 20])
    assert b.num_cached_tokens == 32
    pool.check_integrity()


class Alarm(BaseException):
    """What the alarm's handler raises, at whatever line the pool is on."""


ARMED = [False]  # (an alarm that comes once the op is over raises nothing)


def _raise(*_: object) -> None:
    if ARMED[0]:
        raise Alarm


@pytest.mark.parametrize("seed", range(6))
def test_interrupts_at_random_lines_never_leave_a_pool_broken_and_serving(seed):
    old = signal.signal(signal.SIGALRM, _raise)
    rng = random.Random(seed)
    try:
        for _ in range(4):
            pool, live = KVPool(SPEC), []
            for _ in range(40):
                op = rng.choice(["allocate", "fork", "free", "append", "commit"])
                try:
                    ARMED[0] = True
                    signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.00005, 0.003))
                    if op == "allocate":
                        got = pool.allocate([list(range(3, 3 + rng.randint(1, 400)))
                                             for _ in range(rng.randint(1, 30))])
                        live += [a.seq_id for a in got]
                    elif op == "fork" and live:
                        [kids] = pool.fork(rng.choice(live), rng.randint(1, 20))
                        live += kids
                    elif op == "free" and live:
                        gone = rng.sample(live, min(len(live), rng.randint(1, 20)))
                        pool.free(gone)
                        live = [i for i in live if i not in gone]
                    elif op == "append" and live:
                        pool.append(rng.sample(live, min(len(live), 10)), rng.randint(1, 40))
                    elif op == "commit" and live:
                        pool.commit(rng.choice(live))
                except Alarm:
                    pass
                finally:
                    ARMED[0] = False
                    signal.setitimer(signal.ITIMER_REAL, 0)
                if pool.broken is not None:
                    with pytest.raises(IntegrityError, match="broken"):
                        pool.allocate([[1, 2, 3]])
                    break
                pool.check_integrity()  # (held, or the pool says it is broken)
                live = [i for i in live if i in set(pool.sequence_ids())]  # (an interrupted op's ids)
            pool.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
@pytest.mark.parametrize("half_done", [True, False])
def test_a_child_forked_while_another_thread_was_in_a_call_never_serves_from_its_half(half_done):
    """A thread of the parent inside a call (its lock held, the bookkeeping half
    updated) when another forks: the child's copy got a fresh lock and served on
    from the half-updated bookkeeping (in about 1 fork in 3 of a busy pool). It is
    checked now: broken, every op refused; intact, it serves."""
    import os
    import threading
    import warnings

    pool = KVPool(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=16, num_blocks=16, block_size=8))
    [a] = pool.allocate([list(range(20))])
    inside, release = threading.Event(), threading.Event()

    def in_a_call():
        with pool._lock:
            if half_done:
                pool.manager.pool.ref_cnt[a.block_table[0]] += 1  # (a share half made)
            inside.set()
            release.wait(10)
            if half_done:
                pool.manager.pool.ref_cnt[a.block_table[0]] -= 1

    t = threading.Thread(target=in_a_call)
    t.start()
    assert inside.wait(10)
    with warnings.catch_warnings():  # (Python 3.12 on warns of a fork beside threads: that is the case here)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: exit code 0 refused as broken, 1 served, 2 anything else
        code = 2
        try:
            pool.allocate([[1, 2, 3]])
            code = 1
        except IntegrityError as e:
            code = 0 if "broken" in str(e) else 2
        finally:
            os._exit(code)
    release.set()
    t.join(10)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == (0 if half_done else 1)
    pool.check_integrity()  # (the parent's own is whole)


# -- ops left between their bookkeeping change and their K/V copies -------------------------

SMALL = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=16, num_blocks=32, num_host_blocks=16, block_size=16,
                 dtype="float32")
Q = np.ones((1, 2, 16), np.float32)


def _filled(pool, val, n=20, first=0):
    """A sequence of ``n`` tokens whose V is all ``val`` (K zeros: attention averages V)."""
    [a] = pool.allocate([list(range(first, first + n))])
    pool.write(0, a.slots, np.zeros((n, 2, 16), np.float32), np.full((n, 2, 16), val, np.float32))
    return a.seq_id


def _swapped_out_and_overwritten(pool):
    """A sequence of V 7.0 swapped out; its device blocks since held V 3.0 (another sequence's)."""
    s = _filled(pool, 7.0)
    pool.swap_out([s])
    other = _filled(pool, 3.0, first=50)
    pool.free([other])
    return s


def _forked(pool):
    """A child sharing its parent's last, partly filled block (20 tokens of V 7.0)."""
    [[kid]] = pool.fork([_filled(pool, 7.0)], 1)
    return kid


def _two_forked(pool):
    kids = [_forked(pool), _forked(pool)]
    pool.manager.native = None  # (the NumPy decode path: the compiled one hands shared blocks to it anyway)
    return kids


#: (op, what the pool calls it, setup, the op, the backend's copy, the manager's op)
CASES = {
    "swap_out": ("swap_out", lambda pool: _filled(pool, 7.0), lambda pool, s: pool.swap_out([s]),
                 "swap_out", "swap_out"),
    "swap_in": ("swap_in", _swapped_out_and_overwritten, lambda pool, s: pool.swap_in([s]), "swap_in", "swap_in"),
    "append_cow": ("append_flat", _forked, lambda pool, s: pool.append([s], 3), "copy_blocks", "append"),
    "decode_one_cow": ("append_flat", _forked, lambda pool, s: pool.append_flat([s], 1), "copy_blocks", "append"),
    "decode_batch_cow": ("append_flat", _two_forked, lambda pool, s: pool.append_flat(s, 1), "copy_blocks",
                         "append"),
    "batch_cow": ("append_flat", _forked, lambda pool, s: pool.batch([("append_flat", [s], 2)]), "copy_blocks",
                  "append"),
}


def _refuses_as_broken(pool, name, error="KeyboardInterrupt"):
    assert pool.broken is not None, "left between its bookkeeping and its K/V copies, the pool served on"
    assert f"{name} was left half-way by {error}" in pool.broken and "may not have run" in pool.broken
    pool.check_integrity()  # (the bookkeeping holds: only the K/V does not)
    for op in (lambda: pool.attend(0, pool.sequence_ids()[:1], Q), lambda: pool.allocate([[1]]),
               lambda: pool.swap_in(pool.sequence_ids()[:1]), lambda: pool.tables(pool.sequence_ids()[:1])):
        with pytest.raises(IntegrityError, match=f"this KVPool is broken: {name} was left half-way"):
            op()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("where", ["in_copy", "after_bookkeeping", "sigint"])
def test_an_op_left_before_its_copies_ran_breaks_the_pool(monkeypatch, case, where):
    """The probe's case: each data-moving op interrupted after its bookkeeping
    changed, before (or as) its K/V copy runs. It served on: attention over the
    sequence (V all 7.0) read 3.0, 0.0 or 5.6, check_integrity passing."""
    name, setup, op, copy, manager_op = CASES[case]
    pool = KVPool(SMALL)
    s = setup(pool)
    if where == "after_bookkeeping":  # (the manager's change done, the copy not begun)
        real_op = getattr(pool.manager, manager_op)

        def changed_then_interrupted(*args, **kwargs):
            real_op(*args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(pool.manager, manager_op, changed_then_interrupted)
    else:
        real_copy = getattr(pool.backend, copy)

        def interrupted_copy(pairs):
            if where == "sigint":  # a real Ctrl-C: Python's own SIGINT handler raises it, nothing copied
                signal.raise_signal(signal.SIGINT)
            real_copy(pairs[:1])  # (left during the copy: its first pair done)
            raise KeyboardInterrupt

        monkeypatch.setattr(pool.backend, copy, interrupted_copy)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            op(pool, s)
    finally:
        signal.signal(signal.SIGINT, old)
    monkeypatch.undo()
    _refuses_as_broken(pool, name)


def test_a_typed_error_a_copy_raised_breaks_the_pool_too(monkeypatch):
    """A KVPagerError is a check's, raised before anything changed, but for one
    raised by the copies themselves (a backend refusing its pairs): the tables
    had changed, the K/V had not."""
    pool = KVPool(SMALL)
    kid = _forked(pool)

    def refused(pairs):
        raise InvalidArgument("copy destination blocks must not also be sources")

    monkeypatch.setattr(pool.backend, "copy_blocks", refused)
    with pytest.raises(InvalidArgument):
        pool.append([kid], 1)
    monkeypatch.undo()
    _refuses_as_broken(pool, "append_flat", "InvalidArgument")


def test_data_moving_ops_a_check_refused_leave_the_pool_serving():
    """An op a check refused changed nothing and owes no copy: the pool serves on."""
    pool = KVPool(PoolSpec(num_layers=1, num_kv_heads=2, head_dim=16, num_blocks=8, num_host_blocks=1,
                           block_size=16, dtype="float32"))
    s = _filled(pool, 7.0)  # 2 blocks
    with pytest.raises(NotSwapped):
        pool.swap_in([s])
    with pytest.raises(OutOfBlocks):
        pool.swap_out([s])  # (2 blocks, 1 host block)
    [[kid]] = pool.fork([s], 1)
    rest = pool.allocate([[9] * (16 * pool.stats().free_blocks)])  # every block taken
    with pytest.raises(OutOfBlocks):
        pool.append([kid], 1)  # (copy-on-write needs a block)
    with pytest.raises(OutOfBlocks):
        pool.batch([("append_flat", [kid], 2)])
    assert pool.broken is None and pool.manager.copies_owed is None
    pool.check_integrity()
    pool.free([rest[0].seq_id])
    pool.append([kid], 1)
    assert np.allclose(pool.attend(0, [s], Q), 7.0)


@pytest.mark.parametrize("case", ["truncate", "shared_swap_out", "decode"])
def test_an_op_that_moves_no_data_is_still_only_checked(monkeypatch, case):
    """Interrupted after its bookkeeping changed, an op that asked for no copy
    (a truncate, a swap out of shared blocks only, a decode step without
    copy-on-write) goes through the check alone: whole, the pool serves on."""
    pool = KVPool(SMALL)
    s = _filled(pool, 7.0)
    if case == "shared_swap_out":
        pool.fork([s], 1)  # every block shared: none moves
    real = getattr(pool.manager, {"shared_swap_out": "swap_out"}.get(case, case if case == "truncate" else "append"))

    def changed_then_interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pool.manager, real.__name__, changed_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        if case == "truncate":
            pool.truncate([s], [17])
        elif case == "shared_swap_out":
            pool.swap_out([s])
        else:
            pool.append_flat([s], 1)
    monkeypatch.undo()
    assert pool.broken is None
    pool.check_integrity()
    if case == "shared_swap_out":
        assert pool.sequence(s).swapped
        pool.swap_in([s])
    if case == "decode":
        pool.truncate([s], [20])  # (the appended slot's K/V was never written: the caller never got it)
    assert np.allclose(pool.attend(0, [s], Q), 7.0)


@pytest.mark.parametrize("seed", range(3))
def test_alarms_at_random_lines_of_swaps_and_copies_never_leave_stale_kv_served(seed):
    """Real SIGALRMs at random moments of swaps, copy-on-write appends, forks and
    frees: after each, either the pool refuses as broken, or every sequence's
    attention reads its own K/V."""
    old = signal.signal(signal.SIGALRM, _raise)
    rng = random.Random(seed)
    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=16, num_blocks=64, num_host_blocks=48, block_size=16,
                    dtype="float32")
    try:
        for _ in range(30):
            pool = KVPool(spec)
            value = {_filled(pool, float(v), n=20 + v): float(v) for v in range(1, 4)}
            lengths = {s: pool.sequence(s).num_tokens for s in value}
            for _ in range(30):
                s = rng.choice(list(value))
                op = rng.choice(["swap", "swap", "cow", "cow", "free"])
                try:
                    ARMED[0] = True
                    signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.00001, 0.0003))
                    if op == "swap":
                        pool.swap_out([s])
                        pool.swap_in([s])
                    elif op == "cow":  # a child sharing the last, partly filled block appends: a copy
                        [[kid]] = pool.fork([s], 1)
                        value[kid], lengths[kid] = value[s], lengths[s]
                        pool.append([kid], 1)
                    elif len(value) > 1:
                        pool.free([s])
                        del value[s]
                except Alarm:
                    pass
                finally:
                    ARMED[0] = False
                    signal.setitimer(signal.ITIMER_REAL, 0)
                if pool.broken is not None:
                    with pytest.raises(IntegrityError, match="broken"):
                        pool.attend(0, [s], Q)
                    break
                pool.check_integrity()
                live = set(pool.sequence_ids())
                for extra in live - set(value):  # (a fork left before the id came back)
                    pool.free([extra])
                for gone in set(value) - live:  # (a free that ran, left before it returned)
                    del value[gone]
                for t, v in value.items():
                    info = pool.sequence(t)
                    if info.swapped:
                        pool.swap_in([t])
                    if info.num_tokens > lengths[t]:  # (its appended token's K/V unwritten: cut back to the K/V read)
                        pool.truncate([t], [lengths[t]])
                    got = pool.attend(0, [t], Q)
                    assert np.allclose(got, v), (f"sequence {t} (V all {v}) read {np.unique(got.round(3))}, the "
                                                 "pool not broken")
            pool.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
