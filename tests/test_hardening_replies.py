"""Replies and queues a client cannot blow up: a `tables` reply whose padded
tables would pass the message limit refused before it is built, a `swap_in`
answering nil instead of them; a connection that reads none of its replies holds a few of them in
the daemon, not ZeroMQ's thousand; quick round trips lose no reply for that.
Each test is an attack that once worked against a CPU daemon; bounded waits,
free endpoints."""

from __future__ import annotations

import msgpack
import pytest
from daemon_helpers import SMALL, Raw, req, running_server, wait_until

from kvpager.client import Client
from kvpager.errors import LimitExceeded, NotOwner
from kvpager.spec import PoolSpec

LONG = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=600, block_size=16, dtype="float32")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_a_tables_reply_is_bounded_as_a_request_is():
    """A ``tables`` request of one long sequence's id repeated asked for a padded
    reply hundreds of times its own size (525 MB for a 64 KiB request on a
    daemon whose messages are limited to 16.8 MB), built on the loop's thread:
    refused by name past the message limit; a smaller one answered."""
    with running_server(LONG, max_message_bytes=1 << 16) as server, Client(server.endpoint) as c:
        [a] = c.allocate([list(range(3, 3 + 512 * 16))])  # 512 blocks
        raw = Raw(server.endpoint)
        try:
            refused = msgpack.unpackb(raw.recv_raw(req(1, "tables", {"seq_ids": [a.seq_id] * 40})), raw=False)
            assert refused[1] == 1 and refused[2]["code"] == "limit_exceeded"
            assert "message limit" in refused[2]["message"]
            answered = raw.send(req(2, "tables", {"seq_ids": [a.seq_id] * 20}))
            assert answered[1] == 0
            tables, lens = c.tables([a.seq_id])
            assert tables.shape == (1, 512) and list(lens) == [512 * 16]
        finally:
            raw.close()
        c.check_integrity()


def test_a_connection_that_stops_reading_cannot_pin_the_daemons_memory():
    """A client that sends requests and reads none of their replies (its own
    socket keeping one): the daemon queued up to ZeroMQ's default of 1,000
    replies a connection, each up to the message limit (40 replies of 26 MB:
    +985 MB). A few are queued now, the rest dropped; the daemon answers others."""
    import zmq

    with running_server(LONG, max_message_bytes=1 << 22) as server, Client(server.endpoint) as c:
        [a] = c.allocate([list(range(3, 3 + 512 * 16))])
        ask = {"seq_ids": [a.seq_id] * 1900}  # a reply of 3.9 MB
        hog = zmq.Context.instance().socket(zmq.DEALER)
        hog.setsockopt(zmq.LINGER, 0)
        hog.setsockopt(zmq.RCVHWM, 1)
        hog.setsockopt(zmq.RCVBUF, 4096)
        hog.connect(server.endpoint)
        try:
            c.stats()
            before = _rss_mb()
            for rid in range(80):
                hog.send(req(rid, "tables", ask))
            grew = wait_until(lambda: _rss_mb() - before > 150, timeout=6)
            assert not grew, f"+{_rss_mb() - before:.0f} MB held for a connection that reads nothing"
            assert c.stats().num_sequences == 1  # others are answered
        finally:
            hog.close(0)
        c.check_integrity()


def test_quick_round_trips_lose_no_reply():
    """With a few messages queued a connection, a client's quick round trips (a
    reply every few tens of microseconds) found its queue full in the daemon's
    socket's view, which takes in the notices that the peer read at most once a
    millisecond while messages keep coming: replies went nowhere, calls timed out.
    The loop takes them in and sends again."""
    with running_server(SMALL) as server, Client(server.endpoint, timeout=3, heartbeat=False) as c:
        [a] = c.allocate([[1, 2, 3]])
        for _ in range(3000):
            c.heartbeat()
        raw = Raw(server.endpoint)
        try:
            for rid in range(3000):
                assert raw.send(req(rid, "tables", {"seq_ids": [a.seq_id]}), timeout=3)[1] == 0
        finally:
            raw.close()


def test_a_swap_in_whose_tables_would_pass_the_limit_runs_and_answers_nil():
    """swap_in answers with the sequences' new tables, bounded as `tables` is.
    One whose tables would pass the message limit was refused, so sequences
    swapped out together could not come back together (and splitting the call
    loses all-or-nothing). Now the swap runs whole and answers nil; the
    client reads the new tables a part at a time, and its plans stay right."""
    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=600, block_size=16, dtype="float32",
                    num_host_blocks=600)
    with running_server(spec, max_message_bytes=1 << 16) as server, Client(server.endpoint) as c, \
            Client(server.endpoint) as other:
        allocs = c.allocate([list(range(3, 3 + 512 * 16))] + [[7]] * 31)  # one of 512 blocks, 31 of one
        ids = [a.seq_id for a in allocs]
        c.swap_out(ids)
        with pytest.raises(NotOwner):  # another session's swap_in: refused, nothing swapped
            other.swap_in(ids)
        assert all(s.swapped for s in c.sequences())
        c.swap_in(ids)
        assert not any(s.swapped for s in c.sequences())
        mine, mine_lens = c.tables(ids)  # from the client's mirror, which followed the swap
        theirs, theirs_lens = other.tables(ids)  # from the daemon, a part at a time
        assert mine.shape == theirs.shape == (32, 512)
        assert (mine == theirs).all() and (mine_lens == theirs_lens).all()
        assert list(mine_lens) == [512 * 16] + [1] * 31
        c.check_integrity()


def _reply_bytes(endpoint: str, op: str, args: dict) -> tuple[int, dict | list]:
    """(size, decoded result) of a raw request's reply (needing no session)."""
    raw = Raw(endpoint)
    try:
        data = raw.recv_raw(req(1, op, args))
    finally:
        raw.close()
    reply = msgpack.unpackb(data, raw=False, strict_map_key=False)
    assert reply[1] == 0, reply[2]
    return len(data), reply[2]


def test_a_sequences_page_keeps_within_the_message_limit():
    """`sequences` bounded its page by count only: 4,096 forks of a long
    sequence answered 82 MB past a 16 MiB limit, built on the loop's thread.
    Now a page stops at the limit (one sequence at least) and the client
    reads on until an empty page; ids asked by name past it are refused, and
    the client asks them in halves."""
    with running_server(LONG, max_message_bytes=1 << 16) as server, Client(server.endpoint) as c:
        [a] = c.allocate([list(range(3, 3 + 512 * 16))])  # 512 blocks: 4 KiB of table each
        kids = c.fork([a.seq_id], 39)[0]
        size, page = _reply_bytes(server.endpoint, "sequences", {})
        assert size <= 1 << 16 and 1 <= len(page) < 40
        listed = c.sequences()
        assert [s.seq_id for s in listed] == [a.seq_id, *kids]
        assert all(s.block_table == listed[0].block_table for s in listed)
        with pytest.raises(LimitExceeded, match="message limit"):
            c._call("sequences", {"seq_ids": [a.seq_id, *kids]})
        assert [i.seq_id for i in c._infos([a.seq_id, *kids])] == [a.seq_id, *kids]
        c.check_integrity()


def test_pins_and_stats_keep_their_salts_within_the_message_limit():
    """A pins page was bounded by the blocks it lists and stats by the count
    of tenants: long salts (4,096 pins of 16 KiB salts: 67 MB) passed the
    message limit. Now a salt counts in a pins page (the client reads every
    page) and stats lists the tenants whose salts fit a quarter of the limit,
    counting the rest in num_tenants."""
    with running_server(SMALL, max_message_bytes=1 << 16) as server, Client(server.endpoint) as c:
        salts = [f"{i:04d}" + "s" * 4000 for i in range(40)]  # 160 KB of salts
        prompt = list(range(3, 3 + SMALL.block_size))
        for salt in salts:
            [a] = c.allocate([prompt + [1]], salt=salt)
            c.commit(a.seq_id)
            c.pin([prompt], salt=salt)
        size, page = _reply_bytes(server.endpoint, "pins", {})
        assert size <= 1 << 16 and 1 <= len(page) < 40
        assert sorted(p.salt for p in c.pins()) == salts
        size, stats = _reply_bytes(server.endpoint, "stats", {})
        assert size <= 1 << 16
        assert stats["num_tenants"] == 40 and 1 <= len(stats["tenants"]) < 40
        st = c.stats()
        assert st.num_tenants == 40 and len(st.tenants) == len(stats["tenants"])
        c.check_integrity()


def test_stats_lists_tenants_within_a_bound_on_their_salts():
    """PoolStats listed 1,000 tenants whatever their salts (16 MB of them at
    16 KiB each): now as many as MAX_TENANT_SALT_BYTES of salts hold, the
    most cached first, all of them counted in num_tenants."""
    from kvpager import KVPool
    from kvpager.types import MAX_TENANT_SALT_BYTES

    pool = KVPool(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=400, block_size=16, dtype="float32"))
    salts = [f"{i:04d}" + "t" * 4092 for i in range(300)]  # 1.2 MB of salts
    for i, salt in enumerate(salts):
        [a] = pool.allocate([list(range(3, 3 + 16 * (1 + (i == 7)) + 1))], salt=salt)
        pool.commit(a.seq_id)
        pool.free([a.seq_id])
    st = pool.stats()
    assert st.num_tenants == 300
    assert len(st.tenants) == MAX_TENANT_SALT_BYTES // 4096 and st.tenants[0].salt == salts[7]
    pool.check_integrity()


def test_many_connections_that_read_nothing_hold_a_bounded_total_of_replies(monkeypatch):
    """Each connection holds a few unread replies, but connections are many:
    thirty that each asked six 16 MiB `tables` replies and read none held
    1.5 GiB of the daemon's memory. Past a budget for all of them together, a
    large reply of an op that changed nothing is refused (limit_exceeded,
    "ask again"); what clients read gives the budget back."""
    import zmq

    from kvpager import server as server_module

    monkeypatch.setattr(server_module, "UNREAD_REPLY_BYTES", 12 << 20)
    with running_server(LONG, max_message_bytes=1 << 22) as server, Client(server.endpoint) as c:
        assert server._unread.budget == 32 << 20  # (8 messages of the limit at least)
        server._unread.budget = 12 << 20
        [a] = c.allocate([list(range(3, 3 + 512 * 16))])
        ask = {"seq_ids": [a.seq_id] * 1900}  # a reply of 3.9 MB
        ctx = zmq.Context()
        hogs = []
        try:
            for _ in range(8):
                hog = ctx.socket(zmq.DEALER)
                hog.setsockopt(zmq.LINGER, 0)
                hog.setsockopt(zmq.RCVHWM, 1)
                hog.connect(server.endpoint)
                hogs.append(hog)
                for rid in range(2):  # two small replies it never reads: its queue (1) and its reader full
                    hog.send(req(rid, "stats", {}))
            assert wait_until(lambda: server.requests >= 2 + 16, timeout=20)
            for hog in hogs:  # so that no large reply leaves the daemon's hands: each stays held
                for rid in range(2, 6):
                    hog.send(req(rid, "tables", ask))
            assert wait_until(lambda: server.requests >= 2 + 16 + 32, timeout=20)
            # (the loop answers the last request after counting it: the budget is read in its thread)
            size = 4 * 1900 * 513  # (the reply's padded tables)
            with pytest.raises(LimitExceeded, match="clients that have not read them"):
                c._call("tables", {"seq_ids": [a.seq_id] * 1900})
            assert server._unread.bytes + size > 12 << 20 >= server._unread.bytes  # (pruned by that refusal)
            c.stats()  # small replies go on
            big = b"x" * (2 << 20)  # a large reply of an op that changed something goes all the same
            assert server._unread.admit("allocate", 7, big) is big and server._unread.admit("tables", 7, big) != big
            for hog in hogs:
                hog.close(0)
            hogs.clear()
            assert wait_until(lambda: (server._unread.prune(), server._unread.bytes)[1] == 0, timeout=10)
            tables, lens = c._daemon_tables([a.seq_id] * 1900)  # answered again
            assert tables.shape == (1900, 512)
        finally:
            for hog in hogs:
                hog.close(0)
            ctx.term()
        c.check_integrity()


def test_a_swap_in_whose_tables_the_budget_refuses_still_returns(monkeypatch):
    """A swap_in answering nil (its tables past the message limit) ran: the
    client's follow-up `tables` refused by the unread-replies budget made
    swap_in raise after the swap was applied (a caller retrying it got
    `not_swapped`). Now the mirror asks for those tables when next needed."""
    from kvpager import reply_budget
    from kvpager import server as server_module

    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=600, block_size=16, dtype="float32",
                    num_host_blocks=600)
    with running_server(spec, max_message_bytes=1 << 16) as server, Client(server.endpoint) as c:
        allocs = c.allocate([list(range(3, 3 + 512 * 16))] + [[7]] * 31)
        ids = [a.seq_id for a in allocs]
        c.swap_out(ids)
        monkeypatch.setattr(reply_budget, "LARGE", 1024)
        monkeypatch.setattr(server_module, "LARGE_REPLY", 1024)
        server._unread.budget = 0  # every read-only reply of 1 KiB or more refused
        c.swap_in(ids)
        server._unread.budget = 1 << 30
        assert not any(s.swapped for s in c.sequences())
        tables, lens = c.tables(ids)
        assert tables.shape == (32, 512) and list(lens) == [512 * 16] + [1] * 31
        c.check_integrity()


def test_refused_large_requests_are_not_held_after_their_replies():
    """A request refused by a check that names its error before raising it
    (``err = ...; raise err``: an unknown op, a version, a bad envelope) left a
    cycle through the error's traceback that kept the request's bytes and what was
    decoded from them until the collector's next pass: twenty refused 14 MiB
    requests held 500 MiB. Each is let go with its reply now."""
    import gc

    with running_server(SMALL) as srv:
        raw = Raw(srv.endpoint)
        try:
            body = msgpack.packb([1, 5, None, "no_such_op", {"x": bytes(8 << 20)}])
            raw.send(body, timeout=30)  # (the first one's buffers, reused after)
            gc.collect()
            gc.disable()
            try:
                before = _rss_mb()
                for _ in range(12):
                    assert raw.send(body, timeout=30)[2]["code"] == "unknown_op"
                grew = _rss_mb() - before
            finally:
                gc.enable()
        finally:
            raw.close()
    assert grew < 48, f"+{grew:.0f} MB held by twelve refused 8 MiB requests"
