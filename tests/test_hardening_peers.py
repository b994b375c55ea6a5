"""Hostile and careless peers of the daemon's side doors: HTTP clients of
the metrics endpoint (stalled connections, garbage) and subscribers of the
KV-event replay socket (far-back replays read late, floods, garbage). Each
test is an attack that once worked against a CPU daemon; bounded waits, free
endpoints, every daemon stopped."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
import zmq
from daemon_helpers import SMALL, ipc_endpoint, running_server, wait_until

from kvpager import metrics
from kvpager.client import Client
from kvpager.events import EventSink
from kvpager.events_pub import END_SEQ, EventsConfig


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """True if the other end closes ``s`` within ``timeout`` seconds."""
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_stalled_metrics_connections_are_capped_and_closed(monkeypatch):
    """Connections that never send a byte each held a thread and a descriptor
    of the daemon for ever (prometheus_client's server has no timeout and no
    cap): 200 of them made 200 threads. Now at most HTTP_CONNECTIONS are
    served at once (the rest closed at once), each closed after HTTP_TIMEOUT;
    scrapes work afterwards and no session expired meanwhile."""
    monkeypatch.setattr(metrics, "HTTP_TIMEOUT", 1.0)
    with running_server(SMALL, metrics_port=0, heartbeat_timeout=1.0) as server, \
            Client(server.endpoint) as c:
        c.allocate([[1, 2, 3]])
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10) for _ in range(200)]
        try:
            time.sleep(0.5)  # every connection accepted by now
            assert threading.active_count() <= before + metrics.HTTP_CONNECTIONS
            for s in idle:
                assert closed_by_peer(s, 10), "a stalled metrics connection was never closed"
        finally:
            for s in idle:
                s.close()
        assert wait_until(lambda: threading.active_count() <= before, 10)
        text = metrics_text(server.metrics_port)
        assert "kvpager_sequences 1.0" in text and "kvpager_session_expiries_total 0.0" in text
        assert c.stats().num_sequences == 1  # the session lived throughout


def test_trickling_metrics_connections_are_cut_at_their_deadline(monkeypatch):
    """A client that sends a byte of its request line within each
    HTTP_TIMEOUT kept its slot for as long as it trickled: HTTP_CONNECTIONS
    of them refused every scrape for ever. Now each connection is cut at
    HTTP_DEADLINE, whatever it sends, and a scrape gets through after."""
    monkeypatch.setattr(metrics, "HTTP_TIMEOUT", 2.0)
    monkeypatch.setattr(metrics, "HTTP_DEADLINE", 2.0)
    with running_server(SMALL, metrics_port=0) as server:
        conns = [socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10)
                 for _ in range(metrics.HTTP_CONNECTIONS)]
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.3):
                for s in conns:
                    with contextlib.suppress(OSError):  # (cut: what the test waits for)
                        s.send(b"G")

        feeder = threading.Thread(target=trickle, daemon=True)
        feeder.start()
        try:
            time.sleep(0.5)
            with socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10) as extra:
                assert closed_by_peer(extra, 5), "a connection over the cap was served"
            started = time.monotonic()
            for s in conns:
                assert closed_by_peer(s, 10), "a trickling metrics connection was never cut"
            assert time.monotonic() - started < 6
        finally:
            stop.set()
            feeder.join(5)
            for s in conns:
                s.close()
        assert "kvpager_blocks_total" in metrics_text(server.metrics_port)


@pytest.mark.parametrize("request_bytes, status", [
    (b"\x00\xff\xfe garbage\r\n\r\n", b"400"),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", b"414"),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
    (b"GET /metrics HTTP/1.1\r\n" + b"X: a\r\n" * 200 + b"\r\n", b"431"),
    (b"HEAD /metrics HTTP/1.1\r\n\r\n", b"405"),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\nxx", b"405"),
    (b"GET /nothing-here?name[]=x HTTP/1.1\r\n\r\n", b"200"),
])
def test_malformed_http_is_answered_and_the_daemon_lives(request_bytes, status):
    with running_server(SMALL, metrics_port=0) as server, Client(server.endpoint) as c:
        with socket.create_connection(("127.0.0.1", server.metrics_port), timeout=10) as s:
            s.sendall(request_bytes)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert status in answer[:200]
        assert "kvpager_blocks_total" in metrics_text(server.metrics_port)
        c.allocate([[1, 2, 3]])
        assert c.stats().num_sequences == 1


def one_batch(i: int) -> list:
    sink = EventSink()
    sink.stored([i.to_bytes(16, "big")], None, np.arange(SMALL.block_size))
    return sink.take()


@pytest.fixture
def events_server():
    endpoint, d = ipc_endpoint()
    with running_server(endpoint=endpoint, events=EventsConfig(f"ipc://{d}/ev.sock")) as server:
        yield server


def publish(server, n: int) -> None:
    """``n`` batches through the publisher (the loop's one call), waited for."""
    ev = server.events
    want = ev.published + n
    for i in range(n):
        ev.publish(time.time(), one_batch(want + i))
    assert wait_until(lambda: ev.published >= want, 30)


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def read_answer(s: zmq.Socket, timeout_ms: int = 5000) -> tuple[list[int], bool]:
    """The sequence numbers of one replay answer, and whether its end marker came."""
    seqs = []
    while s.poll(timeout_ms):
        frames = s.recv_multipart()
        if frames[-2] == END_SEQ:
            return seqs, True
        seqs.append(int.from_bytes(frames[-2], "big"))
    return seqs, False


def test_a_replay_from_far_back_read_late_arrives_whole_with_its_end(events_server):
    """A replay of 5,001 kept batches to a subscriber that reads only after
    asking: the daemon sent it all at once, the socket dropped what passed its
    high-water mark (1,000 messages a side) and the end marker with it, so the
    subscriber got 2,000 batches and waited for the end for ever."""
    publish(events_server, 5000)
    ctx = zmq.Context()
    try:
        s = dealer(ctx, events_server.events.replay_endpoint)
        s.send_multipart([b"", (0).to_bytes(8, "big")])
        time.sleep(2.0)  # not reading yet
        seqs, ended = read_answer(s)
        assert ended, f"no end marker after {len(seqs)} batches"
        assert seqs == list(range(5001))
    finally:
        ctx.destroy(linger=0)


def test_a_flood_of_replay_requests_does_not_hold_the_live_stream(events_server):
    """A peer sending replay requests without pause kept the publisher's thread
    answering them: no live batch went out (queued without bound) while the
    flood lasted. Now answers share the thread with the live stream."""
    publish(events_server, 3000)
    ev = events_server.events
    ctx = zmq.Context()
    stop = threading.Event()
    flooder = dealer(ctx, ev.replay_endpoint)
    flooder.setsockopt(zmq.SNDHWM, 0)

    def flood():
        while not stop.is_set():
            try:
                flooder.send_multipart([b"", (0).to_bytes(8, "big")], zmq.NOBLOCK)
            except zmq.Again:
                time.sleep(0.001)

    t = threading.Thread(target=flood)
    t.start()
    try:
        time.sleep(1.0)  # the flood is under way
        start = ev.published
        for i in range(200):
            ev.publish(time.time(), one_batch(10**6 + i))
        assert wait_until(lambda: ev.published >= start + 200, 20), \
            f"{ev.published - start} of 200 live batches sent during the flood"
    finally:
        stop.set()
        t.join(10)
        ctx.destroy(linger=0)


def test_malformed_replay_requests_are_ignored_or_answered_empty(events_server):
    """Wrong frame counts and garbage get nothing; a start of another length,
    past the end, or negative (read unsigned: past the end) gets just the end
    marker; the publisher answers a good request afterwards and goes on."""
    publish(events_server, 10)
    ev = events_server.events
    ctx = zmq.Context()
    try:
        s = dealer(ctx, ev.replay_endpoint)
        for frames in ([b"x", b"y", b"z"], [b"", b"", (0).to_bytes(8, "big")], [b"a", (0).to_bytes(8, "big")]):
            s.send_multipart(frames)
        assert not s.poll(300)
        for start in (b"", b"\x01", b"x" * 9, (2**64 - 1).to_bytes(8, "big"), (-5).to_bytes(8, "big", signed=True),
                      (10**6).to_bytes(8, "big")):
            s.send_multipart([b"", start])
            assert read_answer(s) == ([], True)
        s.send_multipart([b"", (8).to_bytes(8, "big")])
        assert read_answer(s) == ([8, 9, 10], True)
        big = dealer(ctx, ev.replay_endpoint)
        big.send_multipart([b"", b"x" * 1000])  # past MAXMSGSIZE: the connection is dropped
        publish(events_server, 1)
        s.send_multipart([b"", (11).to_bytes(8, "big")])
        assert read_answer(s) == ([11], True)
    finally:
        ctx.destroy(linger=0)


def test_a_subscriber_that_reads_nothing_holds_a_bounded_queue():
    """PUB queued up to 100,000 batches for each subscriber (vLLM's bound), in the
    daemon's memory: one that stopped reading (a paused ``kvpager events | less``)
    grew it batch after batch. A thousand wait for it now; the rest are dropped
    (the replay socket has them)."""
    from kvpager.events_pub import EventsConfig

    endpoint, d = ipc_endpoint()
    config = EventsConfig(f"ipc://{d}/ev.sock")
    with running_server(SMALL, endpoint=endpoint, events=config) as server, Client(endpoint) as c:
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 1)
        sub.setsockopt(zmq.RCVBUF, 4096)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(server.events.endpoint)
        try:
            time.sleep(0.3)  # (subscribed before the batches)
            prompt = list(range(3, 3 + 160))  # ten blocks' events a batch: a few KB each
            for _ in range(1500):
                [a] = c.allocate([prompt], salt=str(time.monotonic_ns()))
                c.commit(a.seq_id)  # (published: a batch of BlockStored, evictions later)
                c.free(a.seq_id)
            time.sleep(0.5)  # (the publisher's thread sent what it had)
            got = 0
            while sub.poll(300):
                sub.recv_multipart()
                got += 1
            assert 0 < got <= 1400, got  # SEND_HWM's 1,000, and what the sockets' buffers held
        finally:
            sub.close(0)


def test_a_replay_peer_that_reads_nothing_holds_a_bounded_queue(events_server):
    """A peer that asked for the whole kept history and read none of it: the
    replay socket queued it ZeroMQ's 1,000 messages, up to 64 MiB of the
    daemon's memory a peer. Now its answer stops at REPLAY_HWM messages
    (and what the sockets' buffers hold) until it reads, then arrives whole."""
    from kvpager import events_pub

    ev = events_server.events
    keys = [i.to_bytes(16, "big") for i in range(200)]
    for i in range(600):  # ~12 KB a batch (one batch a publish: under kvpager.events.BATCH_BYTES)
        sink = EventSink()
        sink.stored(keys, None, np.arange(SMALL.block_size * len(keys)) + i)
        ev.publish(time.time(), sink.take())
    assert wait_until(lambda: ev.published >= 601, 20)
    ctx = zmq.Context()
    try:
        s = dealer(ctx, ev.replay_endpoint)
        s.setsockopt(zmq.RCVHWM, 1)
        s.setsockopt(zmq.RCVBUF, 4096)
        s.send_multipart([b"", (0).to_bytes(8, "big")])
        time.sleep(1.5)  # its answer goes as far as the queues let it
        assert len(ev._replays) == 1, "the whole answer was queued for a peer that read none of it"
        [(cursor, stop, _)] = ev._replays.values()
        assert stop == 601 and cursor <= events_pub.REPLAY_HWM + 32, cursor
        seqs, ended = read_answer(s)
        assert ended and seqs == list(range(601))
    finally:
        ctx.destroy(linger=0)
