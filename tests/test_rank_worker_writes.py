"""A rank worker's plain mapped `write` into its driver's sequences
(docs/protocol.md, "Trust" and "Ranks"): its client mirrors no tables of the
driver's, so its slots went unchecked, and a write of another session's
slots, of a published block's, or of slots kept from before the driver freed,
truncated or swapped out a sequence overwrote K/V other sessions read. The
daemon checks them now, as a staged write's, once per slot array and change
of what the driver may hold. Against a daemon in a thread on a fresh ipc://
endpoint; the bytes are read back through the worker's mapped `kv` views."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from daemon_helpers import running_server

from kvpager import Client, PoolSpec
from kvpager.errors import NotOwner

SPEC = PoolSpec(num_layers=2, num_kv_heads=4, head_dim=16, num_blocks=48, block_size=8, dtype="float32",
                num_host_blocks=16)
BS = SPEC.block_size
#: a pool of one rank (its rank 0 worker writes every head) and one of two
RANKS = pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]], ids=["one_rank", "two_ranks"])


def _kv(seed: int, n: int, heads: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k, v = (rng.standard_normal((n, heads, SPEC.head_dim)).astype(np.float32) for _ in range(2))
    return k, v


def _at(client: Client, layer: int, slots: Any) -> tuple[np.ndarray, np.ndarray]:
    """K and V at ``slots`` of ``layer`` ([tokens, heads, head_dim], as written), read
    through ``client``'s mapped views ([blocks, heads, block_size, head_dim]) by
    block and offset: copies, not the write's own path."""
    slots = np.asarray(slots, np.int64)
    b, o = slots // BS, slots % BS
    k, v = client.kv(layer)
    return np.asarray(k[b, :, o]).copy(), np.asarray(v[b, :, o]).copy()


def _same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def _count_tables(client: Client) -> list[int]:
    """A one-element list counting ``client``'s `tables` requests from now (its
    `_call` wrapped: every request goes through it)."""
    seen = [0]
    call = client._call

    def counted(op: str, args: dict[str, Any], *rest: Any, **kw: Any) -> Any:
        if op == "tables":
            seen[0] += 1
        return call(op, args, *rest, **kw)

    client._call = counted
    return seen


@RANKS
def test_a_rank_workers_write_into_its_drivers_live_sequence_lands(devices):
    with running_server(SPEC, devices=devices) as server:
        ep = server.endpoint
        heads = SPEC.num_kv_heads // len(devices)
        with Client(ep) as driver, Client(ep, rank=0, driver=driver.session) as worker:
            n = 2 * BS + 3
            [x] = driver.allocate([list(range(n))])
            for layer in range(SPEC.num_layers):
                kv = _kv(layer, n, heads)
                worker.write(layer, x.slots, *kv)
                _same(_at(worker, layer, x.slots), kv)
            # a decode step's slot, and a batch padded with -1 (padding writes nothing)
            [slot] = driver.append(x.seq_id, 1)[0]
            k1, v1 = _kv(9, 2, heads)
            before = _at(worker, 1, [slot])
            worker.write(1, [slot, -1], k1, v1)
            _same(_at(worker, 1, [slot]), (k1[:1], v1[:1]))
            assert not np.array_equal(before[0], k1[:1])
            server.pool.check_integrity()


@RANKS
def test_a_rank_workers_write_of_slots_not_its_drivers_is_refused(devices):
    """Another session's slots, a published block's, slots kept from before the
    driver freed, truncated or swapped out its sequence: `NotOwner`, and the bytes
    there stay as they were (another session's committed K/V). Before, each was
    written."""
    with running_server(SPEC, devices=devices) as server:
        ep = server.endpoint
        heads = SPEC.num_kv_heads // len(devices)
        with Client(ep) as driver, Client(ep, rank=0, driver=driver) as worker, \
                Client(ep) as victim, Client(ep, rank=1 % len(devices), driver=victim) as victims:
            n = 2 * BS + 3
            junk = _kv(99, n, heads)

            # another session's blocks (committed: the victim's published K/V)
            [y] = victim.allocate([list(range(500, 500 + n))])
            [x] = driver.allocate([list(range(n))])
            worker.write(0, x.slots, *_kv(1, n, heads))
            victims.write(0, y.slots, *_kv(2, n, heads))
            victim.commit(y.seq_id)
            theirs = _at(victims, 0, y.slots)
            with pytest.raises(NotOwner, match=f"block {y.slots[0] // BS} .*driver"):
                worker.write(0, y.slots, *junk)
            mixed = list(x.slots[:-1]) + [y.slots[0]]  # one foreign slot among the driver's
            with pytest.raises(NotOwner):
                worker.write(0, mixed, *junk)
            _same(_at(victims, 0, y.slots), theirs)

            # the driver's own sequence, once committed: its full blocks are published
            mine = _kv(3, n, heads)
            worker.write(1, x.slots, *mine)
            driver.commit(x.seq_id)
            with pytest.raises(NotOwner, match="published"):
                worker.write(1, x.slots[:BS], *(a[:BS] for a in junk))
            _same(_at(worker, 1, x.slots), mine)

            # slots kept from before the driver freed it, its blocks another session's now
            [z] = driver.allocate([list(range(300, 300 + n))])
            kept = list(z.slots)
            worker.write(0, kept, *_kv(4, n, heads))  # (checked, and taken: z is live)
            driver.free(z.seq_id)
            [w] = victim.allocate([list(range(700, 700 + n))])
            assert set(w.block_table) & set(z.block_table)  # (the freed blocks, handed on)
            victims.write(0, w.slots, *_kv(5, n, heads))
            now = _at(victims, 0, kept)
            with pytest.raises(NotOwner, match="driver"):
                worker.write(0, kept, *junk)  # the same slots as before the free: asked again
            _same(_at(victims, 0, kept), now)

            # slots past a truncate: the blocks released
            [t] = driver.allocate([list(range(900, 900 + n))])
            worker.write(0, t.slots, *_kv(6, n, heads))
            driver.truncate(t.seq_id, BS)
            with pytest.raises(NotOwner):
                worker.write(0, t.slots, *junk)
            worker.write(0, t.slots[:BS], *(a[:BS] for a in junk))  # what it still holds: taken

            # slots kept from before a swap-out (its device blocks released)
            [u] = driver.allocate([list(range(1100, 1100 + n))])
            worker.write(1, u.slots, *_kv(7, n, heads))
            driver.swap_out([u.seq_id])
            with pytest.raises(NotOwner):
                worker.write(1, u.slots, *junk)
            server.pool.check_integrity()


def test_the_check_costs_one_round_trip_per_slot_array_and_release():
    """A model's layers write the same slots: the first asks the daemon, the others
    not (its count of releases, of ended sessions and the worker's own changes
    unmoved). A release of any sequence makes the next write ask again: after the
    driver frees the sequence, the same slots are refused."""
    with running_server(SPEC, devices=["cpu", "cpu"]) as server:
        ep = server.endpoint
        heads = SPEC.num_kv_heads // 2
        with Client(ep) as driver, Client(ep, rank=0, driver=driver) as worker, Client(ep) as other:
            n = BS + 2
            [x] = driver.allocate([list(range(n))])
            [spare] = driver.allocate([list(range(100, 100 + n))])
            asked = _count_tables(worker)
            kv = _kv(1, n, heads)
            for _ in range(3):  # three steps' worth of layers, the same slots
                for layer in range(SPEC.num_layers):
                    worker.write(layer, x.slots, *kv)
            assert asked[0] == 1
            worker.write(0, x.slots[:2], *(a[:2] for a in kv))  # another slot array: asked
            assert asked[0] == 2
            worker.write(0, x.slots, *kv)  # (the last one checked is kept, not every one)
            assert asked[0] == 3

            other.allocate([[1, 2, 3]])  # another session's allocate moves nothing
            worker.write(1, x.slots, *kv)
            assert asked[0] == 3
            driver.free(spare.seq_id)  # a release (not of x): asked again, and taken
            worker.write(1, x.slots, *kv)
            worker.write(0, x.slots, *kv)
            assert asked[0] == 4
            _same(_at(worker, 1, x.slots), kv)

            driver.free(x.seq_id)  # now its slots are no one's
            with pytest.raises(NotOwner):
                worker.write(0, x.slots, *_kv(2, n, heads))
            assert asked[0] == 5
            _same(_at(worker, 0, x.slots), kv)

            # a daemon that predates `tables`' slots (hello without plan_slots) is not asked
            [y] = driver.allocate([list(range(200, 200 + n))])
            worker.plan_slots = False
            worker.write(0, y.slots, *kv)
            assert asked[0] == 5


@RANKS
def test_the_same_slots_after_the_drivers_commit_are_asked_again(devices):
    """A model's worker writes a step's slots at every layer, the check asked once;
    the driver then commits the sequence, publishing its full blocks (other
    sessions read them). Written again (a worker replaying a step, a stale buffer
    of slots), the same slot array went unasked: no release, no change of the
    worker's own, and the published K/V was overwritten. The daemon counts each
    session's commits in a mapped word the driver's workers follow: the write asks
    and is refused, the bytes stay. Another session's commit is not followed
    (asks nothing)."""
    with running_server(SPEC, devices=devices) as server:
        ep = server.endpoint
        heads = SPEC.num_kv_heads // len(devices)
        with Client(ep) as driver, Client(ep, rank=0, driver=driver) as worker, Client(ep) as other:
            n = 2 * BS + 3
            [x] = driver.allocate([list(range(n))])
            [y] = other.allocate([list(range(500, 500 + n))])
            asked = _count_tables(worker)
            mine = _kv(1, n, heads)
            for layer in range(SPEC.num_layers):
                worker.write(layer, x.slots, *mine)
            assert asked[0] == 1
            other.commit(y.seq_id)  # another session's commit: nothing to ask
            worker.write(0, x.slots, *mine)
            assert asked[0] == 1

            driver.commit(x.seq_id)
            junk = _kv(99, n, heads)
            for layer in range(SPEC.num_layers):
                with pytest.raises(NotOwner, match="published"):
                    worker.write(layer, x.slots, *junk)
                _same(_at(worker, layer, x.slots), mine)
            tail = x.slots[2 * BS:]  # the part-full last block is not published: still the driver's to write
            worker.write(1, tail, *(a[2 * BS:] for a in junk))
            _same(_at(worker, 1, tail), tuple(a[2 * BS:] for a in junk))
            server.pool.check_integrity()


@RANKS
def test_a_workers_plan_over_its_drivers_sequence_is_refused_after_the_commit(devices):
    """A rank worker's step plan with slots in its driver's sequence, checked when
    made; the driver commits: the plan's next write went on (the plan followed the
    releases alone), over the published K/V. It follows the driver's commits too:
    StalePlan, nothing written."""
    from kvpager.errors import StalePlan

    with running_server(SPEC, devices=devices) as server:
        ep = server.endpoint
        heads = SPEC.num_kv_heads // len(devices)
        with Client(ep) as driver, Client(ep, rank=0, driver=driver) as worker:
            n = 2 * BS
            [x] = driver.allocate([list(range(n))])
            plan = worker.plan([x.seq_id], query_lens=[n], slots=x.slots)
            mine = _kv(3, n, heads)
            plan.write(0, *mine)
            _same(_at(worker, 0, x.slots), mine)
            driver.commit(x.seq_id)
            with pytest.raises(StalePlan, match="committed"):
                plan.write(1, *_kv(4, n, heads))
            assert not np.abs(_at(worker, 1, x.slots)[0]).any()  # (layer 1: never written)
            server.pool.check_integrity()


def test_commit_word_is_nil_where_memory_has_no_releases():
    """hello's ``commit_word`` names a word of ``memory["releases"]``: a session of a
    pool of two ranks that names no rank gets memory of kind "ranks", no
    ``releases``, and no word (it named one)."""
    with running_server(SPEC, devices=["cpu", "cpu"]) as server, Client(server.endpoint) as driver:
        assert "releases" not in driver.memory
        info = driver._call("hello", {"client": "probe"})  # (its session ends with the daemon)
        assert "releases" not in info["memory"]
        assert info["commit_word"] is None
