"""A careless user of the embedded pool: a 0-d tensor where the prompts go is
refused with InvalidArgument and nothing changed, never a bare TypeError (where
an id or a count goes, the int it holds: ``pool.free(ids[i])`` of a tensor of ids); a closed pool
refuses its ops through a bound method taken before `close` and to a thread
that waited on the pool's lock while another thread closed it; and a random
mix of valid and refused calls, each refusal checked to change nothing, keeps
the pool in step with a plain model of its sequences."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pool_helpers import make_pool

from kvpager import InvalidArgument, KVPool, OutOfBlocks, PoolSpec
from kvpager.errors import KVPagerError, LimitExceeded

torch = pytest.importorskip("torch")


def _everything(pool: KVPool):
    """All a refused call could change: stats, counters, the block map, every
    sequence's info, the pins and the prefix cache's keys."""
    return (pool.stats(), pool.counters(), pool.blocks(), pool.sequences(), pool.pins(),
            dict(pool.manager.pool.cache.key_to_block))


def _setup(pool: KVPool) -> dict[str, int]:
    a, b, c = pool.allocate([list(range(20)), [4, 5, 6], list(range(100, 140))])
    pool.commit(a.seq_id)
    pool.swap_out(c.seq_id)
    return {"a": a.seq_id, "b": b.seq_id, "c": c.seq_id}


# A 0-d tensor where the prompts go: refused by name (it was a TypeError from inside, "len() of
# a 0-d tensor"). Where an id or a count goes, one is the int it holds, as a 0-d array is
# (`test_arg_types.py`: embedded and through a client alike).
_ZERO_D_TENSORS = [
    pytest.param(lambda p, s, t: p.allocate(t(5)), "prompts", id="allocate prompts"),
    pytest.param(lambda p, s, t: p.cached_tokens(t(5)), "prompts", id="cached_tokens prompts"),
    pytest.param(lambda p, s, t: p.probe_cache(t(5)), "prompts", id="probe_cache prompts"),
    pytest.param(lambda p, s, t: p.pin(t(5)), "prompts", id="pin prompts"),
    pytest.param(lambda p, s, t: p.unpin(t(5)), "prompts", id="unpin prompts"),
]


@pytest.mark.parametrize("call, needle", _ZERO_D_TENSORS)
def test_a_0d_tensor_for_prompts_is_refused_and_changes_nothing(call, needle):
    pool = make_pool()
    s = _setup(pool)
    before = _everything(pool)
    with pytest.raises(InvalidArgument, match=needle):
        call(pool, s, torch.tensor)
    assert _everything(pool) == before
    pool.check_integrity()


def test_tensors_of_ids_are_the_ids_they_hold():
    """``pool.free(ids[i])`` of a tensor of ids (a 0-d tensor), or the tensor itself:
    the ids it holds, as a `Client` sends them (a 0-d one was refused, a 1-D one
    refused by value, while a client took it as an array)."""
    pool = make_pool()
    s = _setup(pool)
    ids = torch.tensor([s["a"], s["b"]])
    pool.free(ids[0])
    assert [i.seq_id for i in pool.sequences()] == [s["b"], s["c"]]
    pool.free(ids[1:])
    assert [i.seq_id for i in pool.sequences()] == [s["c"]]
    with pytest.raises(InvalidArgument, match="seq_ids"):
        pool.free(torch.tensor([1.0]))  # a float tensor: no ids
    pool.check_integrity()


# -- a closed pool ------------------------------------------------------------------------
_SAVED = [
    pytest.param("allocate", lambda f, s, p: f([[1, 2, 3]]), id="allocate"),
    pytest.param("append_flat", lambda f, s, p: f([s["a"]], 1), id="append_flat"),
    pytest.param("append", lambda f, s, p: f(s["a"], 2), id="append"),
    pytest.param("fork", lambda f, s, p: f(s["a"], 2), id="fork"),
    pytest.param("free", lambda f, s, p: f([s["a"], s["b"]]), id="free"),
    pytest.param("commit", lambda f, s, p: f(s["b"]), id="commit"),
    pytest.param("truncate", lambda f, s, p: f(s["a"], 3), id="truncate"),
    pytest.param("swap_in", lambda f, s, p: f(s["c"]), id="swap_in"),
    pytest.param("release_before", lambda f, s, p: f(s["a"], 16), id="release_before"),
    pytest.param("pin", lambda f, s, p: f([list(range(20))]), id="pin"),
    pytest.param("set_quota", lambda f, s, p: f("t", 3), id="set_quota"),
    pytest.param("batch", lambda f, s, p: f([("free", [s["b"]])]), id="batch"),
    pytest.param("write", lambda f, s, p: f(0, [16], np.ones((1, 2, 64), np.float32), np.ones((1, 2, 64), np.float32)),
                 id="write"),
    pytest.param("attend", lambda f, s, p: f(0, [s["a"]], np.ones((1, 2, 64), np.float32)), id="attend"),
    pytest.param("kv", lambda f, s, p: f(0), id="kv"),
]


@pytest.mark.parametrize("name, call", _SAVED)
def test_a_method_taken_before_close_is_refused_after_it(name, call):
    """A hot loop keeps ``append = pool.append_flat``; `close` hid only the pool's
    attributes, so the saved method went on: allocated, freed and wrote on the
    closed pool (a GPU pool's storage is freed by then)."""
    pool = make_pool()
    s = _setup(pool)
    method = getattr(pool, name)
    kv_before = pool.backend.device_array().copy()
    pool.close()
    before = _everything(pool)
    with pytest.raises(InvalidArgument, match="closed"):
        call(method, s, pool)
    assert _everything(pool) == before
    np.testing.assert_array_equal(pool.backend.device_array(), kv_before)  # nothing written
    pool.check_integrity()


def test_a_rank_views_method_taken_before_close_is_refused_after_it():
    pool = KVPool(PoolSpec(1, 2, 16, num_blocks=16, block_size=16, dtype="float32"), devices=["cpu", "cpu"])
    [a] = pool.allocate([[1, 2, 3]])
    write = pool.rank(1).write
    pool.close()
    with pytest.raises(InvalidArgument, match="closed"):
        write(0, a.slots[:1], np.ones((1, 1, 16), np.float32), np.ones((1, 1, 16), np.float32))


def test_a_thread_waiting_on_the_lock_while_another_closes_the_pool_is_refused():
    """Threads may share a pool: one closes it while another's allocate waits on the
    lock; that allocate ran on the closed pool once the lock came free."""
    pool = make_pool()
    outcome: list[object] = []
    before_call = threading.Event()

    def worker() -> None:
        allocate = pool.allocate  # (taken before the close, as the attribute read of a call is)
        before_call.set()
        try:
            outcome.append(allocate([[1, 2, 3]]))
        except KVPagerError as e:
            outcome.append(e)

    with pool._lock:  # (held as another thread's call would hold it)
        t = threading.Thread(target=worker)
        t.start()
        assert before_call.wait(10)
        time.sleep(0.05)  # (the worker now waits on the lock)
        pool.close()
    t.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], InvalidArgument), outcome
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


def test_an_open_pools_saved_methods_still_work():
    pool = make_pool()
    allocate, free = pool.allocate, pool.free
    [a] = allocate([[1, 2, 3]])
    free([a.seq_id])
    assert pool.stats().num_sequences == 0
    pool.close()
    pool.close()  # (a second close is harmless)
    assert pool.stats().num_sequences == 0


# -- valid and refused calls mixed, against a plain model ----------------------------------
BS = 8
OWNERS = [None, "o1", "o2"]


class RefusalsChangeNothing(RuleBasedStateMachine):
    """Sequences' lengths, residency and owners in plain dicts; every refused call
    (unknown, duplicate, swapped or another owner's ids, counts past a length,
    token ids that do not fit, 0-d tensors and floats, a full pool) must leave
    everything `_everything` reads as it was."""

    def __init__(self):
        super().__init__()
        self.pool = KVPool(PoolSpec(1, 1, 8, num_blocks=14, block_size=BS, dtype="float32", num_host_blocks=5),
                           max_pinned_blocks=4)
        self.len: dict[int, int] = {}
        self.owner: dict[int, object] = {}
        self.unknown: dict[int, int] = {}  # trailing slots appended without token ids
        self.floor: dict[int, int] = {}  # first position still held
        self.swapped: set[int] = set()
        self.prompts: list[tuple[list[int], str | None]] = []

    def _resident(self) -> list[int]:
        return [s for s in self.len if s not in self.swapped]

    def _maybe_full(self, call) -> bool:
        """``call``; False (and nothing changed) where the pool is full."""
        before = _everything(self.pool)
        try:
            call()
        except (OutOfBlocks, LimitExceeded):
            assert _everything(self.pool) == before
            return False
        return True

    @rule(prompts=st.lists(st.lists(st.integers(0, 2), max_size=3 * BS), min_size=1, max_size=3),
          owner=st.sampled_from(OWNERS), salt=st.sampled_from([None, "s"]), window=st.sampled_from([None, 2 * BS]))
    def allocate(self, prompts, owner, salt, window):
        got: list = []
        if not self._maybe_full(lambda: got.extend(self.pool.allocate(prompts, salt, owner=owner, window=window))):
            return
        for p, a in zip(prompts, got):
            self.len[a.seq_id], self.owner[a.seq_id], self.unknown[a.seq_id] = len(p), owner, 0
            held = [i for i, b in enumerate(a.block_table) if b == 0]
            if held:
                self.floor[a.seq_id] = (held[-1] + 1) * BS
            self.prompts.append((p, salt))

    @precondition(lambda self: self._resident())
    @rule(data=st.data(), n=st.integers(0, 2 * BS), ids=st.booleans())
    def append(self, data, n, ids):
        seqs = data.draw(st.lists(st.sampled_from(self._resident()), min_size=1, max_size=3, unique=True))
        tokens = [[1] * n for _ in seqs] if ids and not any(self.unknown[s] for s in seqs) else None
        if self._maybe_full(lambda: self.pool.append(seqs, n, token_ids=tokens)):
            for s in seqs:
                self.len[s] += n
                self.unknown[s] += 0 if tokens else n

    @precondition(lambda self: any(self.unknown[s] for s in self._resident()))
    @rule(data=st.data())
    def record_tokens(self, data):
        s = data.draw(st.sampled_from([s for s in self._resident() if self.unknown[s]]))
        k = data.draw(st.integers(1, self.unknown[s]))
        self.pool.record_tokens([s], [[2] * k])
        self.unknown[s] -= k

    @precondition(lambda self: self._resident())
    @rule(data=st.data())
    def commit(self, data):
        s = data.draw(st.sampled_from(self._resident()))
        self.pool.commit(s, data.draw(st.integers(0, self.len[s])))

    @precondition(lambda self: self._resident())
    @rule(data=st.data(), n=st.integers(1, 2))
    def fork(self, data, n):
        s = data.draw(st.sampled_from(self._resident()))
        [kids] = self.pool.fork(s, n)
        for c in kids:
            self.len[c], self.owner[c], self.unknown[c] = self.len[s], self.owner[s], self.unknown[s]
            if s in self.floor:
                self.floor[c] = self.floor[s]

    @precondition(lambda self: self.len)
    @rule(data=st.data())
    def free(self, data):
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.len)), min_size=1, max_size=3, unique=True))
        self.pool.free(seqs)
        for s in seqs:
            for d in (self.len, self.owner, self.unknown, self.floor):
                d.pop(s, None)
            self.swapped.discard(s)

    @precondition(lambda self: self._resident())
    @rule(data=st.data())
    def truncate(self, data):
        s = data.draw(st.sampled_from(self._resident()))
        lo = self.floor[s] + 1 if s in self.floor else 0
        if lo > self.len[s]:
            return
        n = data.draw(st.integers(lo, self.len[s]))
        self.pool.truncate(s, n)
        self.unknown[s] = max(0, self.unknown[s] - (self.len[s] - n))
        self.len[s] = n

    @precondition(lambda self: self._resident())
    @rule(data=st.data())
    def release_before(self, data):
        s = data.draw(st.sampled_from(self._resident()))
        [n] = self.pool.release_before(s, data.draw(st.integers(0, self.len[s])))
        if n:
            self.floor[s] = self.floor.get(s, 0) + n * BS

    @precondition(lambda self: self._resident())
    @rule(data=st.data())
    def swap_out(self, data):
        seqs = data.draw(st.lists(st.sampled_from(self._resident()), min_size=1, max_size=2, unique=True))
        if self._maybe_full(lambda: self.pool.swap_out(seqs)):
            self.swapped.update(seqs)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.swapped)), min_size=1, max_size=2, unique=True))
        if self._maybe_full(lambda: self.pool.swap_in(seqs)):
            self.swapped.difference_update(seqs)

    @precondition(lambda self: self.prompts)
    @rule(data=st.data(), owner=st.sampled_from(OWNERS))
    def pin(self, data, owner):
        p, salt = data.draw(st.sampled_from(self.prompts))
        self._maybe_full(lambda: self.pool.pin([p], salt, owner=owner))

    @rule(data=st.data())
    def refused(self, data):
        p, res, live = self.pool, self._resident(), sorted(self.len)
        out = sorted(self.swapped)
        gone = max(live, default=0) + 1000
        calls = [
            lambda: p.free(live[:1] + [gone]),
            lambda: p.fork(live[:1] + [gone]),
            lambda: p.append(res[:2] + [gone], 1),
            lambda: p.append_flat(np.array(res[:2] + [gone], np.int64), 1),
            lambda: p.commit(res[:2] + [gone]),
            lambda: p.allocate([[1], [2]], salt=["a", 3]),
            lambda: p.allocate([[1], [2, 1.5]]),
            lambda: p.allocate(torch.tensor(3)),
            lambda: p.unpin([[9] * BS + [1]]),
        ]
        if live:
            calls += [lambda: p.free(live[:1] * 2), lambda: p.free(torch.tensor(float(live[0])))]
        if res:
            two = res[:2]
            calls += [
                lambda: p.append(res[:1] * 2, 1),
                lambda: p.append(two, -1),
                lambda: p.append(two, [1.0] * len(two)),
                lambda: p.append(two, torch.tensor(1.0)),
                lambda: p.append(two, 2, token_ids=[[1]] * len(two)),
                lambda: p.commit(two, [self.len[s] + 1 for s in two]),
                lambda: p.truncate(two, [self.len[s] + 1 for s in two]),
                lambda: p.record_tokens(two, [[1] * (self.unknown[s] + 1) for s in two]),
                lambda: p.release_before(two, [self.len[s] + 1 for s in two]),
                lambda: p.swap_in(out[:1] + res[:1]),
                lambda: p.append_flat(res[:1], 1, owner="nobody"),
                lambda: p.commit(res[:1], owner="nobody"),
                lambda: p.release_before(res[:1], 0, owner="nobody"),
                lambda: p.fork(res[:1], 0),
                lambda: p.truncate(res[:1], np.array(1.0)),
                lambda: p.swap_out(torch.tensor([float(res[0])])),
            ]
        if out and res:
            calls += [
                lambda: p.swap_out(res[:1] + out[:1]),
                lambda: p.append(res[:1] + out[:1], 1),
                lambda: p.fork(res[:1] + out[:1]),
                lambda: p.commit(res[:1] + out[:1]),
                lambda: p.truncate(res[:1] + out[:1], 0),
                lambda: p.release_before(res[:1] + out[:1], 0),
            ]
        call = data.draw(st.sampled_from(calls))
        before = _everything(p)
        with pytest.raises(KVPagerError):
            call()
        assert _everything(p) == before

    @invariant()
    def matches_the_model(self):
        p = self.pool
        p.check_integrity()
        infos = {i.seq_id: i for i in p.sequences()}
        assert set(infos) == set(self.len)
        for s, n in self.len.items():
            assert (infos[s].num_tokens, infos[s].swapped) == (n, s in self.swapped), (s, infos[s])
        for o in OWNERS[1:]:
            assert p.owned(o) == sorted(s for s, who in self.owner.items() if who == o)
        st_ = p.stats()
        assert st_.free_blocks + st_.evictable_blocks + st_.used_blocks == st_.total_blocks
        assert (st_.num_sequences, st_.swapped_sequences) == (len(self.len), len(self.swapped))


RefusalsChangeNothing.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestRefusalsChangeNothing = RefusalsChangeNothing.TestCase
