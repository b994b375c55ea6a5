"""The client and the operator CLI against an endpoint whose replies are
well-formed msgpack of another shape (a program that is no kvpager daemon, a
daemon of another version, or a hostile one): a `ProtocolError`, and for the
CLI one line and exit code 2, never a traceback or a loop without end; the
events reader's malformed batches refused as no event batch."""

from __future__ import annotations

import contextlib
import math
import threading

import msgpack
import pytest
import zmq
from click.testing import CliRunner

from kvpager import Client
from kvpager.cli import main
from kvpager.errors import ProtocolError
from kvpager.events import parse_batch
from kvpager.server import Server
from kvpager.spec import PoolSpec

SPEC = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=16, num_blocks=8, block_size=16, dtype="float32")


@contextlib.contextmanager
def answering(tmp_path, replies):
    """An endpoint that passes each request to a real daemon, but answers the ops in
    ``replies`` (op -> result, or a callable of the request's arguments) itself."""
    real = Server.create(SPEC, f"ipc://{tmp_path}/real.sock").start()
    ctx = zmq.Context.instance()
    front = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{tmp_path}/front.sock"
    front.bind(endpoint)
    stop = threading.Event()

    def run():
        up = ctx.socket(zmq.DEALER)
        up.connect(real.endpoint)
        try:
            while not stop.is_set():
                if not front.poll(50):
                    continue
                frames = front.recv_multipart()
                rid, op, args = (lambda r: (r[1], r[3], r[4]))(msgpack.unpackb(frames[-1], raw=False,
                                                                               strict_map_key=False))
                if op in replies:
                    result = replies[op](args) if callable(replies[op]) else replies[op]
                    body = msgpack.packb([rid, 0, result])
                else:
                    up.send(frames[-1])
                    if not up.poll(5000):
                        break
                    body = up.recv()
                front.send_multipart(frames[:-1] + [body])
        finally:
            up.close(0)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield endpoint
    finally:
        stop.set()
        t.join(5)
        front.close(0)
        real.stop()


def cli(endpoint, *args):
    return CliRunner().invoke(main, [*args, "--endpoint", endpoint, "--timeout", "5"])


CASES = {
    "stats a list": (["stats"], {"stats": [1, 2]}),
    "stats missing fields": (["stats"], {"stats": {"total_blocks": 5}}),
    "sessions missing fields": (["sessions"], {"sessions": [{"name": "s1"}]}),
    "blocks of ints": (["blocks"], {"blocks": [1, 2, 3]}),
    "blocks of unequal arrays": (["blocks"], {"blocks": [[1], [1, 2], [3]]}),
    "tenants a list": (["tenants"], {"stats": [1]}),
    "top a list": (["top", "--iterations", "1"], {"stats": [1]}),
    "hello a list": (["stats"], {"hello": [1]}),
    "hello without epoch": (["stats"], {"hello": {"session": "x"}}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_cli_says_a_reply_is_no_daemons(tmp_path, case):
    args, replies = CASES[case]
    with answering(tmp_path, replies) as endpoint:
        r = cli(endpoint, *args)
    assert r.exit_code == 2, (r.output, r.exception)
    assert "is a kvpager daemon listening there?" in r.output
    assert not isinstance(r.exception, (TypeError, KeyError, AttributeError, IndexError))


PAGES = {
    "sequences": [{"seq_id": 5, "owner": "s1", "num_tokens": 1, "num_committed": 0, "block_table": [1],
                   "shared_blocks": 0, "swapped": False, "host_blocks": 0, "owner_pid": 1}],
    "pins": [{"owner": "s1", "salt": None, "num_tokens": 16, "block_table": [1], "pin_id": 0, "count": 1}],
}


@pytest.mark.parametrize("command, op", [("seqs", "sequences"), ("pins", "pins")])
def test_pages_that_do_not_go_up_end_the_listing(tmp_path, command, op):
    """An endpoint answering the same page again: before, `kvpager seqs` and `pins` asked
    for pages without end, holding each."""
    asked = []

    def page(args):
        asked.append(args.get("after"))
        return PAGES[op]

    with answering(tmp_path, {op: page}) as endpoint:
        r = cli(endpoint, command)
        with Client(endpoint, heartbeat=False, map_pool=False, timeout=5) as client, \
                pytest.raises(ProtocolError, match="not after it"):
            client.sequences() if op == "sequences" else client.pins()
    assert r.exit_code == 2 and "is a kvpager daemon listening there?" in r.output
    assert len(asked) == 4  # (two pages each: the first taken, the second the same)


@pytest.mark.parametrize("batch, match", [
    ([math.nan, []], "seconds since the epoch"),
    ([1e300, []], "seconds since the epoch"),
    ([2**64 - 1, []], "seconds since the epoch"),
    ([1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": 5}]], "token_ids must be a list"),
    ([1.0, [["BlockStored", 7, None, [1, 2]]]], "block_hashes must be a list"),
    ([1.0, [{"type": "BlockRemoved", "block_hashes": [1], "medium": 3}]], "medium must be a str"),
])
def test_malformed_event_batches_are_no_event_batches(batch, match):
    with pytest.raises(ValueError, match=match):
        parse_batch(batch)


def test_event_batches_of_either_format_still_parse():
    ts, events = parse_batch([1.5, [["BlockStored", [1, 2], None, [3] * 32, 16, None, "GPU"],
                                    {"type": "BlockRemoved", "block_hashes": [b"\x01" * 8]},
                                    ["AllBlocksCleared"]]])
    assert ts == 1.5 and [e["type"] for e in events] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    assert events[0]["medium"] == "GPU" and events[0]["block_size"] == 16
