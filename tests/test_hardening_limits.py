"""Issue 11, bounds on everything a client asks: requests, sessions, staging
bytes and kept replies bounded, capacity checked before hashing, sequences
listed a page at a time, token and id counts, pins and tables bounded. Each
test is an attack that once worked against a CPU daemon; bounded waits, free
endpoints. (The loop that cannot be stalled: `test_hardening_loop.py`.)"""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
from daemon_helpers import SMALL, Raw, req, running_server, server_fixture

from kvpager.client import Client
from kvpager.errors import LimitExceeded, NotOwner, OutOfBlocks
from kvpager.limits import Limits

server = server_fixture(SMALL, heartbeat_timeout=30)


def test_requests_and_sessions_are_bounded(server):
    """D4, D5, D9: caps on sequences per session, ids and tokens per request,
    the client name; typed errors that name the setting; nothing changed."""
    with Client(server.endpoint, timeout=30) as c:
        t0 = time.monotonic()
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_IDS") as e:
            c._call("sequences", {"seq_ids": np.arange(1_200_000)})
        assert e.value.limit == "ids" and e.value.maximum == 1 << 16
        assert time.monotonic() - t0 < 5
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_TOKENS"):
            c.allocate([np.zeros(1 << 20, np.uint8), [1]])
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_STAGING"):
            c._call("staging", {"nbytes": (1 << 30) + 1})
        assert c.stats().num_sequences == 0
    with pytest.raises(LimitExceeded, match="KVPAGER_MAX_CLIENT_NAME"):
        Client(server.endpoint, name="x" * 300)
    with running_server(SMALL, limits=Limits(sequences=100, ids=64)) as small, \
            Client(small.endpoint) as c:
        [a] = c.allocate([[1, 2, 3]])
        for _ in range(7):
            [kids] = c.fork(a.seq_id, 14)  # 99 sequences now
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_SEQUENCES"):
            c.fork(a.seq_id, 2)
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_SEQUENCES"):
            c.allocate([[1], [2]])
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_IDS"):
            c.fork(a.seq_id, 65)
        c.free(kids)
        c.fork(a.seq_id, 14)  # room again
        assert c.stats().num_sequences == 99
        c.check_integrity()  # the session's count agrees with the pool


def test_staging_bytes_are_capped_in_all():
    with running_server(SMALL, limits=Limits(staging=4 << 20, staging_total=6 << 20)) as server, \
            Client(server.endpoint) as a, Client(server.endpoint) as b:
        a._stage(4 << 20)
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_STAGING_TOTAL"):
            b._stage(4 << 20)
        b._stage(1 << 20)
        a.close()  # its buffer goes back
        b._stage(4 << 20)


def test_capacity_is_checked_before_hashing(monkeypatch):
    """D6: share_in_batch hashed a whole 16M-token prompt before finding the
    pool too small; now a prompt that cannot fit is refused before any hashing."""
    with running_server(SMALL, limits=Limits(tokens=1 << 24)) as server, Client(server.endpoint) as c:
        def hashing(*args, **kwargs):
            raise AssertionError("the allocator was asked to hash a prompt that cannot fit")

        monkeypatch.setattr(server.pool, "allocate", hashing)
        with pytest.raises(OutOfBlocks) as e:
            c.allocate([np.zeros(1 << 22, np.uint8)], share_in_batch=True)
        assert e.value.needed == (1 << 22) // SMALL.block_size
        assert e.value.available == SMALL.num_blocks - 1


def test_sessions_and_kept_replies_are_bounded():
    """D11 follow-up: a client opening session after session, or sending
    mutating requests with huge replies, cannot grow the daemon's memory
    without bound: hello past the sessions limit is refused (and admits again
    once one closes); replies kept for retries stay within the byte limit, and
    the retry of one too large to keep is told it ran, without running again."""
    limits = Limits(sessions=3, kept=4096)
    with running_server(SMALL, heartbeat_timeout=30, limits=limits) as server:
        clients = [Client(server.endpoint) for _ in range(3)]
        try:
            with pytest.raises(LimitExceeded, match="sessions open at once"):
                Client(server.endpoint)
            clients.pop().close()
            clients.append(Client(server.endpoint))  # a closed one makes room
            c = clients[0]
            raw = Raw(server.endpoint)
            try:
                small = req(21, "allocate", {"prompts": [[1, 2, 3]]}, session=c.session)
                assert raw.recv_raw(small) == raw.recv_raw(small)  # kept: replayed
                big = req(22, "allocate", {"prompts": [list(range(350))] * 2}, session=c.session)
                reply = raw.recv_raw(big)
                assert len(reply) > 4096 and msgpack.unpackb(reply, raw=False)[1] == 0
                before = c.stats().num_sequences
                again = msgpack.unpackb(raw.recv_raw(big), raw=False)
                assert again[1] == 1 and again[2]["code"] == "limit_exceeded" and " ran" in again[2]["message"]
                assert c.stats().num_sequences == before  # not run twice
                session = next(s for s in server.sessions.sessions.values() if s.name == c.session_name)
                assert session.kept_bytes <= 4096
                assert session.kept_bytes == sum(len(r) if r is not None else 8 * len(ids or ())
                                                     for _, r, ids in session.replies.values())
            finally:
                raw.close()
        finally:
            for c in clients:
                c.close()


def test_sequences_come_a_page_at_a_time(server):
    """D9: a `sequences` call with a million ids kept the loop busy for 11 s."""
    with Client(server.endpoint) as c, Client(server.endpoint) as d:
        mine = [a.seq_id for a in c.allocate([[]] * 5000)]
        theirs = [a.seq_id for a in d.allocate([[]] * 10)]
        assert [s.seq_id for s in d.sequences()] == sorted(mine + theirs)
        with pytest.raises(LimitExceeded, match="pages"):
            d._call("sequences", {"seq_ids": mine})
        page = d._call("sequences", {"owner": d.session_name, "after": theirs[3], "limit": 4})
        assert [x["seq_id"] for x in page] == theirs[4:8]
        assert len(d._call("sequences", {})) == 4096  # an older client: the first page


def test_token_counts_as_arrays_are_held_to_the_tokens_limit():
    """Appended token counts sent as an integer array, and token ids sent as one
    2-D array, count toward the tokens limit as their list forms do (they were
    not counted: an append of 40 slots went through a limit of 32)."""
    with running_server(SMALL, limits=Limits(tokens=32)) as small, Client(small.endpoint) as c:
        a, b = c.allocate([[1, 2, 3], [4, 5, 6]])
        ids = [a.seq_id, b.seq_id]
        before = [c.sequence(s).num_tokens for s in ids]
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_TOKENS"):
            c._call("append", {"seq_ids": ids, "num_tokens": np.array([20, 20])})
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_TOKENS"):
            c._call("append", {"seq_ids": ids, "num_tokens": [20, 20]})
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_TOKENS"):
            c._call("append", {"seq_ids": ids, "num_tokens": 20,
                               "token_ids": np.arange(40, dtype=np.int64).reshape(2, 20)})
        assert [c.sequence(s).num_tokens for s in ids] == before
        c._call("append", {"seq_ids": ids, "num_tokens": np.array([10, 6])})  # within it
        assert [c.sequence(s).num_tokens for s in ids] == [before[0] + 10, before[1] + 6]
        c.check_integrity()


def test_lists_of_id_lists_are_counted_whatever_they_hold():
    """Token ids as lists of lists (what msgpack decodes; counted at C speed) and mixed
    with other items (counted one by one) are held to the tokens limit alike, in
    allocate, append and record_tokens: refused by name, nothing changed."""
    with running_server(SMALL, limits=Limits(tokens=32)) as small, Client(small.endpoint) as c:
        a, b = c.allocate([[1, 2, 3], [4, 5, 6]])
        ids = [a.seq_id, b.seq_id]
        c.append_flat(ids, 16)  # slots without ids: 16 each to record
        before = c.stats()
        for op, args in (
            ("allocate", {"prompts": [[7] * 20, [8] * 13]}),
            ("allocate", {"prompts": [[7] * 20, "x", [8] * 13]}),  # mixed: the slow count
            ("append", {"seq_ids": ids, "token_ids": [[7] * 17, [8] * 16]}),
            ("record_tokens", {"seq_ids": ids, "token_ids": [[7] * 17, [8] * 16]}),
            ("record_tokens", {"seq_ids": ids, "token_ids": [[7] * 17, np.full(16, 8)]}),
        ):
            with pytest.raises(LimitExceeded, match="KVPAGER_MAX_TOKENS"):
                c._call(op, args)
        assert c.stats() == before
        c._call("record_tokens", {"seq_ids": ids, "token_ids": [[7] * 16, [8] * 16]})  # 32: within it
        c.check_integrity()


@pytest.mark.parametrize("call", [
    lambda c, ids: c.append(ids, 1 << 63),  # 2 x 2**63 token slots: a count past uint64 in the limit's details
    lambda c, ids: c.fork(ids, 1 << 63),
])
def test_a_limit_counting_past_uint64_is_answered_and_the_daemon_lives(call):
    """A limit's error carried the count it measured in its details; 2 x 2**63 is past
    what msgpack can carry, encoding the error reply raised, and the daemon's loop died
    with it. The reply now carries that count as text, and the daemon keeps serving."""
    with running_server(SMALL) as server, Client(server.endpoint, timeout=10) as c:
        ids = [s.seq_id for s in c.allocate([[1, 2, 3], [4, 5]])]
        with pytest.raises(LimitExceeded) as raised:
            call(c, ids)
        assert str(1 << 64) in str(raised.value)
        assert c.stats().num_sequences == 2  # still serving, nothing changed
        server.pool.check_integrity()


def test_the_blocks_a_sessions_pins_list_are_bounded():
    """Nested pins of one long cached prompt (each prefix length a distinct pin)
    once grew without bound: every pin keeps its keys and block list, and the
    ``pins`` reply lists them all (3,000 took 316 MB and a 1.2 s reply). A
    session's pins list at most `Limits.pin_blocks` blocks; a pin past it is
    refused and changes nothing; re-pinning a pinned prefix adds no blocks; the
    pool's own (kept) pins and other sessions are not held to one session's count."""
    bs = SMALL.block_size
    prompt = list(range(10 * bs))
    with running_server(SMALL, limits=Limits(pin_blocks=20)) as server, \
            Client(server.endpoint) as c, Client(server.endpoint) as other:
        (a,) = c.allocate([prompt])
        c.commit([a.seq_id])
        assert c.pin([prompt[: 4 * bs], prompt[: 6 * bs]]) == [4 * bs, 6 * bs]  # 10 listed
        assert c.pin([prompt[: 4 * bs]] * 3) == [4 * bs] * 3  # the same pin counted: nothing new listed
        before = c.pins()
        with pytest.raises(LimitExceeded, match="pin_blocks|listed by this session's pins") as e:
            c.pin([prompt[: 5 * bs], prompt[: 7 * bs]])  # 12 more: 22 > 20
        assert e.value.limit == "pin_blocks" and e.value.value == 22 and e.value.maximum == 20
        assert c.pins() == before  # nothing changed
        assert c.pin([prompt[: 10 * bs]]) == [10 * bs]  # exactly 20
        assert other.pin([prompt[: 9 * bs], prompt[: 8 * bs]]) == [9 * bs, 8 * bs]  # its own count
        c.unpin([prompt[: 10 * bs]])
        assert c.pin([prompt[: 9 * bs]]) == [9 * bs]  # room again: 19
        c.check_integrity()


def test_the_block_tables_of_all_sessions_are_bounded():
    """One row a sequence, as wide as the longest: 65,535 empty sequences beside
    one of 2,900 blocks made the daemon's tables 760 MB (its pool: 5.9 MiB),
    all within the per-session limits. Now an allocate or fork that would grow
    them past --max-tables is refused, nothing changed."""
    with running_server(SMALL, limits=Limits(tables=1 << 20)) as server, Client(server.endpoint) as c, \
            Client(server.endpoint) as other:
        [long] = c.allocate([list(range(3, 3 + 90 * SMALL.block_size))])  # 90 blocks wide
        c.allocate([[]] * 1000)
        before = (c.stats(), len(c.sequences()))
        with pytest.raises(LimitExceeded, match="block tables") as e:
            other.allocate([[]] * 3000)  # another session's rows count too
        assert e.value.limit == "tables"
        with pytest.raises(LimitExceeded, match="block tables"):
            c.fork(long.seq_id, 3000)
        assert (c.stats(), len(c.sequences())) == before
        other.allocate([[]] * 500)  # within it
        c.check_integrity()


def test_tables_that_freed_sequences_grew_do_not_count_against_new_ones():
    """The check counted the table's rows and width, which a table under 64 MiB
    never gave back: after one long sequence came and went, many short prompts
    were refused for the daemon's life (and after many short ones, one long
    prompt). The table is cut to its live sequences before a refusal now."""
    bs = SMALL.block_size
    with running_server(SMALL.replace(num_blocks=1200), limits=Limits(tables=1 << 20)) as server, \
            Client(server.endpoint) as c, Client(server.endpoint) as other:
        [long] = c.allocate([list(range(3, 3 + 1000 * bs))])  # 1,000 blocks wide
        c.free(long.seq_id)
        short = other.allocate([[]] * 1000)  # 1,000 rows of 1,000 blocks: 4 MB, were it kept so wide
        other.free([a.seq_id for a in short])
        other.allocate([[]] * 2000)
        with pytest.raises(LimitExceeded, match="block tables"):  # live ones count as before
            c.allocate([list(range(3, 3 + 1000 * bs))])
        table = server.pool.manager.table
        assert 4 * len(table.num_blocks) * table.width <= 1 << 20
        c.check_integrity()


def test_live_sequences_of_all_sessions_are_bounded():
    """Each live sequence costs the daemon ~400 bytes of bookkeeping that no limit
    counted: 32 sessions forking 65,535 one-block children each took 2.1M sequences
    and 715 MB in 2.6 s, and the default limits let 1,024 sessions take 67M (about
    25 GB). Now live sequences of all sessions together are bounded
    (--max-sequences-total): an allocate or fork past it is refused, nothing changed."""
    with running_server(SMALL, limits=Limits(sequences=100, sequences_total=150)) as server, \
            Client(server.endpoint) as a, Client(server.endpoint) as b:
        [pa] = a.allocate([[1, 2, 3]])
        [kids] = a.fork(pa.seq_id, 99)  # 100: the session's limit
        [pb] = b.allocate([[4, 5]])
        b.fork(pb.seq_id, 49)  # 150 in all
        before = (b.stats(), len(b.sequences()))
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_SEQUENCES_TOTAL") as e:
            b.fork(pb.seq_id, 1)
        assert (e.value.limit, e.value.value, e.value.maximum) == ("sequences_total", 151, 150)
        with pytest.raises(LimitExceeded, match="live sequences of all sessions"):
            b.allocate([[6]])
        assert (b.stats(), len(b.sequences())) == before
        a.free(kids[:10])
        b.fork(pb.seq_id, 10)  # room again
        assert b.stats().num_sequences == 150
        b.check_integrity()


def test_the_table_entries_one_fork_makes_are_bounded():
    """A fork copies each child's table row and counts its blocks' references on
    the loop, about 10 ns an entry: 65,000 children of a 262,144-token sequence held
    it 10.7 s, and a healthy client's call timed out. Now one fork's entries
    (children x their parent's blocks) are bounded (--max-fork-work)."""
    with running_server(SMALL, limits=Limits(fork_work=1 << 16)) as server, Client(server.endpoint) as c:
        [p] = c.allocate([list(range(3, 3 + 64 * SMALL.block_size))])  # 64 blocks
        [short] = c.allocate([[1, 2]])
        before = (c.stats(), len(c.sequences()))
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_FORK_WORK") as e:
            c.fork([p.seq_id, short.seq_id], 1010)  # 1,010 x (64 + 1) entries
        assert (e.value.limit, e.value.value) == ("fork_work", 65_650)
        assert (c.stats(), len(c.sequences())) == before
        assert len(c.fork(p.seq_id, 1024)[0]) == 1024  # 65,536 entries: the limit exactly
        assert len(c.fork(short.seq_id, 5000)[0]) == 5000  # a one-block sequence's children: cheap
        with Client(server.endpoint) as other, pytest.raises(NotOwner):
            other.fork(p.seq_id, 1010)  # another session's sequence: not its to fork, its size not told
        c.check_integrity()


def test_an_appends_tokens_count_once_with_their_ids():
    """The tokens limit counts token ids in one request: an append of 39 tokens
    with their ids counted 78 (its count and its ids), so `score` through a
    daemon was refused under a limit its prompts fit."""
    with running_server(SMALL, limits=Limits(tokens=64)) as server, Client(server.endpoint) as c:
        [a] = c.allocate([[5]])
        c.append_flat([a.seq_id], [39], [list(range(39))])
        c.append([a.seq_id], 24, token_ids=[list(range(24))])
        with pytest.raises(LimitExceeded, match="65 is over the limit of 64"):
            c.append_flat([a.seq_id], [65], [list(range(65))])
        assert c.sequence(a.seq_id).num_tokens == 64
        c.check_integrity()


def test_appends_that_would_widen_the_tables_past_the_limit_are_refused():
    """Empty sequences first, then one grown by appends: each append that
    crossed the tables' width doubled every row's, past --max-tables."""
    with running_server(SMALL.replace(num_blocks=1200), limits=Limits(tables=1 << 20)) as server, \
            Client(server.endpoint) as c:
        c.allocate([[]] * 4000)
        [a] = c.allocate([[1]])
        with pytest.raises(LimitExceeded, match="block tables"):
            for _ in range(1000):
                c.append_flat([a.seq_id], [SMALL.block_size])
        table = server.pool.manager.table
        assert 4 * len(table.num_blocks) * table.width <= 1 << 20
        c.check_integrity()


def test_sequences_of_no_ids_are_none():
    with running_server(SMALL) as server, Client(server.endpoint) as c:
        assert c._call("sequences", {"seq_ids": []}) == []


def test_the_work_of_one_staged_attend_is_bounded():
    """One staged attend of 65,536 copies of a 16k-token sequence (ids may repeat;
    query tokens are bounded only by the staging buffer) held the loop 18 s on the
    2-core VM: every other client's calls timed out. Its work (query-key pairs x
    (query heads x head dim + 256)) is held to a limit now: refused at once,
    nothing changed; under it (fewer copies, or a window that reads fewer keys)
    served, as the embedded pool answers."""
    pairs_cost = 2 * SMALL.num_kv_heads * SMALL.head_dim + 256  # 2 query heads a kv head
    limit = 1 << 20  # the least it may be: 3 decode rows of 1,000 tokens, not 4
    with running_server(SMALL, heartbeat_timeout=30, limits=Limits(attend_work=limit)) as srv, \
            Client(srv.endpoint, timeout=30, map_pool=False) as c:
        [a] = c.allocate([list(range(1000))])
        heads = 2 * SMALL.num_kv_heads
        n = limit // (1000 * pairs_cost) + 1  # just past the limit
        q = np.random.default_rng(0).standard_normal((n, heads, SMALL.head_dim)).astype(np.float32)
        before = c.stats()
        t0 = time.monotonic()
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_ATTEND_WORK") as e:
            c.attend(0, [a.seq_id] * n, q)
        assert time.monotonic() - t0 < 5
        assert e.value.limit == "attend_work" and e.value.value == n * 1000 * pairs_cost
        assert c.stats() == before
        ids = [a.seq_id] * (n - 1)
        np.testing.assert_allclose(c.attend(0, ids, q[:-1]), srv.pool.attend(0, ids, q[:-1]), rtol=1e-5, atol=1e-6)
        windowed = c.attend(0, [a.seq_id] * n, q, window=64)  # each query reads its last 64 keys alone
        np.testing.assert_allclose(windowed, srv.pool.attend(0, [a.seq_id] * n, q, window=64), rtol=1e-5, atol=1e-6)
