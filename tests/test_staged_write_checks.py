"""A staged write's slot check (`StagingOps._check_writable`): the daemon
gathered every block table of the session (and of its driver) for each
`write`, 5 ms a call for 256 sequences of 32k tokens, once for each of a
model's layers. The blocks found held are kept with the pool's `Moves` count
(`Session.held`); these tests hold the check to what it refused and allowed
before while the kept blocks are reused, and to a gather a step.
Against a daemon in a thread on a fresh ipc:// endpoint; clients without the
mapped pool, so every write is staged and checked by the daemon."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from daemon_helpers import running_server

from kvpager import Client, PoolSpec
from kvpager.errors import NotOwner
from kvpager.server_staging import _outside

SPEC = PoolSpec(num_layers=4, num_kv_heads=2, head_dim=16, num_blocks=24, block_size=8, dtype="float32",
                num_host_blocks=8)
BS = SPEC.block_size


def _kv(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k, v = (rng.standard_normal((n, SPEC.num_kv_heads, SPEC.head_dim)).astype(np.float32) for _ in range(2))
    return k, v


def _at(server: Any, layer: int, slots: Any) -> tuple[np.ndarray, np.ndarray]:
    """K and V at ``slots`` of ``layer``, read from the daemon's pool by block and offset."""
    slots = np.asarray(slots, np.int64)
    k, v = server.pool.kv(layer)
    b, o = slots // BS, slots % BS
    return np.asarray(k[b, :, o]).copy(), np.asarray(v[b, :, o]).copy()


def _count_gathers(server: Any) -> list[int]:
    """Counts from now the times a staged write's check gathers what its session
    holds (`StagingOps._held`: every table of the session and its driver)."""
    seen = [0]
    held = server._held

    def counted(*args: Any, **kw: Any) -> Any:
        seen[0] += 1
        return held(*args, **kw)

    server._held = counted
    return seen


#: the session holding few of the pool's blocks (kept as their ids) or most (kept as a mask)
HOLDS = pytest.mark.parametrize("filler", [0, 14], ids=["ids", "mask"])


def _fill(c: Client, blocks: int) -> None:
    """A sequence of ``blocks`` blocks more for ``c``'s session."""
    if blocks:
        c.allocate([list(range(-blocks * BS, 0))])


@HOLDS
def test_a_steps_layers_gather_the_tables_once(filler):
    with running_server(SPEC) as server, Client(server.endpoint, map_pool=False) as c:
        _fill(c, filler)
        [a, b] = c.allocate([list(range(2 * BS + 3)), list(range(100, 100 + BS))])
        gathers = _count_gathers(server)
        for layer in range(SPEC.num_layers):
            c.write(layer, a.slots, *_kv(layer, len(a.slots)))
        assert gathers[0] == 1, "each layer's write gathered the session's tables again"
        # a block the session took since (an append: no block left a table) is found by a second look
        [slot] = c.append(b.seq_id, 1)[0]
        kv = _kv(7, 1)
        c.write(0, [slot], *kv)
        assert gathers[0] == 2
        np.testing.assert_array_equal(_at(server, 0, [slot])[0], kv[0])
        c.write(1, [slot], *kv)
        assert gathers[0] == 2


@HOLDS
def test_slots_of_a_freed_sequence_are_refused_once_another_session_holds_their_blocks(filler):
    with running_server(SPEC) as server, Client(server.endpoint, map_pool=False) as c, \
            Client(server.endpoint, map_pool=False) as other:
        _fill(c, filler)
        n = 2 * BS
        [a] = c.allocate([list(range(n))])
        c.write(0, a.slots, *_kv(0, n))  # checked, and its blocks kept
        c.free(a.seq_id)
        [x] = other.allocate([list(range(1000, 1000 + n))])
        assert set(np.asarray(x.slots) // BS) == set(np.asarray(a.slots) // BS), "the blocks were not reused"
        theirs = _kv(1, n)
        other.write(0, x.slots, *theirs)
        with pytest.raises(NotOwner, match="not held by any sequence of this session"):
            c.write(0, a.slots, *_kv(2, n))
        got = _at(server, 0, x.slots)
        np.testing.assert_array_equal(got[0], theirs[0])
        np.testing.assert_array_equal(got[1], theirs[1])


@HOLDS
def test_another_sessions_live_blocks_are_refused_with_the_held_blocks_kept(filler):
    with running_server(SPEC) as server, Client(server.endpoint, map_pool=False) as c, \
            Client(server.endpoint, map_pool=False) as other:
        _fill(c, filler)
        [a] = c.allocate([list(range(BS))])
        [x] = other.allocate([list(range(700, 700 + BS))])
        theirs = _kv(3, BS)
        other.write(0, x.slots, *theirs)
        c.write(0, a.slots, *_kv(4, BS))  # its held blocks kept: no block left a table since
        for slots in (x.slots, [a.slots[0], x.slots[0]]):
            with pytest.raises(NotOwner, match="not held by any sequence of this session"):
                c.write(0, slots, *_kv(5, len(slots)))
        np.testing.assert_array_equal(_at(server, 0, x.slots)[0], theirs[0])


@HOLDS
def test_another_sessions_frees_leave_the_held_blocks_kept(filler):
    """The kept blocks followed the pool's count, which every session's free, truncate
    or copy-on-write moves: in a daemon of many clients each step of a staged
    writer gathered its tables again. They follow the session's (and its driver's)
    own changes: another session's free gathers nothing, its own does; the blocks
    the other gave back, held by no sequence of this one, are still refused."""
    with running_server(SPEC) as server, Client(server.endpoint, map_pool=False) as c, \
            Client(server.endpoint, map_pool=False) as other:
        _fill(c, filler)
        [a, b] = c.allocate([list(range(BS)), list(range(50, 50 + BS))])
        [x, y] = other.allocate([list(range(700, 700 + BS)), list(range(800, 800 + BS))])
        gathers = _count_gathers(server)
        c.write(0, a.slots, *_kv(1, BS))
        assert gathers[0] == 1
        other.free(x.seq_id)  # another session's release
        other.truncate(y.seq_id, 1)
        for layer in range(SPEC.num_layers):
            c.write(layer, a.slots, *_kv(layer, BS))
        assert gathers[0] == 1, "another session's release made this one gather its tables again"
        with pytest.raises(NotOwner, match="not held by any sequence of this session"):
            c.write(0, x.slots, *_kv(2, BS))  # (a block held by no sequence of its own: looked at again, refused)
        c.free(b.seq_id)  # its own: gathered again at its next write, and b's slots refused
        c.write(0, a.slots, *_kv(3, BS))
        assert gathers[0] == 3
        with pytest.raises(NotOwner):
            c.write(0, b.slots, *_kv(4, BS))


@pytest.mark.parametrize("change", ["truncate", "swap_out", "release_before"])
def test_blocks_a_sequence_gave_back_are_refused(change):
    with running_server(SPEC) as server, Client(server.endpoint, map_pool=False) as c:
        n = 3 * BS
        [a] = c.allocate([list(range(n))])
        c.write(0, a.slots, *_kv(0, n))
        gathers = _count_gathers(server)
        if change == "truncate":
            c.truncate(a.seq_id, BS)
        elif change == "swap_out":
            c.swap_out(a.seq_id)
        else:
            c.release_before(a.seq_id, 2 * BS)
        gone = a.slots[:BS] if change == "release_before" else a.slots[-BS:]
        with pytest.raises(NotOwner):
            c.write(0, gone, *_kv(1, BS))
        assert gathers[0] == 1, "the kept blocks were trusted past a change that gave blocks back"


def test_a_rank_workers_staged_write_follows_its_drivers_free():
    with running_server(SPEC, devices=["cpu"]) as server, Client(server.endpoint, map_pool=False) as driver, \
            Client(server.endpoint, map_pool=False, rank=0, driver=driver.session) as worker, \
            Client(server.endpoint, map_pool=False) as other:
        n = 2 * BS
        [a] = driver.allocate([list(range(n))])
        for layer in range(2):
            worker.write(layer, a.slots, *_kv(layer, n))
        driver.free(a.seq_id)
        [x] = other.allocate([list(range(500, 500 + n))])
        theirs = _kv(5, n)
        other.write(0, x.slots, *theirs)
        with pytest.raises(NotOwner):
            worker.write(0, a.slots, *_kv(6, n))
        np.testing.assert_array_equal(_at(server, 0, x.slots)[0], theirs[0])


def test_kept_blocks_as_a_mask_or_as_ids_answer_alike():
    """`_outside` over both forms `StagingOps._held` keeps, against NumPy's `isin`."""
    rng = np.random.default_rng(3)
    for n, held_count in [(50, 0), (50, 1), (50, 45), (4096, 30), (4096, 4000)]:
        mask = np.zeros(n, bool)
        mask[rng.choice(n, held_count, replace=False)] = True
        ids = np.flatnonzero(mask).astype(np.int32)
        blocks = np.unique(rng.integers(0, n, 40)).astype(np.int64)
        want = blocks[~np.isin(blocks, ids)]
        np.testing.assert_array_equal(_outside(mask, blocks), want)
        np.testing.assert_array_equal(_outside(ids, blocks), want)


def test_a_staged_write_of_malformed_slots_is_invalid_not_foreign():
    """Slots that are no slots (the null block's, past the pool, floats, below
    -1) are refused as such, `invalid_argument`, before the ownership check,
    which answered `not_owner` ("block 0 is not held") for a null block's slot."""
    from kvpager.client_staging import _aligned
    from kvpager.errors import InvalidArgument

    with running_server(SPEC) as server, Client(server.endpoint, map_pool=False) as c:
        [x] = c.allocate([list(range(BS))])
        k, v = _kv(1, 2)
        c.remote_write(0, x.slots[:2], k, v)  # (its own slots: taken; k and v staged where the raw writes say)
        np.testing.assert_array_equal(_at(server, 0, x.slots[:2])[0], k)
        before = _at(server, 0, x.slots)
        staged = {"k": [0, list(k.shape)], "v": [_aligned(k.nbytes), list(v.shape)]}
        first = int(x.slots[0])
        for bad in ([first, 1], [first, SPEC.num_blocks * BS], [float(first), float(first + 1)], [first, -2]):
            with pytest.raises(InvalidArgument, match="slot"):
                c._call("write", {"layer": 0, "slots": bad, **staged})
        np.testing.assert_array_equal(_at(server, 0, x.slots)[0], before[0])

# A staged write by a session holding a swapped-out sequence: the daemon built a
# `SequenceInfo` for every sequence of the session, on its loop, for the first
# write after each change of the session (a commit is one): 65,000 forks of one
# sequence beside one swapped out held the loop 250 ms a commit and write (3 ms
# without it). The rows are gathered in one pass now, swapped-out ones included,
# and the check refuses and allows what it did.


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


def test_the_slots_of_one_write_or_plan_check_are_within_the_tokens_limit():
    """A slot is a token's, but a staged write's slots and a step plan's (sent with
    `tables`) were held to no limit: 8M copies of one of the caller's own slots
    in a 16 MiB array took 1.6 s and 240 MB of the loop to check (a write of as
    many, 7.5 s and 2 GB). Past the tokens limit they are `limit_exceeded`,
    nothing written; at it, a write is taken."""
    from kvpager.client_staging import _aligned
    from kvpager.errors import LimitExceeded
    from kvpager.limits import Limits

    with running_server(SPEC, limits=Limits(tokens=64)) as server, Client(server.endpoint, map_pool=False) as c:
        [x] = c.allocate([list(range(BS))])
        k, v = _kv(3, 65)
        c.remote_write(0, x.slots[:2], k[:2], v[:2])  # a staging buffer
        before = _at(server, 0, x.slots)
        over = np.full(65, int(x.slots[1]), np.int64)
        staged = {"k": [0, [65, SPEC.num_kv_heads, SPEC.head_dim]], "v": [_aligned(k.nbytes), [65, SPEC.num_kv_heads,
                                                                                              SPEC.head_dim]]}
        for call in (lambda: c._call("write", {"layer": 0, "slots": over, **staged}),
                     lambda: c._call("write", {"layer": 0, "slots": over.tolist(), **staged}),
                     lambda: c._call("tables", {"seq_ids": [x.seq_id], "slots": over})):
            with pytest.raises(LimitExceeded, match="slots") as e:
                call()
            assert (e.value.limit, e.value.value) == ("tokens", 65)
        np.testing.assert_array_equal(_at(server, 0, x.slots)[0], before[0])
        c.remote_write(0, over[:64], k[:64], v[:64])  # at the limit: written (the last of a repeated slot's stays)
        np.testing.assert_array_equal(_at(server, 0, x.slots[1:2])[0], k[63:64])
        server.pool.check_integrity()
