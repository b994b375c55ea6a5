"""The daemon in this process: sessions, ownership, typed errors, bad input,
heartbeat expiry, endpoints. Every case ends with the daemon still serving
and `check` passing."""

from __future__ import annotations

import os
import stat
import time

import msgpack
import numpy as np
import pytest
from daemon_helpers import (
    SMALL,
    Raw,
    client_fixture,
    free_tcp_endpoint,
    ipc_endpoint,
    req,
    running_server,
    server_fixture,
    wait_until,
)

from kvpager import env, protocol
from kvpager.client import Client
from kvpager.endpoints import ensure_runtime_dir
from kvpager.errors import (
    DaemonUnavailable,
    InvalidArgument,
    MessageTooLarge,
    NotOwner,
    NotSwapped,
    OutOfBlocks,
    RequestTimeout,
    SessionLost,
    UnknownSequence,
)
from kvpager.protocol import VERSION

server = server_fixture(SMALL, heartbeat_timeout=30)


client = client_fixture(timeout=10)


_req = req


def _assert_healthy(client: Client):
    client.check_integrity()
    assert client.stats().total_blocks == SMALL.num_blocks - 1


def test_basic_ops_and_result_types(client):
    [a] = client.allocate([list(range(40))])
    assert a.block_table == (1, 2, 3) and a.num_cached_tokens == 0 and len(a.slots) == 40
    [s] = client.append([a.seq_id], 2)
    assert s.tolist() == [56, 57]
    assert client.commit(a.seq_id) == [2]  # the prompt's two full blocks
    info = client.sequence(a.seq_id)
    assert (info.num_tokens, info.owner, info.block_table) == (42, client.session_name, (1, 2, 3))
    assert client.stats().used_blocks == 3
    assert client.blocks().ref_cnt[1:4].tolist() == [1, 1, 1]
    client.free([a.seq_id])
    assert client.stats().num_sequences == 0
    _assert_healthy(client)


def test_typed_errors_from_the_pool(client):
    with pytest.raises(UnknownSequence, match="unknown sequence 12345"):
        client.append([12345])
    [a] = client.allocate([[1, 2, 3]])
    client.free(a.seq_id)
    with pytest.raises(UnknownSequence):
        client.free(a.seq_id)  # double free
    with pytest.raises(OutOfBlocks) as e:
        client.allocate([list(range(SMALL.num_blocks * SMALL.block_size))])
    assert e.value.needed == SMALL.num_blocks and e.value.available == SMALL.num_blocks - 1
    [b] = client.allocate([[1, 2]])
    with pytest.raises(NotSwapped):
        client.swap_in([b.seq_id])
    with pytest.raises(InvalidArgument):
        client.truncate([b.seq_id], [99])
    client.free(b.seq_id)
    _assert_healthy(client)


def test_wrong_argument_types(client):
    [a] = client.allocate([[1, 2, 3]])
    for call in (
        lambda: client.append("seven"),
        lambda: client.append([a.seq_id], "many"),
        lambda: client.append([a.seq_id, a.seq_id]),
        lambda: client.fork([a.seq_id], n=-1),
        lambda: client.fork([a.seq_id], n=10**9),
        lambda: client.allocate([[]] * 70_000),
        lambda: client.allocate("not a list"),
        lambda: client.allocate([["a", "b"]]),
        lambda: client.allocate([[1, 2]], salt=3.5),
        lambda: client.truncate([a.seq_id], {"x": 1}),
        lambda: client._call("staging", {"nbytes": "lots"}),
        lambda: client._call("write", {"layer": 0, "slots": [16], "k": "x", "v": [0, [1]]}),
        lambda: client._call("attend", {"layer": "0", "seq_ids": [a.seq_id], "q": [0, [1, 2, 16]], "out": 0}),
        # attention sinks: the wrong count, non-finite (as a list and packed), not numbers
        *(lambda sinks=sinks: client._call("attend", {"layer": 0, "seq_ids": [a.seq_id], "q": [0, [1, 2, 16]],
                                                       "out": 256, "sinks": sinks})
          for sinks in ([0.5], [0.5, float("nan")], np.array([np.inf, 0.0], np.float32), ["a", "b"], {"x": 1})),
        lambda: client.remote_write(0, a.slots, np.zeros((3, 2, 16)), np.zeros((3, 2, 16))),  # float64
        lambda: client._call("write", {"layer": 0, "slots": a.slots, "k": [1 << 40, [3, 2, 16]],
                                       "v": [0, [3, 2, 16]]}),
    ):
        if client._staging is None:
            client._stage(1024)
        with pytest.raises(InvalidArgument):
            call()
    assert client.sequence(a.seq_id).num_tokens == 3
    client.free(a.seq_id)
    _assert_healthy(client)


def test_sessions_own_their_sequences(server):
    with Client(server.endpoint) as a, Client(server.endpoint) as b:
        prompt = list(range(64))
        [sa] = a.allocate([prompt])
        a.commit(sa.seq_id)
        [sb] = b.allocate([prompt + [99]])
        assert sb.num_cached_tokens == 64 and sb.block_table[:4] == sa.block_table  # prefix shared
        for call in (b.free, b.append, b.commit, b.swap_out, lambda i: b.truncate(i, [1]), b.fork,
                     lambda i: b.release_before(i, [48])):
            with pytest.raises(NotOwner):
                call([sa.seq_id])
        with pytest.raises(NotOwner):  # all or nothing: b's own id in the batch does not help
            b.free([sb.seq_id, sa.seq_id])
        with pytest.raises(NotOwner):
            b.release_before([sb.seq_id, sa.seq_id], [48, 48])
        assert 0 not in a.sequence(sa.seq_id).block_table and 0 not in b.sequence(sb.seq_id).block_table
        assert b.sequence(sb.seq_id).num_tokens == 65
        [[child]] = a.fork([sa.seq_id])
        assert a.sequence(child).owner == a.session_name
        with pytest.raises(NotOwner):
            b.free([child])
        a.check_integrity()
    # both said bye: everything freed, prefix blocks kept only as evictable cache
    with Client(server.endpoint) as c:
        st = c.stats()
        assert st.num_sequences == 0 and st.used_blocks == 0
        c.check_integrity()


def test_bye_frees_and_ends_the_session(server):
    c = Client(server.endpoint)
    c.allocate([[1, 2, 3]] * 4)
    session = c.session
    c.close()
    with Client(server.endpoint) as d:
        assert d.stats().num_sequences == 0
        own, d.session = d.session, session
        with pytest.raises(SessionLost):
            d.heartbeat()
        d.session = own
        d.check_integrity()


def test_missed_heartbeats_free_the_session():
    with running_server(SMALL, heartbeat_timeout=3.0) as server:
        quiet = Client(server.endpoint, heartbeat=False)
        quiet.allocate([[1] * 40])
        alive = Client(server.endpoint)  # silent too, but for its heartbeat thread
        [a] = alive.allocate([[2] * 40])
        with Client(server.endpoint) as obs:
            assert wait_until(lambda: obs.stats().num_sequences == 1, timeout=60)
            assert [s.seq_id for s in obs.sequences()] == [a.seq_id]
            obs.check_integrity()
        alive.stats()  # still open: heartbeats alone kept it
        with pytest.raises(SessionLost):
            quiet.stats()
        alive.close()


def test_malformed_frames_get_typed_replies(server, client):
    raw = Raw(server.endpoint)
    try:
        cases = [
            (b"\xc1 this is not msgpack", None, "protocol_error"),
            (b"", None, "protocol_error"),
            (msgpack.packb("a string"), None, "protocol_error"),
            (msgpack.packb([VERSION, 1, None]), None, "protocol_error"),
            (msgpack.packb({"op": "stats"}), None, "protocol_error"),
            (_req(2, "launch_missiles", {}), 2, "unknown_op"),
            (_req(3, "stats", {}, version=99), 3, "version_mismatch"),
            (_req(4, "free", {"seq_ids": [1]}), 4, "session_lost"),  # no session
            (_req(5, "free", {"seq_ids": [1]}, session="forged"), 5, "session_lost"),
            (_req(6, "free", {}, session=client.session), 6, "invalid_argument"),
            (_req(7, "append", {"seq_ids": [[1]]}, session=client.session), 7, "invalid_argument"),
            (_req(8, "allocate", {"prompts": [[1, 2]], "salt": 3.5}, session=client.session),
             8, "invalid_argument"),
            (_req(9, "free", {"seq_ids": 1.5}, session=client.session), 9, "invalid_argument"),
            (_req(12, "free", {"seq_ids": 2**64 - 1}, session=client.session), 12, "unknown_sequence"),
            (msgpack.packb([VERSION, 10, None, "stats", {}, "extra"]), None, "protocol_error"),
        ]
        for data, rid, code in cases:
            reply = raw.send(data)
            assert reply[0] == rid and reply[1] == protocol.ERR, (data, reply)
            assert reply[2]["code"] == code, (data, reply)
            assert reply[2]["message"]
        # a valid request on the same bare socket still works
        reply = raw.send(_req(11, "stats", {}))
        assert reply[:2] == [11, protocol.OK] and reply[2]["used_blocks"] == 0
    finally:
        raw.close()
    _assert_healthy(client)


def test_message_over_the_limit(tmp_path):
    """At the least limit a daemon takes (`env.MIN_MESSAGE`, 64 KiB): a prompt of
    30,000 tokens (~90 KB) is refused by the daemon, and by the client before sending."""
    with running_server(SMALL, max_message_bytes=env.MIN_MESSAGE) as server, Client(server.endpoint) as client:
        assert client.max_message_bytes == env.MIN_MESSAGE
        raw = Raw(server.endpoint)
        try:
            body = _req(21, "allocate", {"prompts": [list(range(30_000))]}, session=client.session)
            assert len(body) > env.MIN_MESSAGE
            reply = raw.send(body)
            assert reply[0] == 21 and reply[2]["code"] == "message_too_large"
        finally:
            raw.close()
        with pytest.raises(MessageTooLarge, match="KVPAGER_MAX_MESSAGE"):
            client.allocate([list(range(30_000))])  # refused before sending
        assert client.stats().num_sequences == 0
        client.check_integrity()


def test_tcp_endpoint():
    with running_server(SMALL, endpoint=free_tcp_endpoint()) as server, Client(server.endpoint) as c:
        assert server.endpoint.startswith("tcp://127.0.0.1:")
        [a] = c.allocate([[1, 2, 3]])
        assert c.append(a.seq_id)[0].tolist() == [19]
        c.check_integrity()


def test_nothing_listening_is_daemon_unavailable(tmp_path):
    with pytest.raises(DaemonUnavailable, match="no kvpager daemon"):
        Client(f"ipc://{tmp_path}/none.sock", timeout=1)
    stale = tmp_path / "stale.sock"
    import socket as pysocket

    s = pysocket.socket(pysocket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file with no listener
    with pytest.raises(DaemonUnavailable):
        Client(f"ipc://{stale}", timeout=1)
    with pytest.raises(DaemonUnavailable):
        Client(free_tcp_endpoint(), timeout=1)


def test_timeout_names_the_setting_and_the_client_recovers(server, client, monkeypatch):
    [a] = client.allocate([[1, 2, 3]])
    real = server.handle

    def slow(body):
        time.sleep(0.5)
        return real(body)

    monkeypatch.setattr(server, "handle", slow)
    client.timeout = 0.1
    with pytest.raises(RequestTimeout, match="KVPAGER_TIMEOUT") as e:
        client.stats()
    assert isinstance(e.value, TimeoutError)
    monkeypatch.setattr(server, "handle", real)
    client.timeout = 10
    time.sleep(0.6)  # the late reply goes to the closed socket, not to the next call
    assert client.sequence(a.seq_id).num_tokens == 3
    client.free(a.seq_id)
    _assert_healthy(client)


def test_daemon_gone_mid_session(tmp_path):
    with running_server(SMALL) as server:
        c = Client(server.endpoint, timeout=1, heartbeat=False)
    with pytest.raises(DaemonUnavailable):
        c.stats()


def test_restarted_daemon_is_detected():
    endpoint, _ = ipc_endpoint()
    with running_server(SMALL, endpoint=endpoint):
        c = Client(endpoint, heartbeat=False)
        old_epoch = c.epoch
    with running_server(SMALL, endpoint=endpoint) as second:
        assert second.epoch != old_epoch
        with pytest.raises(SessionLost, match="restarted"):
            c.stats()


def test_second_daemon_on_a_live_endpoint_is_refused(server):
    from kvpager.server import Server

    refused = Server.create(SMALL, server.endpoint)
    name = refused.memory.device.name
    with pytest.raises(InvalidArgument, match="already listens"):
        refused.bind()
    assert not os.path.exists(f"/dev/shm/{name}")  # released on the failed bind


def test_runtime_dir_is_private(tmp_path):
    d = tmp_path / "rt"
    assert ensure_runtime_dir(str(d)) == str(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    os.chmod(d, 0o755)
    with pytest.raises(InvalidArgument, match="mode 755"):
        ensure_runtime_dir(str(d))
    link = tmp_path / "link"
    os.chmod(d, 0o700)
    link.symlink_to(d)
    with pytest.raises(InvalidArgument, match="not a directory"):
        ensure_runtime_dir(str(link))


def test_stop_unlinks_socket_and_shared_memory():
    endpoint, d = ipc_endpoint()
    with running_server(SMALL, endpoint=endpoint) as server:
        names = [server.memory.device.name, server.memory.host.name]
        c = Client(endpoint)
        c._stage(1000)
        names.append(c._staging.name)
        assert all(os.path.exists(f"/dev/shm/{n}") for n in names)
    assert not os.path.exists(endpoint[len("ipc://"):])
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)
