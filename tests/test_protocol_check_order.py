"""What docs/protocol.md says a request wrong in two ways is answered with, and
arguments of the wrong type that were taken as something else: each found by a
client written from the document alone.

- ids given twice, and truncate's ``lengths``, are checked before the ids'
  existence and owner (`invalid_argument`): another session's id given twice
  was `not_owner`, a length of -1 for an unknown id `unknown_sequence`;
- ``sequences``'s ``owner`` is a session name: 5 answered ``[]`` (no such
  session); hello's ``pid`` is an int and ``host`` and the tokens strings: a
  pid of "not-a-pid" opened a session whose pid showed as nil, a token of 5
  one on a daemon without tokens.

Each refusal changes nothing; raw requests where the client would refuse
first; bounded waits, free endpoints."""

from __future__ import annotations

import pytest
from daemon_helpers import SMALL, Raw, req, server_fixture
from pool_helpers import snapshot

from kvpager import KVPool
from kvpager.client import Client
from kvpager.errors import InvalidArgument, NotOwner, UnknownSequence
from kvpager.protocol import unpack

server = server_fixture(SMALL, heartbeat_timeout=30)

#: every op that changes sequences by id, with the arguments it needs besides ``seq_ids``
CHANGES = [
    ("free", {}),
    ("fork", {}),
    ("append", {"num_tokens": 1}),
    ("commit", {}),
    ("swap_out", {}),
    ("truncate", {"lengths": 1}),
    ("release", {"positions": 0}),
]


def _state(server):
    pool, blocks, seqs = snapshot(server.pool)
    return pool, blocks.state.tobytes(), blocks.ref_cnt.tobytes(), [(i, list(t), n) for i, t, n in seqs], \
        sorted((s.name, s.num_seqs, s.pid) for s in server.sessions.by_name.values())


@pytest.mark.parametrize("op, args", CHANGES, ids=[c[0] for c in CHANGES])
def test_another_sessions_id_given_twice_is_invalid_argument_before_not_owner(server, op, args):
    with Client(server.endpoint, timeout=10, map_pool=False) as a, \
            Client(server.endpoint, timeout=10, map_pool=False) as b:
        [s] = a.allocate([list(range(20))])
        before = _state(server)
        with pytest.raises(InvalidArgument, match="twice|duplicate"):
            b._call(op, {"seq_ids": [s.seq_id, s.seq_id], **args})
        with pytest.raises(NotOwner):  # once: not_owner, as before
            b._call(op, {"seq_ids": [s.seq_id], **args})
        assert _state(server) == before


@pytest.mark.parametrize("lengths", [-1, "x", True, 2.0, [1, -3]])
def test_truncate_lengths_are_checked_before_the_ids(server, lengths):
    """For unknown ids, another session's ids, and in the embedded pool alike."""
    n = len(lengths) if isinstance(lengths, list) else 1
    unknown = list(range(999_990, 999_990 + n))
    with Client(server.endpoint, timeout=10, map_pool=False) as a, \
            Client(server.endpoint, timeout=10, map_pool=False) as b:
        theirs = [s.seq_id for s in a.allocate([list(range(20 + k)) for k in range(n)])]
        before = _state(server)
        for c, ids in ((a, unknown), (b, theirs)):
            with pytest.raises(InvalidArgument, match="lengths"):
                c._call("truncate", {"seq_ids": ids, "lengths": lengths})
        assert _state(server) == before
        with pytest.raises(UnknownSequence):  # good lengths: the ids' checks as before
            a._call("truncate", {"seq_ids": unknown, "lengths": 0})
        with pytest.raises(NotOwner):
            b._call("truncate", {"seq_ids": theirs, "lengths": 0})
    pool = KVPool(SMALL)
    ours = [s.seq_id for s in pool.allocate([list(range(20 + k)) for k in range(n)])]
    with pytest.raises(InvalidArgument, match="lengths"):
        pool.truncate(unknown, lengths)
    with pytest.raises(InvalidArgument, match="lengths"):
        pool.truncate(ours, lengths)
    pool.truncate(ours, 3)
    assert [pool.sequence(i).num_tokens for i in ours] == [3] * n


@pytest.mark.parametrize("owner", [5, 1.5, True, ["s1"], b"s1"])
def test_sequences_owner_must_be_a_session_name(server, owner):
    with Client(server.endpoint, timeout=10, map_pool=False) as c:
        c.allocate([list(range(20))])
        with pytest.raises(InvalidArgument, match="owner"):
            c._call("sequences", {"owner": owner})
        assert len(c._call("sequences", {"owner": c.session_name})) == 1  # a name: as before


@pytest.mark.parametrize("args, needle", [
    ({"pid": "not-a-pid"}, "pid"),
    ({"pid": -1}, "pid"),
    ({"pid": True}, "pid"),
    ({"pid": 1.5}, "pid"),
    ({"host": 5}, "host"),
    ({"host": ["h"]}, "host"),
    ({"token": 5}, "token"),  # (a daemon without tokens ignores a string one: a worker's inherited)
    ({"control_token": b"t"}, "control_token"),
])
def test_hello_pid_and_host_of_another_type_open_no_session(server, args, needle):
    raw = Raw(server.endpoint)
    try:
        before = _state(server)
        _, status, error = unpack(raw.recv_raw(req(1, "hello", {"client": "probe", **args})))
        assert status != 0 and error["code"] == "invalid_argument" and needle in error["message"], error
        assert _state(server) == before
        _, status, info = unpack(raw.recv_raw(req(2, "hello", {"client": "probe", "pid": 4321, "host": "h"})))
        assert status == 0
        assert [s.pid for s in server.sessions.by_name.values() if s.name == info["name"]] == [4321]
        _, status, info = unpack(raw.recv_raw(req(3, "hello", {"client": "probe", "pid": None, "host": None})))
        assert status == 0  # both optional: nil is no value
    finally:
        raw.close()
