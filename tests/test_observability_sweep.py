"""What the daemon's observers (stats, metrics, KV events, pins) cost and say
when clients are many, careless or hostile: regressions found by sweeping them."""

from __future__ import annotations

import random
import time

import pytest

from kvpager import IntegrityError, KVPool, PoolSpec
from kvpager.types import MAX_TENANT_SALT_BYTES, MAX_TENANTS_LISTED


def _pool_of_tenants(n: int, tenants: int) -> KVPool:
    """A pool whose prefix cache holds ``n`` evictable blocks, under ``tenants``
    salts (each its own tenant, as per-user salts make them)."""
    pool = KVPool(PoolSpec(1, 1, 8, n + 16, block_size=8, dtype="float32"))
    salts = [f"user-{i % tenants}" for i in range(n)]
    allocs = pool.allocate([[i] * 8 for i in range(n)], salts)
    ids = [a.seq_id for a in allocs]
    pool.commit(ids)
    pool.free(ids)
    return pool


def _fastest(fn, times: int = 5) -> float:
    best = float("inf")
    for _ in range(times):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def test_stats_costs_the_same_for_any_number_of_tenants():
    """`stats` made a Python row for every tenant before listing 1,000 of them: with
    per-user salts (40,000 tenants of one cached block each) it took ~10x as long as
    the same cache under 2,000 salts (~15x as under one), on the daemon's only
    thread, for every `stats` and for every metrics scrape's snapshot (which lists
    no tenant at all): a scraper kept the loop busy and decode steps waited 300 ms
    at the 99th percentile. The tenants listed are chosen in NumPy now."""
    n = 40_000
    many, few = _pool_of_tenants(n, tenants=n), _pool_of_tenants(n, tenants=2 * MAX_TENANTS_LISTED)
    st = many.stats()
    assert st.num_tenants == n and len(st.tenants) == MAX_TENANTS_LISTED
    assert len(few.stats().tenants) == MAX_TENANTS_LISTED
    ratio = _fastest(many.stats) / _fastest(few.stats)
    assert ratio < 3, f"stats with {n} tenants took {ratio:.1f}x as long as with {2 * MAX_TENANTS_LISTED}"


def _reference(pool: KVPool) -> tuple[list[tuple], int]:
    """The tenants `stats` lists, from docs/protocol.md's rule, counted over the
    blocks themselves: every tenant with cached blocks or a quota; past
    `MAX_TENANTS_LISTED` or `MAX_TENANT_SALT_BYTES` of salts, those with a
    quota first, then the largest others, up to either bound; most cached first."""
    bp = pool.manager.pool
    t = bp.tenants
    pinned = pool.manager.pins.refs
    rows = {}
    for b in bp.cache.block_key:
        c = int(t.of_block[b])
        salt, cached, ev, pin, quota = rows.get(c, (t.salts[c], 0, 0, 0, t.quotas.get(c)))
        rows[c] = (salt, cached + 1, ev + (b in bp.evictable), pin + bool(pinned[b] > 0), quota)
    for c, q in t.quotas.items():
        rows.setdefault(c, (t.salts[c], 0, 0, 0, q))
    ordered = [rows[c] for c in sorted(rows, key=lambda c: (-rows[c][1], c))]

    def size(r):
        s = r[0]
        return 0 if s is None else len(s.encode()) if isinstance(s, str) else len(s)

    if len(ordered) <= MAX_TENANTS_LISTED and sum(map(size, ordered)) <= MAX_TENANT_SALT_BYTES:
        return ordered, len(rows)
    first = [r for r in ordered if r[4] is not None] + [r for r in ordered if r[4] is None]
    kept, room = [], MAX_TENANT_SALT_BYTES
    for r in first[:MAX_TENANTS_LISTED]:
        room -= size(r)
        if room < 0:
            break
        kept.append(r)
    return sorted(kept, key=lambda r: -r[1]), len(rows)


@pytest.mark.parametrize("seed", range(4))
def test_the_tenants_listed_follow_the_documented_rule(seed):
    """The NumPy choice of the tenants listed against the rule, counted block by
    block: over and under the count bound, long salts past the bytes bound,
    quotas of tenants with and without blocks, pins, evictable blocks."""
    rng = random.Random(seed)
    n = MAX_TENANTS_LISTED + rng.choice([-300, 50, 400])
    pool = KVPool(PoolSpec(1, 1, 8, 3 * n, block_size=8, dtype="float32"))
    long = rng.random() < 0.5
    salts = [(f"t{i}-" + "x" * (3000 if long and i % 3 == 0 else 0)) if i % 7 else b"b%d" % i for i in range(n)]
    prompts = [[i] * (8 * rng.randint(1, 2)) for i in range(n)]
    allocs = pool.allocate(prompts, salts)
    ids = [a.seq_id for a in allocs]
    pool.commit(ids)
    pool.free(rng.sample(ids, n // 2))
    for i in rng.sample(range(n), 20):
        pool.set_quota(salts[i], rng.randint(0, 3))
    pool.set_quota("quota-only", 7)  # a tenant with a quota and no block
    for i in rng.sample(range(n), 10):
        pool.pin([prompts[i]], salts[i])
    want, total = _reference(pool)
    st = pool.stats()
    assert st.num_tenants == total
    assert [(t.salt, t.cached_blocks, t.evictable_blocks, t.pinned_blocks, t.quota) for t in st.tenants] == want


def test_an_integrity_check_with_quotas_costs_what_one_without_does():
    """`check` (no session needed) compared each quota'd tenant's LRU with the pool's
    evictable blocks one block at a time in Python: 40 quotas on 40,000 evictable
    blocks took ~10x the whole check without them, on the daemon's loop, and it
    grows with quotas x blocks (seconds on a large pool). The blocks are grouped
    by tenant in NumPy now."""
    n, tenants = 40_000, 40
    pool = _pool_of_tenants(n, tenants)
    without = _fastest(pool.check_integrity, 3)
    for i in range(tenants):
        pool.set_quota(f"user-{i}", n)  # (no tenant is over it: eviction order as without)
    pool.check_integrity()
    ratio = _fastest(pool.check_integrity, 3) / without
    assert ratio < 3, f"check with {tenants} quotas took {ratio:.1f}x as long as without"


def test_an_integrity_check_still_finds_a_tenant_lru_out_of_order():
    """The grouped comparison still tells a quota'd tenant's LRU that lists its
    evictable blocks in another order than the pool's, or misses one."""
    pool = _pool_of_tenants(64, 4)
    pool.set_quota("user-1", 100)
    t = pool.manager.pool.tenants
    code = t.find("user-1")
    mine = t.lru[code]
    assert len(mine) == 16
    first = next(iter(mine))
    mine.move_to_end(first)
    with pytest.raises(IntegrityError, match="user-1"):
        pool.check_integrity()
    mine.pop(first)
    with pytest.raises(IntegrityError, match="LRU of 15 blocks, but 16"):
        pool.check_integrity()


class _Tracker:
    """A ZeroMQ message tracker as `UnreadReplies` reads it: ``done`` once let go of."""

    def __init__(self, done: bool = True):
        self.done = done


def test_large_replies_of_ops_that_change_something_are_forgotten_once_read():
    """Every reply of 1 MiB or more is tracked until ZeroMQ lets go of it, but the
    tracked ones were pruned only when a reply of an op that changes nothing would
    pass the budget: a daemon whose large replies were all allocates (a 128k-token
    prompt's slots are 1 MiB), swap-ins or forks kept an entry (~1.8 KB) for every
    one it ever sent. Those read are forgotten as replies go now, whatever the op."""
    from kvpager.reply_budget import LARGE, UnreadReplies

    u = UnreadReplies(budget=64 * LARGE)
    unread = [_Tracker(done=False) for _ in range(3)]  # a client that reads nothing holds its own
    for t in unread:
        u.sent(t, LARGE)
    reply = b"x" * LARGE
    for _ in range(10_000):
        assert u.admit("allocate", 1, reply) is reply
        u.sent(_Tracker(), LARGE)
    assert len(u.held) < 200
    u.prune()
    assert [t for t, _ in u.held] == unread and u.bytes == 3 * LARGE


def _pool_of_pins(n: int) -> tuple[KVPool, list[list[int]]]:
    """A pool whose cache holds ``n`` one-block prompts and one prompt of ``n`` blocks."""
    pool = KVPool(PoolSpec(1, 1, 8, 2 * n + 16, block_size=8, dtype="float32"), max_pinned_blocks=2 * n + 8)
    prompts = [[i] * 8 for i in range(n)]
    allocs = pool.allocate([*prompts, list(range(n * 8))])
    pool.commit([a.seq_id for a in allocs])
    pool.free([a.seq_id for a in allocs])
    return pool, prompts


def test_ending_a_session_with_many_pins_costs_what_one_long_pin_does():
    """A session's pins were released one at a time (several NumPy calls each): a
    session holding 20,000 one-block pins (its limit lists 65,536) stalled the
    daemon's loop ~1.3 s when it ended (bye, or silence past the heartbeat
    timeout), ~50x one pin of as many blocks, every other client waiting. They
    are released in one pass now, their blocks freed in the same order."""
    n = 20_000
    pool, prompts = _pool_of_pins(n)
    pool.pin(prompts, owner="many", max_listed=n)
    pool.pin([list(range(n * 8))], owner="one", max_listed=n)
    t0 = time.perf_counter()
    assert pool.release_pins("one") == 1
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert pool.release_pins("many") == n
    many = time.perf_counter() - t0
    pool.check_integrity()
    # (the one-at-a-time release took ~50x one pin's, ~1.3 s: a bound with room for a busy host's swings)
    assert many < 20 * one + 0.25, f"{n} pins took {many:.3f} s to release, one of {n} blocks {one:.3f} s"


def test_released_pins_leave_their_blocks_as_releasing_them_one_by_one_does():
    """Nested and repeated pins of several owners, released at a session's end in
    one pass: every block's reference count, the pinned count and the LRU order of
    the blocks that became evictable (each pin's tail first, pins in the order
    they were made) as unpinning each pin, as often as it was counted, leaves them."""
    rng = random.Random(7)
    prompts = [([rng.randint(0, 2) for _ in range(8 * rng.randint(1, 6))], rng.choice([None, "a"]))
               for _ in range(40)]
    picks = [(rng.randrange(40), rng.randint(1, 6), rng.choice(["s1", "s2"])) for _ in range(80)]

    def build() -> tuple[KVPool, dict[tuple, int]]:
        pool = KVPool(PoolSpec(1, 1, 8, 256, block_size=8, dtype="float32"))
        for p, salt in prompts:
            [a] = pool.allocate([p], salt)
            pool.commit(a.seq_id)
            pool.free(a.seq_id)
        made: dict[tuple, int] = {}  # s1's pins, (prefix, salt) -> count, in the order made
        for i, blocks, owner in picks:
            p, salt = prompts[i]
            [n] = pool.pin([p[: 8 * blocks]], salt, owner=owner)
            if n and owner == "s1":
                key = (tuple(p[:n]), salt)
                made[key] = made.get(key, 0) + 1
        pool.allocate([prompts[0][0][:8]])  # a block in use besides
        return pool, made

    (batched, made), (single, _), (unpinned, _) = build(), build(), build()
    assert batched.release_pins("s1") == len(made)
    every = [(list(prefix), salt) for (prefix, salt), count in made.items() for _ in range(count)]
    for prefix, salt in every:  # each pin's own prefix: that pin is its longest
        single.unpin([prefix], salt, owner="s1")
    unpinned.unpin([p for p, _ in every], [s for _, s in every], owner="s1")  # one request
    for pool in (batched, single, unpinned):
        pool.check_integrity()
    b = single.manager.pool
    for pool in (batched, unpinned):
        a = pool.manager.pool
        assert (a.ref_cnt == b.ref_cnt).all() and pool.stats().pinned_blocks == single.stats().pinned_blocks
        assert list(a.evictable) == list(b.evictable)
        assert pool.pins("s2") == single.pins("s2") and pool.pins("s1") == []


def test_a_pin_costs_the_same_whatever_the_pins_its_session_holds():
    """A session's `pin` counted the blocks its pins list (its limit) by going over
    every one of them: with 20,000 pins held, each further pin took ~50x as long
    as a session's first, on the daemon's loop (and building its 65,536 allowed
    pins one request at a time, minutes of it). The count is kept as pins come
    and go now."""
    n = 20_000
    pool, prompts = _pool_of_pins(n)
    pool.pin(prompts[1:], owner="many", max_listed=n)
    pool.pin([prompts[1]], owner="few", max_listed=n)

    def pin(owner: str) -> None:
        assert pool.pin([prompts[0]], owner=owner, max_listed=n) == [8]

    ratio = _fastest(lambda: pin("many"), 20) / _fastest(lambda: pin("few"), 20)
    assert ratio < 5, f"a pin beside {n} pins took {ratio:.1f}x as long as beside one"
    from kvpager import LimitExceeded

    with pytest.raises(LimitExceeded, match=f"{n + 2} blocks listed"):  # n listed, and a new pin of 2 blocks
        pool.pin([list(range(16))], owner="many", max_listed=n)
    pool.unpin(prompts[1:100], owner="many")
    assert pool.pin([list(range(16))], owner="many", max_listed=n) == [16]
    assert pool.release_pins("many") == n - 99 + 1
    pool.check_integrity()


def test_stats_of_a_cache_of_evictable_blocks_costs_what_one_in_use_does():
    """`stats` (and so every metrics scrape's snapshot, up to ten a second) built its
    mask of evictable blocks by walking the pool's LRU in Python: 100 ms of the
    daemon's loop on a pool of a million cached idle blocks, ~20x the same pool
    with its blocks in use. Evictable is cached with no reference, in NumPy now."""
    n = 100_000
    spec = PoolSpec(1, 1, 8, n + 16, block_size=8, dtype="float16")
    idle, busy = KVPool(spec), KVPool(spec)
    for pool in (idle, busy):
        ids = [a.seq_id for a in pool.allocate([[i] * 8 for i in range(n)])]
        pool.commit(ids)
    idle.free(ids)
    assert idle.stats().evictable_blocks == n and busy.stats().used_blocks == n
    ratio = _fastest(idle.stats) / _fastest(busy.stats)
    assert ratio < 3, f"stats of {n} evictable blocks took {ratio:.1f}x as long as of {n} in use"
    assert idle.stats().tenants[0].evictable_blocks == n and busy.stats().tenants[0].evictable_blocks == 0


def test_checks_in_a_loop_hold_the_daemon_a_bounded_share_of_its_time():
    """`check` walks every sequence in Python (0.5-0.75 s of the loop at 100k
    sequences) and needs no session: a script checking in a loop held every other
    client's steps behind it. A check that comes within ten times the last one's
    time is refused (limit_exceeded, with ``retry_after`` seconds) and changes
    nothing, and runs once that time has passed; `Client.check_integrity` waits
    as told; a small pool's checks (under 20 ms) are never refused."""
    from daemon_helpers import Raw, req, running_server

    from kvpager.client import Client
    from kvpager.protocol import ERR, OK

    spec = PoolSpec(1, 1, 8, 24_000, block_size=8, dtype="float32", num_host_blocks=8)
    with running_server(spec) as server, Client(server.endpoint, timeout=30) as c:
        raw = Raw(server.endpoint)
        try:
            assert [raw.send(req(k, "check", {}))[1] for k in range(2)] == [OK, OK]  # (small: never refused)
            for k in range(10):
                c.allocate([[k, i, 1, 2] for i in range(2_000)])
            started = time.monotonic()
            assert raw.send(req(2, "check", {}), timeout=30)[1] == OK
            _, status, error = raw.send(req(3, "check", {}))
            took = time.monotonic() - started
            assert status == ERR and error["code"] == "limit_exceeded", error
            wait = error["details"]["retry_after"]
            assert 0 < wait <= 10 * took and "try again in" in error["message"]
            assert c.stats().num_sequences == 20_000  # other calls are answered meanwhile
            c.check_integrity()  # waits as told, then runs
            assert time.monotonic() - started >= wait
        finally:
            raw.close()


def test_a_check_told_to_wait_keeps_a_session_without_heartbeats_open():
    """`kvpager check` (a client without heartbeats) twice in a row on a large pool:
    the second was told to wait ten times the first's time, slept it silent, and a
    wait past the daemon's heartbeat timeout ended its session ("this session is not
    open", exit code 5) instead of checking."""
    from daemon_helpers import running_server

    from kvpager.client import Client

    with running_server(heartbeat_timeout=0.4) as server, \
            Client(server.endpoint, timeout=30, heartbeat=False, map_pool=False) as c:
        c.allocate([[1, 2, 3]])
        # as after a check that held the loop 0.15 s: the next may come 1.5 s after it
        server._check_took, server._check_after = 0.15, time.monotonic() + 1.5
        started = time.monotonic()
        c.check_integrity()  # waits as told, its session kept open, then runs
        assert time.monotonic() - started >= 1.4
        assert c.stats().num_sequences == 1
