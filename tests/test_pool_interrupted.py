"""An embedded `KVPool` op left half-way by an exception no check raised
(KeyboardInterrupt at any line of it: Ctrl-C in a notebook during generate;
MemoryError; a bug): the pool's bookkeeping is checked, and a pool found
broken refuses every op on its sequences and K/V with IntegrityError, naming
what broke it, instead of serving tables and hits that no longer hold (Ctrl-C
during allocates broke 15 pools in 60, and they served on). One left before
anything changed goes on."""

from __future__ import annotations

import random
import signal

import pytest

from kvpager import KVPool, PoolSpec
from kvpager.errors import IntegrityError, InvalidArgument

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
