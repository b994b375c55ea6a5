"""Careless callers of a `Client`'s wire: a timeout past ZeroMQ's range (from the
constructor, the CLI's option or the environment, an events tail's idle wait) is a
long timeout, not a traceback; refused hellos leave no socket open; a request to a
daemon gone says so at once; one client called from two threads keeps its mirror in
step and sends its requests in the order of their ids. Each test once failed;
bounded waits, free endpoints."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from daemon_helpers import SMALL, running_server, server_fixture, subprocess_env

from kvpager.client import Client

server = server_fixture(SMALL, heartbeat_timeout=30)
BS = SMALL.block_size


@pytest.mark.parametrize("timeout", [3e6, 1e12, 1e308])
def test_a_timeout_past_zeromqs_range_is_a_long_timeout(server, timeout):
    """RCVTIMEO is a C int of milliseconds: a timeout past 24.8 days raised
    OverflowError from inside the socket (a traceback from `kvpager stats --timeout 1e308`)."""
    with Client(server.endpoint, timeout=timeout) as c:
        [a] = c.allocate([[1, 2, 3]])
        assert c.stats().num_sequences == 1 and c.sequence(a.seq_id).num_tokens == 3


def test_the_cli_takes_a_huge_timeout_from_its_option_and_the_environment(server):
    env = dict(subprocess_env(), KVPAGER_TIMEOUT="1e300")
    for extra in (["--timeout", "1e308"], []):
        out = subprocess.run([sys.executable, "-m", "kvpager", "stats", "--json", "--endpoint", server.endpoint,
                              *extra], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr and '"num_sequences": 0' in out.stdout


def test_an_events_tail_takes_an_idle_wait_past_zeromqs_range(tmp_path):
    """`kvpager events --idle 1e300` (and `Subscription.batches(idle=...)`) passed
    the wait to ZeroMQ's poll as milliseconds: OverflowError before any live batch."""
    import threading

    from kvpager.events_cli import Subscription
    from kvpager.events_pub import EventsConfig

    endpoint = f"ipc://{tmp_path}/kv.sock"
    with running_server(SMALL, endpoint=endpoint, events=EventsConfig(f"ipc://{tmp_path}/ev.sock")) as srv, \
            Client(endpoint, timeout=10) as c, \
            Subscription(srv.events.endpoint, srv.events.replay_endpoint) as sub:
        got: list = []

        def tail():
            try:
                got.append(next(sub.batches(idle=1e300)))  # the live stream: a poll with that wait
            except Exception as e:
                got.append(e)

        t = threading.Thread(target=tail, daemon=True)
        t.start()
        time.sleep(0.5)  # subscribed, polling
        [a] = c.allocate([list(range(BS))])
        c.commit(a.seq_id)  # one stored block: a live batch
        t.join(20)
        assert len(got) == 1 and not isinstance(got[0], Exception), got
        assert got[0].events[0]["type"] == "BlockStored"


def test_refused_hellos_leave_no_socket_open():
    """A client whose hello the daemon refuses (a wrong token, here) has no
    session; its socket used to stay open for as long as the error was kept
    (a retry loop that logs its errors held one a try)."""
    import os

    from kvpager.errors import Unauthorized

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with running_server(SMALL, token="t" * 16) as server:
        kept = []
        for _ in range(3):  # the context's first sockets, made once
            try:
                Client(server.endpoint, token="wrong" * 4, heartbeat=False)
            except Unauthorized as e:
                kept.append(e)
        before = open_fds()
        for _ in range(40):
            try:
                Client(server.endpoint, token="wrong" * 4, heartbeat=False)
            except Unauthorized as e:
                kept.append(e)
        assert open_fds() - before < 5
        with Client(server.endpoint, token="t" * 16, heartbeat=False) as c:  # the daemon serves on
            assert c.stats().num_sequences == 0


def test_a_request_to_a_daemon_gone_says_so_at_once():
    """A request found no reply for the whole timeout (10 s by default) before it
    said the daemon was gone, even with its socket file removed; it now asks after
    a quarter second and says so then. A live daemon that is slow to answer still
    gets the whole timeout."""
    import time as clock

    from kvpager.errors import DaemonUnavailable

    with running_server(SMALL) as server:
        c = Client(server.endpoint, timeout=10, heartbeat=False)
        real = server._handlers["stats"]

        def slow(s, a):
            clock.sleep(0.8)  # past the first look: the daemon is there, the reply comes
            return real(s, a)

        server._handlers["stats"] = slow
        assert c.stats().num_sequences == 0
        server._handlers["stats"] = real
    start = clock.monotonic()
    with pytest.raises(DaemonUnavailable, match="gone"):
        c.stats()
    assert clock.monotonic() - start < 2.5
    c.close()


def test_one_client_called_from_two_threads_keeps_its_mirror_in_step():
    """Two threads appending to the same sequences through one Client: each
    call's mirror update ran outside its lock, so the mirror went out of step
    with the daemon (other lengths, other blocks), every call answering ok.
    Now each call runs whole, its mirror update with it."""
    import threading

    from kvpager.spec import PoolSpec

    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=2000, block_size=16, dtype="float32")
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (threads switch often: the interleaving shows at once)
    try:
        with running_server(spec) as server, Client(server.endpoint, timeout=30) as c, \
                Client(server.endpoint, timeout=30) as other:
            seqs = [a.seq_id for a in c.allocate([[1] * 15, [2] * 15])]
            errors = []

            def worker(n: int) -> None:
                try:
                    for _ in range(200):
                        c.append(seqs, n)
                except Exception as e:  # noqa: BLE001 (any failure fails the test below)
                    errors.append(e)

            threads = [threading.Thread(target=worker, args=(n,)) for n in (1, 3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors
            mine, mine_lens = c.tables(seqs)  # the mirror's
            theirs, theirs_lens = other.tables(seqs)  # the daemon's (another session asks it)
            assert list(mine_lens) == list(theirs_lens) == [15 + 800] * 2
            assert np.array_equal(mine, theirs)
            c.check_integrity()
    finally:
        sys.setswitchinterval(switch)


def test_threads_sharing_a_client_send_its_requests_in_the_order_of_their_ids(monkeypatch):
    """The daemon refuses a request older than every reply it keeps for the session
    (a late copy of a retried one: never run twice), so a client sends its requests
    in the order of their ids, whichever threads share it: each id is taken under the
    client's lock, after any settling's requests (with packing slowed down, so that
    threads waiting for the lock would show any other order)."""
    import threading

    from kvpager.spec import PoolSpec

    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=4000, block_size=16, dtype="float32")
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (threads switch often: out of order at once before)
    try:
        with running_server(spec) as server, Client(server.endpoint, timeout=30) as c:
            sent = []
            request = c._chan.request

            def recorded(body, rid, op, timeout):
                sent.append(rid)
                return request(body, rid, op, timeout)

            c._chan.request = recorded
            from kvpager import client_wire

            pack = client_wire.pack

            def slow_pack(value):  # (a request packed slowly: other threads run meanwhile)
                time.sleep(0.001)
                return pack(value)

            monkeypatch.setattr(client_wire, "pack", slow_pack)
            errors = []

            def worker() -> None:
                try:
                    for _ in range(20):
                        [a] = c.allocate([[1, 2, 3]])
                        c.free(a.seq_id)
                except Exception as e:  # noqa: BLE001 (any failure fails the test below)
                    errors.append(e)

            threads = [threading.Thread(target=worker) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors[:3]
            assert sent == sorted(sent) and len(sent) == 6 * 20 * 2
            assert c.stats().num_sequences == 0
            c.check_integrity()
    finally:
        sys.setswitchinterval(switch)
