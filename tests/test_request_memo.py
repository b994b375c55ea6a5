"""The daemon's memo of decode-step requests (`kvpager.request_memo`): a request
that repeats an earlier one but for its id is not decoded or checked again,
and is answered exactly as if it were (the same replies as a daemon without
the memo, errors included); what can change between repeats (the session,
the ids' owner and state, the message size limit) is still checked."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest

from kvpager import KVPool, PoolSpec, protocol, server_dispatch
from kvpager.request_memo import MEMO_BYTES, RequestMemo, split_id
from kvpager.server import Server

SPEC = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=64, block_size=8, dtype="float32")


@pytest.mark.parametrize("rid", [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1])
def test_split_id_reads_the_id_and_keeps_the_rest(rid):
    rest = ["0123456789abcdef", "append", {"seq_ids": np.arange(40, dtype=np.int64)}]
    body = protocol.pack([protocol.VERSION, rid, *rest])
    got, tail = split_id(body)
    assert got == rid and tail == protocol.pack([protocol.VERSION, 0, *rest])[3:]
    # an id written longer than it needs to be is the same id, with the same rest
    long = bytes([0x95, protocol.VERSION, 0xCF]) + rid.to_bytes(8, "big") + tail
    assert split_id(long) == (rid, tail) and msgpack.unpackb(long, strict_map_key=False)[1] == rid


@pytest.mark.parametrize("body", [
    protocol.pack([protocol.VERSION, -1, "s", "append", {}]),  # a negative id: the decoder judges it
    protocol.pack([protocol.VERSION, True, "s", "append", {}]),
    protocol.pack([protocol.VERSION, "7", "s", "append", {}]),
    protocol.pack([protocol.VERSION + 1, 7, "s", "append", {}]),
    protocol.pack([protocol.VERSION, 7, "s", "append"]),
    protocol.pack({"id": 7}),
    b"",
    b"\x95\x01",
    protocol.pack([protocol.VERSION, 7, "s", "append", {"x": b"\0" * MEMO_BYTES}]),  # too long to keep
])
def test_split_id_leaves_anything_else_to_the_decoder(body):
    assert split_id(body) is None


def test_the_memo_keeps_the_newest_few():
    memo = RequestMemo(size=2)
    for t in (b"a", b"b", b"c"):
        memo.put(t, "s", "append", {"t": t})
    assert memo.get(b"a") is None and memo.get(b"b")[2] == {"t": b"b"} and len(memo) == 2
    memo.put(b"d", "s", "append", {})  # b was used last: c goes
    assert memo.get(b"c") is None and memo.get(b"b") is not None
    off = RequestMemo(size=0)
    off.put(b"a", "s", "append", {})
    assert off.get(b"a") is None


class Wire:
    """Requests to a server with no socket (`Server.handle`), their replies decoded."""

    def __init__(self, server: Server):
        self.server, self.ids = server, iter(range(1, 10**9))
        self.session = self.call("hello", {"client": "t", "pid": os.getpid()})[2]["session"]

    def body(self, op, args, rid=None, session=None):
        return protocol.pack([protocol.VERSION, next(self.ids) if rid is None else rid,
                              session or getattr(self, "session", None), op, args])

    def send(self, body):
        reply = protocol.unpack(self.server.handle(body))
        if reply[1]:  # an error: its code and message (the message names the request's own ids)
            return reply[0], reply[1], reply[2]["code"], reply[2]["message"]
        return reply[0], reply[1], reply[2].tolist() if isinstance(reply[2], np.ndarray) else reply[2]

    def call(self, op, args, **kw):
        return self.send(self.body(op, args, **kw))


def schedule(memo: bool) -> list:
    """A decode loop's requests and what happens between them, on one server."""
    server = Server(KVPool(SPEC), "ipc:///nonexistent/memo.sock")
    if not memo:
        server._memo.size = 0
    a, b = Wire(server), Wire(server)
    seqs = [s[0] for s in a.call("allocate", {"prompts": [[1, 2, 3]] * 3})[2]]
    [other] = [s[0] for s in b.call("allocate", {"prompts": [[4, 5]]})[2]]
    packed = np.array(seqs, np.int64)
    out = []
    for _ in range(12):  # a decode loop: the same request but its id, packed ids and a list
        out.append(a.call("append", {"seq_ids": packed}))
        out.append(a.call("append", {"seq_ids": seqs[:2]}))
    retry = a.body("append", {"seq_ids": packed})
    out += [a.send(retry), a.send(retry)]  # a retry (same id, same bytes): the kept reply
    out.append(b.call("append", {"seq_ids": packed}))  # another session's request for a's ids
    out.append(a.call("append", {"seq_ids": packed}, session=b.session))  # a's bytes, b's session
    out.append(a.call("free", {"seq_ids": seqs[2:]}))
    out.append(a.call("append", {"seq_ids": packed}))  # one of them is gone
    out.append(a.call("append", {"seq_ids": seqs[:2]}))
    out.append(b.call("append", {"seq_ids": [other]}))
    out.append(a.call("bye", {}))
    out.append(a.call("append", {"seq_ids": seqs[:2]}))  # the session is gone
    out.append(b.call("stats", {}))
    server.pool.check_integrity()
    return out


def test_repeats_are_answered_as_without_the_memo(monkeypatch):
    decoded = []
    real = server_dispatch.decode_request
    monkeypatch.setattr(server_dispatch, "decode_request", lambda d, lim, *b: decoded.append(1) or real(d, lim, *b))
    with_memo = schedule(True)
    n_with = len(decoded)
    without = schedule(False)
    assert with_memo == without
    assert n_with <= len(decoded) - n_with - 20  # the loop's repeats were not decoded again
    codes = [r[2] for r in with_memo if r[1]]
    assert {"not_owner", "unknown_sequence"} <= set(codes) and codes[-1] == "session_lost"


def test_a_repeat_over_the_message_limit_is_refused():
    """The same request with a longer id, one byte over the limit: refused, though
    its bytes after the id were decoded and kept before."""
    server = Server(KVPool(SPEC), "ipc:///nonexistent/memo.sock")
    a = Wire(server)
    seqs = [s[0] for s in a.call("allocate", {"prompts": [[1, 2, 3]] * 2})[2]]
    first = a.body("append", {"seq_ids": seqs}, rid=5)
    server.max_message_bytes = len(first) + 2
    assert a.send(first)[1] == 0
    assert len(server._memo) == 1
    longer = a.body("append", {"seq_ids": seqs}, rid=2**32)  # 4 bytes more
    assert split_id(longer)[1] == split_id(first)[1]
    assert a.send(longer)[2] == "message_too_large"
    assert a.call("sequences", {})[2][0]["num_tokens"] == 4  # it did not run
