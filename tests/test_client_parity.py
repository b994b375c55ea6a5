"""The same script of ops on an embedded KVPool and through a Client gives the
same block tables, slots, K/V bytes, attention, stats and block maps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from daemon_helpers import running_server

from kvpager import KVPool
from kvpager.client import Client
from kvpager.spec import PoolSpec

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=32, block_size=16,
                dtype="float32", num_host_blocks=16)


def _kv(rng, n):
    return (rng.standard_normal((n, SPEC.num_kv_heads, SPEC.head_dim)).astype(SPEC.dtype),
            rng.standard_normal((n, SPEC.num_kv_heads, SPEC.head_dim)).astype(SPEC.dtype))


def _write(pool, slots, rng):
    for layer in range(SPEC.num_layers):
        pool.write(layer, slots, *_kv(rng, len(slots)))


def _snapshot(pool, device_array, host_array):
    st = dataclasses.asdict(pool.stats())
    return {
        "stats": st,
        "seqs": [dataclasses.replace(s, owner=None, owner_pid=None) for s in pool.sequences()],
        "blocks": pool.blocks(),
        "device": np.array(device_array()),
        "host": np.array(host_array()),
    }


def script(pool, device_array, host_array, attend_fns):
    """Returns what each step observed."""
    rng = np.random.default_rng(7)
    seen = []
    snap = lambda: seen.append(_snapshot(pool, device_array, host_array))  # noqa: E731
    p1 = list(range(100, 140))  # 2.5 blocks
    p2 = list(range(200, 220))
    a1, a2 = pool.allocate([p1, p2], salt="m")
    seen.append([a1, a2])
    _write(pool, np.concatenate([a1.slots, a2.slots]), rng)
    seen.append(pool.commit([a1.seq_id, a2.seq_id]))
    snap()
    [kids] = pool.fork([a1.seq_id], 2)
    seen.append(kids)
    slots = pool.append(kids + [a1.seq_id], [1, 2, 3], [[1], [2, 3], [4, 5, 6]])  # copy-on-write
    seen.append(slots)
    _write(pool, np.concatenate(slots), rng)
    snap()
    pool.swap_out([a2.seq_id, kids[0]])
    snap()
    pool.truncate([kids[1]], [17])
    slots = pool.append([kids[1]], 20)
    seen.append(slots)
    _write(pool, slots[0], rng)
    pool.swap_in([a2.seq_id])
    snap()
    [a3] = pool.allocate([p1[:32] + [9, 9, 9]], salt="m")  # prefix hit on committed blocks
    seen.append(a3)
    _write(pool, a3.slots, rng)
    q = rng.standard_normal((1 + 1 + 3, 4, SPEC.head_dim)).astype(SPEC.dtype)
    for attend in attend_fns(pool):
        seen.append([attend(layer, [a2.seq_id, kids[1], a3.seq_id], q, [1, 1, 3]) for layer in range(2)])
        # a sliding window and a soft cap travel with the call (they change the result)
        windowed = attend(1, [a2.seq_id, kids[1], a3.seq_id], q, [1, 1, 3], window=5, softcap=0.5)
        assert not np.allclose(windowed, seen[-1][1])
        seen.append(windowed)
        # and attention sinks, as an array and as a list (they change it too)
        sunk = attend(1, [a2.seq_id, kids[1], a3.seq_id], q, [1, 1, 3], sinks=np.array([0.5, 2.0, -1.0, 3.0]))
        assert not np.allclose(sunk, seen[-2][1])
        seen.append(sunk)
    pool.free([a1.seq_id, kids[1]])
    pool.swap_in([kids[0]])
    snap()
    pool.check_integrity()
    return seen


def _equal(x, y, path="") -> None:
    if isinstance(x, np.ndarray):
        assert isinstance(y, np.ndarray) and x.shape == y.shape, path
        np.testing.assert_array_equal(x, y, err_msg=path)
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), path
        for k in x:
            _equal(x[k], y[k], f"{path}.{k}")
    elif isinstance(x, list):
        assert len(x) == len(y), path
        for i, (a, b) in enumerate(zip(x, y)):
            _equal(a, b, f"{path}[{i}]")
    else:
        assert x == y, path


@pytest.mark.parametrize("transport", ["mapped", "remote"])
def test_client_matches_embedded_pool(transport):
    pool = KVPool(SPEC)
    embedded = script(pool, lambda: pool.backend.kv, lambda: pool.backend.host_kv,
                      lambda p: [p.attend, p.attend])
    with running_server(SPEC) as server, Client(server.endpoint, map_pool=transport == "mapped") as c:
        over_wire = script(c, c.device_array, c.host_array, lambda p: [p.local_attend, p.remote_attend])
        assert c.map_pool == (transport == "mapped")
    _equal(embedded, over_wire)


def test_cached_tokens_probe_through_the_daemon():
    from daemon_helpers import running_server

    from kvpager.client import Client

    with running_server() as server, Client(server.endpoint, timeout=10) as c:
        prompt = list(range(40))
        [a] = c.allocate([prompt], salt="m")
        c.commit(a.seq_id)
        assert c.cached_tokens([prompt, prompt[:17]], salt="m") == server.pool.cached_tokens(
            [prompt, prompt[:17]], salt="m") == [32, 16]
        assert c.cached_tokens([prompt]) == [0]
        # read-only ops need no session
        with Client(server.endpoint, timeout=10, heartbeat=False) as other:
            assert other.cached_tokens([prompt], salt="m") == [32]


def test_share_in_batch_through_the_daemon_matches_embedded():
    from daemon_helpers import SMALL, running_server

    from kvpager import KVPool
    from kvpager.client import Client

    system = list(range(40))
    prompts = [system + [1], system + [2, 3], system[:20]]
    embedded = KVPool(SMALL).allocate(prompts, salt="m", share_in_batch=True)
    with running_server() as server, Client(server.endpoint, timeout=10) as c:
        remote = c.allocate(prompts, salt="m", share_in_batch=True)
        assert [a.num_cached_tokens for a in remote] == [a.num_cached_tokens for a in embedded] == [0, 32, 16]
        assert [a.block_table for a in remote] == [a.block_table for a in embedded]
        server.pool.check_integrity()


@pytest.mark.parametrize("transport", ["mapped", "remote"])
def test_a_swapped_sequence_is_named_with_the_op_that_met_it(transport):
    """`tables`, `attend`, `plan` and `refill` of a swapped-out sequence raise
    SequenceSwapped naming themselves, on KVPool and through a Client (mirrored
    or asking the daemon): every one said "swap_in before attend"."""
    from kvpager.errors import SequenceSwapped

    def ops(pool, ids):
        q = np.zeros((len(ids), 2 * SPEC.num_kv_heads, SPEC.head_dim), np.float32)
        live = pool.allocate([[9] * 3])[0].seq_id
        plan = pool.plan([live], 1, None)
        return {"tables": lambda: pool.tables(ids), "attend": lambda: pool.attend(0, ids, q),
                "plan": lambda: pool.plan(ids), "refill": lambda: pool.refill(plan, ids)}

    def named(pool, ids):
        got = {}
        for op, call in ops(pool, ids).items():
            with pytest.raises(SequenceSwapped) as e:
                call()
            got[op] = (e.value.op, e.value.seq_id, str(e.value))
        return got

    pool = KVPool(SPEC)
    [a, b] = pool.allocate([[1] * 20, [2] * 5])
    pool.swap_out([b.seq_id])
    want = named(pool, [a.seq_id, b.seq_id])
    assert {op: w[0] for op, w in want.items()} == {op: op for op in want}
    with running_server(SPEC) as server, Client(server.endpoint, map_pool=transport == "mapped") as c:
        [a, b] = c.allocate([[1] * 20, [2] * 5])
        c.swap_out([b.seq_id])
        ids = [a.seq_id, b.seq_id]
        assert named(c, ids) == want
        if transport == "mapped":  # ids the mirror does not hold: the daemon's answer names the op too
            c._mirror.forget(ids)
            with pytest.raises(SequenceSwapped) as e:
                c.tables(ids)
            assert e.value.op == "tables"
