"""The daemon's ops against hostile and careless clients, sent as raw frames:
a fork count spelled as an array, requests in several frames, arguments
nested too deeply to describe, flags that are no bools, pins counted past a
block's reference count and a session ending with such a pin. Each is
answered with a typed error that changed nothing (or, for a session's end,
with everything released in bounded time and memory), and the daemon serves
on. Each test is an attack that once worked against a CPU daemon; bounded
waits, free endpoints."""

from __future__ import annotations

import tracemalloc

import msgpack
import numpy as np
import pytest
import zmq
from daemon_helpers import SMALL, Raw, req, running_server, server_fixture
from pool_helpers import snapshot

from kvpager.client import Client
from kvpager.errors import InvalidArgument, LimitExceeded
from kvpager.limits import Limits
from kvpager.pins import MAX_PIN_REFS
from kvpager.protocol import unpack

server = server_fixture(SMALL, heartbeat_timeout=30)


def _state(server):
    """Everything an error reply must leave as it was: the pool's sequences, blocks
    and counts, the sessions' counts of sequences, the pins."""
    return (snapshot(server.pool), [(s.name, s.num_seqs) for s in server.sessions.by_name.values()],
            server.pool.pins())


def _same(x, y) -> bool:
    (s1, b1, q1), n1, p1 = x
    (s2, b2, q2), n2, p2 = y
    return (s1 == s2 and np.array_equal(b1.state, b2.state) and np.array_equal(b1.ref_cnt, b2.ref_cnt)
            and [(i, list(t), n) for i, t, n in q1] == [(i, list(t), n) for i, t, n in q2] and n1 == n2
            and p1 == p2)


def test_a_fork_count_sent_as_an_array_is_held_to_the_limits():
    """fork's ``n`` as a 0-d integer array (what a NumPy scalar packs to as an
    array) was taken by the pool but skipped the daemon's limits: one request
    made 5000 children past a limit of 100 sequences and 64 ids."""
    with running_server(SMALL, limits=Limits(sequences=100, ids=64)) as small, \
            Client(small.endpoint, timeout=10) as c:
        [a] = c.allocate([[1, 2, 3]])
        before = _state(small)
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_IDS"):
            c._call("fork", {"seq_ids": [a.seq_id], "n": np.array(5000)})
        assert _same(before, _state(small))
        c.fork(a.seq_id, 40)  # 41 sequences
        before = _state(small)
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_SEQUENCES"):
            c._call("fork", {"seq_ids": [a.seq_id], "n": np.array(60, np.uint8)})
        assert _same(before, _state(small))
        [kids] = c._call("fork", {"seq_ids": [a.seq_id], "n": np.array(3)})  # within both: taken
        assert len(kids) == 3 and c.stats().num_sequences == 44
        c.check_integrity()


@pytest.mark.parametrize("frames", [
    pytest.param(lambda body: [b"junk", body], id="a frame before"),
    pytest.param(lambda body: [body, b""], id="an empty frame after"),
    pytest.param(lambda body: [body, body], id="the request twice"),
    pytest.param(lambda body: [b"", b"", body], id="two delimiters"),
    pytest.param(lambda body: [b"\0" * (1 << 20)] * 4 + [body], id="large frames before"),
])
def test_a_request_in_several_frames_is_refused_and_runs_nothing(server, frames):
    """A request is one frame (after a REQ socket's empty delimiter). A message of
    more frames ran its last frame and was echoed back whole: frames past the
    message size limit came back to the sender, and a DEALER read its own frame
    as the reply. Now it is a protocol error in one frame, and nothing runs."""
    with Client(server.endpoint, timeout=10) as c:
        raw = Raw(server.endpoint)
        try:
            before = _state(server)
            body = req(5, "allocate", {"prompts": [[1, 2, 3]]}, session=c.session)
            raw.sock.send_multipart(frames(body))
            assert raw.sock.poll(10_000), "no reply"
            reply = raw.sock.recv_multipart()
            assert len(reply) == 1 and len(reply[0]) < 1000, [len(f) for f in reply]
            rid, status, error = msgpack.unpackb(reply[0], raw=False)
            assert status == 1 and error["code"] == "protocol_error" and "frame" in error["message"]
            assert _same(before, _state(server))
            assert raw.send(body)[1] == 0  # the same request in one frame: it runs
        finally:
            raw.close()
        req_sock = zmq.Context.instance().socket(zmq.REQ)  # a REQ socket's delimiter is no extra frame
        req_sock.setsockopt(zmq.LINGER, 0)
        req_sock.connect(server.endpoint)
        try:
            req_sock.send(req(6, "stats", {}))
            assert req_sock.poll(10_000), "no reply"
            assert msgpack.unpackb(req_sock.recv(), raw=False)[1] == 0
        finally:
            req_sock.close(0)
        assert c.stats().num_sequences == 1
        c.check_integrity()


def _nested(depth: int):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("op, args", [
    ("append", {"seq_ids": "DEEP"}),
    ("append", {"seq_ids": "SEQ", "num_tokens": "DEEP"}),
    ("commit", {"seq_ids": "SEQ", "upto": "DEEP"}),
    ("fork", {"seq_ids": "SEQ", "n": "DEEP"}),
    ("truncate", {"seq_ids": "SEQ", "lengths": "DEEP"}),
    ("release", {"seq_ids": "SEQ", "positions": "DEEP"}),
    ("allocate", {"prompts": [[1]], "share_in_batch": "DEEP"}),
    ("pin", {"prompts": [[1]], "keep": "DEEP"}),
    ("hello", {"rank": "DEEP"}),
    ("batch", {"ops": [["commit", {"seq_ids": "SEQ", "upto": "DEEP"}]]}),
])
def test_arguments_nested_too_deeply_are_invalid_argument(server, op, args):
    """A value nested a thousand lists deep (msgpack decodes it) in an argument whose
    error message shows the value: describing it raised RecursionError, answered as
    an internal error with a traceback in the daemon's log. Now `invalid_argument`,
    nothing changed, and the daemon serves on."""
    with Client(server.endpoint, timeout=10) as c:
        [a] = c.allocate([[1, 2, 3]])

        def fill(v):
            if isinstance(v, dict):
                return {k: fill(x) for k, x in v.items()}
            if isinstance(v, list):
                return [fill(x) for x in v]
            return _nested(1010) if v == "DEEP" else a.seq_id if v == "SEQ" else v

        body = msgpack.packb([1, 9, c.session, op, fill(args)])
        raw = Raw(server.endpoint)
        try:
            before = _state(server)
            rid, status, result = unpack(raw.recv_raw(body))
        finally:
            raw.close()
        error = result["error"] if op == "batch" else result
        assert rid == 9 and error["code"] == "invalid_argument", error
        # said so, or shown cut short (``[[[[...]]]]``)
        assert "nested too deeply" in error["message"] or "...]]]]" in error["message"], error["message"]
        assert _same(before, _state(server))
        assert c.sequence(a.seq_id).num_tokens == 3  # still serving
        c.check_integrity()


@pytest.mark.parametrize("op", ["allocate", "cached_tokens"])
@pytest.mark.parametrize("flag", [1, "yes", [True], None])
def test_remote_tokens_must_be_a_bool(server, op, flag):
    """``remote_tokens`` that is no bool was taken as false: a careless client that
    sent 1 got four fields per allocation where it asked for five."""
    with Client(server.endpoint, timeout=10) as c:
        before = _state(server)
        with pytest.raises(InvalidArgument, match="remote_tokens must be a bool"):
            c._call(op, {"prompts": [[1, 2, 3]], "remote_tokens": flag})
        assert _same(before, _state(server))
        [[seq_id, table, cached, slots, remote]] = c._call("allocate", {"prompts": [[1, 2, 3]],
                                                                        "remote_tokens": True})
        assert remote == 0 and c._call("cached_tokens", {"prompts": [[1]], "remote_tokens": False}) == [0]


def _bump_pin(server, owner: str, extra: int) -> int:
    """Count ``extra`` more pins of ``owner``'s one pin, as that many more pin
    requests would (its count, the pins' and the pool's reference counts), and
    return its block: the state ~2**31 pins reach, without hours of requests."""
    pins = server.pool.manager.pins
    [pin] = pins.pins[owner].values()
    pin.count += extra
    pins.refs[pin.blocks] += extra
    server.pool.manager.pool.ref_cnt[pin.blocks] += extra
    server.pool.check_integrity()
    return int(pin.blocks[0])


def test_pins_stop_at_half_a_blocks_reference_count(server):
    """Pins of a prefix are counted without bound (a session may pin it 65,536 times a
    request); past 2**31 - 1 a block's int32 reference count wrapped negative and the
    pool's state broke. Then pins were refused there, at the top of the count, and
    another session's fork of a sequence over the block wrapped it negative anyway (the
    integrity check failed) and its allocate of the prefix failed as bad arguments
    (an OverflowError). Now pins hold at most 2**30 references on a block: the pin
    past that is `LimitExceeded` and changes nothing, and other sessions' prefix hits
    and forks over the block go on."""
    bs = SMALL.block_size
    prompt = list(range(bs))
    with Client(server.endpoint, timeout=10) as c, Client(server.endpoint, timeout=10) as other:
        [a] = c.allocate([prompt])
        c.commit(a.seq_id)
        assert c.pin([prompt]) == [bs]
        block = _bump_pin(server, c.session_name, MAX_PIN_REFS - 6)  # the pin counted MAX_PIN_REFS - 5 times
        before = _state(server)
        with pytest.raises(LimitExceeded, match="pins' references") as e:
            c.pin([prompt] * 6)
        assert (e.value.limit, e.value.value, e.value.maximum) == ("pin_references", MAX_PIN_REFS + 1, MAX_PIN_REFS)
        assert _same(before, _state(server))
        assert c.pin([prompt] * 5) == [bs] * 5  # up to the cap exactly
        refs = server.pool.manager.pool.ref_cnt
        assert server.pool.manager.pins.refs[block] == MAX_PIN_REFS and refs[block] == MAX_PIN_REFS + 1
        [b] = other.allocate([prompt + [1]])
        assert b.num_cached_tokens == bs and b.block_table[0] == block
        kids = other.fork(b.seq_id, 3)[0]
        assert refs[block] == MAX_PIN_REFS + 5
        other.check_integrity()
        other.free([b.seq_id, *kids])
        c.free(a.seq_id)
        assert refs[block] == MAX_PIN_REFS
        c.check_integrity()


def test_a_session_ending_with_a_pin_counted_many_times_releases_it_at_once(server):
    """A session's end released a pin counted n times by listing its blocks n times:
    memory and time proportional to the count (16 GiB per block for 2**31 pins, a
    MemoryError that left the session open or ended the loop in expiry). Now it
    takes the count off at once."""
    prompt = list(range(SMALL.block_size))
    with Client(server.endpoint, timeout=10) as c, Client(server.endpoint, timeout=10) as other:
        [a] = other.allocate([prompt])
        other.commit(a.seq_id)
        other.free(a.seq_id)
        c.pin([prompt])
        block = _bump_pin(server, c.session_name, 1 << 24)  # 16M pins (the fix's bound is the same for 2**31)
        tracemalloc.start()
        try:
            c.close()  # bye releases the pin
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 << 20, f"{peak} bytes to release one pin"
        st = other.stats()
        assert st.pinned_blocks == 0 and st.used_blocks == 0 and st.evictable_blocks == 1
        assert server.pool.manager.pool.ref_cnt[block] == 0
        assert other.cached_tokens([prompt + [1]]) == [SMALL.block_size]  # still cached, evictable
        other.check_integrity()


@pytest.mark.parametrize("op, args", [
    ("allocate", lambda salt: {"prompts": [[1, 2, 3]], "salt": salt}),
    ("allocate", lambda salt: {"prompts": [[1, 2, 3], [4]], "salt": ["a", salt]}),
    ("cached_tokens", lambda salt: {"prompts": [[1, 2, 3]], "salt": salt}),
    ("pin", lambda salt: {"prompts": [[1, 2, 3]], "salt": salt}),
])
@pytest.mark.parametrize("long", ["x" * 5000, b"y" * 4097])
def test_a_salt_is_bounded(op, args, long):
    """A salt names a tenant and is kept as given: every `stats` reply lists it,
    and the root keys' memo holds up to 1,024 of them. A client could send salts
    of megabytes (five 4 MB salts made every `stats` reply 20 MB). Now one salt
    is at most 4,096 characters (`--max-salt`); over that, nothing runs."""
    with running_server(SMALL) as small, Client(small.endpoint, timeout=10) as c:
        before = _state(small)
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_SALT") as e:
            c._call(op, args(long))
        assert e.value.limit == "salt" and e.value.value == len(long) and e.value.maximum == 4096
        assert _same(before, _state(small))
        c._call(op, args(long[:4096]))  # at the limit: taken
        c.check_integrity()


@pytest.mark.parametrize("op", ["free", "append", "commit", "fork", "tables"])
def test_ids_in_a_map_are_refused(server, op):
    """A map as ``seq_ids`` was taken as its keys by the ops the pool checks (append,
    commit; a client may have meant its values): results follow the ids'
    order, and a map has none a client can count on. The others refused it already."""
    with Client(server.endpoint, timeout=10) as c:
        a, b = c.allocate([[1, 2, 3], [4, 5]])
        before = _state(server)
        with pytest.raises(InvalidArgument, match="in an order|an int or a list of ints"):
            c._call(op, {"seq_ids": {a.seq_id: b.seq_id, b.seq_id: a.seq_id}})
        assert _same(before, _state(server))
        c.check_integrity()


def test_an_error_quoting_a_huge_value_is_cut(server):
    """An error message quotes the value it refuses: a 1 MB string among the ids came
    back as a 1 MB error (a 3M-item list as 9 MB). Messages are cut to
    MAX_ERROR_TEXT characters on the wire, their length said, and the value
    itself is shown cut short (`validate.shown`); the error keeps its class."""
    from kvpager.protocol import MAX_ERROR_TEXT

    with Client(server.endpoint, timeout=10) as c:
        [a] = c.allocate([[1, 2, 3]])
        before = _state(server)
        with pytest.raises(InvalidArgument, match=r"must hold ints, got 'xxx+\.\.\.xxx+'") as e:
            c._call("commit", {"seq_ids": [a.seq_id, "x" * 1_000_000]})
        assert len(str(e.value)) < MAX_ERROR_TEXT + 100
        assert _same(before, _state(server))
        with pytest.raises(InvalidArgument, match="must hold ints, got 'y'$"):  # a short one whole
            c._call("commit", {"seq_ids": [a.seq_id, "y"]})


def test_stats_lists_at_most_max_tenants_the_quotas_and_the_largest(server):
    """Every salt names a tenant, and `stats` listed every tenant with cached blocks:
    a client committing a block under each of many salts (up to the pool's blocks)
    made every `stats` reply (and `kvpager top`'s) carry a row for each. Now it lists `MAX_TENANTS_LISTED`:
    every tenant with a quota, then the largest others; `num_tenants` counts all."""
    from kvpager import KVPool, PoolSpec
    from kvpager.render import tenants_text
    from kvpager.types import MAX_TENANTS_LISTED

    n = MAX_TENANTS_LISTED + 100
    pool = KVPool(PoolSpec(1, 1, 8, n + 16, block_size=8, dtype="float32"))
    allocs = pool.allocate([[i] * 8 for i in range(n)], [f"t{i}" for i in range(n)])
    [big] = pool.allocate([list(range(24))], "big")
    pool.commit([a.seq_id for a in allocs] + [big.seq_id])
    pool.set_quota(f"t{n - 1}", 5)  # a tenant the size of most: listed for its quota
    st = pool.stats()
    assert st.num_tenants == n + 1 and len(st.tenants) == MAX_TENANTS_LISTED
    assert st.tenants[0].salt == "big" and st.tenants[0].cached_blocks == 3
    assert f"t{n - 1}" in {t.salt for t in st.tenants}
    assert f"{n + 1} tenants in all" in tenants_text(st.tenants, st.num_tenants)
    with Client(server.endpoint, timeout=10) as c:  # the count crosses the wire
        [a] = c.allocate([list(range(SMALL.block_size))], "one")
        c.commit(a.seq_id)
        st = c.stats()
        assert st.num_tenants == len(st.tenants) == 1 and st.tenants[0].salt == "one"


@pytest.mark.parametrize("op, args, needle", [
    # a row of token ids that is itself 2-D
    ("append", {"num_tokens": 4, "token_ids": [np.zeros((2, 2), np.int64)]}, "flat list"),
    # a child count no block's reference count can hold, with no parent to fork
    ("fork_empty", {"seq_ids": [], "n": 2**62}, "reference count"),
    ("free_twice", {}, "free: duplicate"),
])
def test_odd_arguments_get_messages_of_their_own(server, op, args, needle):
    """Refused with a typed error that names what was wrong (these once answered
    with a NumPy exception's text: "truth value ... ambiguous", "out of bounds for
    int32", "operation: duplicate"), nothing changed, the daemon serving on."""
    with Client(server.endpoint, timeout=10) as c:
        [a] = c.allocate([list(range(5))])
        before = _state(server)
        if op == "append":
            call = ("append", {"seq_ids": [a.seq_id], **args})
        elif op == "fork_empty":
            call = ("fork", args)
        else:
            call = ("free", {"seq_ids": [a.seq_id, a.seq_id]})
        with pytest.raises(InvalidArgument) as e:
            c._call(*call)
        assert needle in str(e.value) and "ambiguous" not in str(e.value) and "out of bounds" not in str(e.value)
        assert _same(before, _state(server))
        c.free([a.seq_id])


def test_a_staging_shape_too_large_to_count_is_refused_by_kvpager():
    """A shape whose element count passes 2**63 (it wrapped to a small number in
    the fit check, and only NumPy's own refusal stopped it) is refused by the
    staging check, naming the range."""
    import os

    from kvpager.shm import Segment

    seg = Segment.create(f"kvpager-test-{os.getpid()}-{os.urandom(4).hex()}", 4096)
    try:
        with pytest.raises(InvalidArgument, match="does not fit"):
            seg.array((1, 2**60, 16), np.float32)
        with pytest.raises(InvalidArgument, match="does not fit"):
            seg.array((2**62, 2**62), np.uint8)
        assert seg.array((4, 16), np.float32).shape == (4, 16)
    finally:
        seg.close()


def test_a_client_giving_fresh_salts_leaves_no_tenant_behind():
    """A session that commits under fresh salts blocks a window released before their
    ids were known (so nothing is published), then frees them: before, the daemon kept
    a tenant entry, with its salt of up to 4 KiB, for each, for ever, its stats saying
    no tenant and its integrity check passing."""
    bs = SMALL.block_size
    with running_server() as server, Client(server.endpoint, map_pool=False) as c:
        for k in range(20):
            [a] = c.allocate([[1]], f"tenant-{k}-" + "x" * 4000)
            c.append([a.seq_id], 3 * bs)
            c.release_before([a.seq_id], [3 * bs])
            c.record_tokens([a.seq_id], [list(range(2, 2 + 3 * bs))])
            c.commit([a.seq_id])
            c.free([a.seq_id])
        stats = c.stats()
        c.check_integrity()
        assert (stats.used_blocks, stats.num_tenants) == (0, 0)
        assert len(server.pool.manager.pool.tenants._codes) == 1  # the default tenant alone
