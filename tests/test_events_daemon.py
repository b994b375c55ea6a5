"""The daemon's KV event stream through real ZeroMQ sockets: a subscriber
written as a router for vLLM's events would be (SUB, 3-frame messages,
msgspec decoding, REQ replay), a subscriber that never reads, shutdown, a
restarted daemon, replay peers that never read. (Its settings and
`kvpager events`: test_events_settings.py.)"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
import zmq
from daemon_helpers import (
    SMALL,
    free_tcp_endpoint,
    running_server,
    wait_published,
)
from vllm_events import DECODERS, AllBlocksCleared, BlockRemoved, BlockStored, hashes

from kvpager.client import Client
from kvpager.events_pub import END_SEQ, EventsConfig, replay_endpoint_for
from kvpager.server import Server
from kvpager.spec import PoolSpec

BS = SMALL.block_size


WAIT_MS = 5000


class Router:
    """The subscriber side of a KV-aware router built for vLLM: SUB on the
    events endpoint, REQ on the replay one, msgspec decoding."""

    def __init__(self, endpoint: str, replay: str, fmt: str = "map", topic: bytes = b""):
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(endpoint)
        self.replay_endpoint = replay
        self.decoder = DECODERS[fmt]

    def next(self, timeout_ms: int = WAIT_MS):
        assert self.sub.poll(timeout_ms), "no event batch arrived"
        topic, seq, payload = self.sub.recv_multipart()
        return topic, int.from_bytes(seq, "big"), self.decoder.decode(payload)

    def ready(self, client: Client) -> int:
        """Commit throwaway prompts until one reaches the subscriber (a SUB
        socket sees nothing sent before its subscription arrived); returns
        that batch's sequence number."""
        deadline = time.monotonic() + 10
        n = 0
        while time.monotonic() < deadline:
            n += 1
            [a] = client.allocate([[10_000 + n] * BS])
            client.commit([a.seq_id])
            client.free([a.seq_id])
            if self.sub.poll(200):
                seq = self.next()[1]
                while self.sub.poll(100):  # any later warm-up batch too
                    seq = self.next()[1]
                return seq
        raise AssertionError("the subscriber never received a batch")

    def close(self):
        self.ctx.destroy(linger=0)  # every socket made on it, even after a failed assertion


def test_router_sees_stored_after_commit_removed_after_eviction_and_replays(tmp_ipc):
    endpoint, d = tmp_ipc
    config = EventsConfig(f"ipc://{d}/ev.sock")
    with running_server(endpoint=endpoint, events=config) as server, Client(endpoint) as c:
        assert server.events.replay_endpoint == f"ipc://{d}/ev.sock.replay"
        router = Router(server.events.endpoint, server.events.replay_endpoint)
        try:
            last = router.ready(c)
            prompt = list(range(3 * BS + 5))
            [a] = c.allocate([prompt])
            c.commit([a.seq_id])
            topic, seq, batch = router.next()
            assert topic == b"" and seq == last + 1 and batch.ts == pytest.approx(time.time(), abs=60)
            [e] = batch.events
            assert isinstance(e, BlockStored)
            assert e.block_hashes == hashes(prompt, BS) and e.parent_block_hash is None
            assert e.token_ids == prompt[: 3 * BS] and e.block_size == BS and e.medium == "GPU"
            c.free([a.seq_id])  # still cached: no event
            # every usable block: the 3 evictable cached blocks go, the tail first
            [b] = c.allocate([list(range(50_000, 50_000 + (SMALL.num_blocks - 1) * BS))])
            _, seq2, batch = router.next()
            removed = [e for e in batch.events if isinstance(e, BlockRemoved)]
            assert seq2 == seq + 1 and len(removed) == 1
            assert set(hashes(prompt, BS)) <= set(removed[0].block_hashes) and removed[0].medium == "GPU"
            assert removed[0].block_hashes.index(hashes(prompt, BS)[2]) < removed[0].block_hashes.index(
                hashes(prompt, BS)[0])
            # a replay from 0 returns everything kept, batch 0 first: the cache started empty
            req = router.ctx.socket(zmq.REQ)  # as vLLM's example subscriber asks
            req.connect(server.events.replay_endpoint)
            req.send((seq).to_bytes(8, "big"))
            assert req.poll(WAIT_MS)
            frames = req.recv_multipart()
            assert len(frames) == 3 and int.from_bytes(frames[1], "big") == seq  # [topic, seq, payload]
            assert isinstance(DECODERS["map"].decode(frames[2]).events[0], BlockStored)
            req.close(0)
            dealer = router.ctx.socket(zmq.DEALER)  # one request, every batch, then the end marker
            dealer.connect(server.events.replay_endpoint)
            dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            got = []
            while True:
                assert dealer.poll(WAIT_MS), "replay ended without its end marker"
                frames = dealer.recv_multipart()
                if frames[-2:] == [END_SEQ, b""]:
                    assert frames == [b"", b"", END_SEQ, b""]
                    break
                got.append((int.from_bytes(frames[2], "big"), DECODERS["map"].decode(frames[3])))
            dealer.close(0)
            assert [s for s, _ in got] == list(range(seq2 + 1))
            assert [type(e) for e in got[0][1].events] == [AllBlocksCleared]
            assert got[seq][1].events[0].block_hashes == hashes(prompt, BS)
            c.free([b.seq_id])
        finally:
            router.close()


def test_array_format_topic_and_tcp_replay_port():
    endpoint = free_tcp_endpoint()
    host, port = endpoint.rsplit(":", 1)
    events = f"{host}:{int(port) + 10}"
    config = EventsConfig(events, topic="kv-events", format="array")
    assert config.replay_endpoint == f"{host}:{int(port) + 11}"
    with running_server(endpoint=endpoint, events=config) as server, Client(endpoint) as c:
        router = Router(server.events.endpoint, server.events.replay_endpoint, fmt="array", topic=b"kv-events")
        try:
            router.ready(c)
            prompt = list(range(BS))
            [a] = c.allocate([prompt + [1]])
            c.commit([a.seq_id])
            topic, seq, batch = router.next()
            assert topic == b"kv-events" and batch.events[0].block_hashes == hashes(prompt, BS)
            req = router.ctx.socket(zmq.DEALER)
            req.connect(server.events.replay_endpoint)
            req.send(seq.to_bytes(8, "big"))  # a DEALER without the delimiter frame
            assert req.poll(WAIT_MS)
            seq_bytes, payload = req.recv_multipart()  # earlier vLLM: [seq, payload], no topic
            assert int.from_bytes(seq_bytes, "big") == seq and DECODERS["array"].decode(payload).events
            assert req.poll(WAIT_MS) and req.recv_multipart() == [END_SEQ, b""]
            req.send((seq + 100).to_bytes(8, "big"))  # nothing kept from there: just the end
            assert req.poll(WAIT_MS) and req.recv_multipart() == [END_SEQ, b""]
            req.send(b"junk")  # not a sequence number: the end marker, and the daemon goes on
            assert req.poll(WAIT_MS) and req.recv_multipart() == [END_SEQ, b""]
            req.send(b"x" * 100_000)  # far over a request's size: dropped with the connection
            assert not req.poll(500)
            req.close(0)
            again = router.ctx.socket(zmq.DEALER)
            again.connect(server.events.replay_endpoint)
            again.send(seq.to_bytes(8, "big"))
            assert again.poll(WAIT_MS) and int.from_bytes(again.recv_multipart()[0], "big") == seq
            again.close(0)
            c.free([a.seq_id])
            assert c.stats().num_sequences == 0
        finally:
            router.close()


def test_a_subscriber_that_never_reads_does_not_slow_the_daemon(tmp_ipc):
    endpoint, d = tmp_ipc
    with running_server(endpoint=endpoint, events=EventsConfig(f"ipc://{d}/ev.sock")) as server, \
            Client(endpoint) as c:
        ctx = zmq.Context()
        stuck = ctx.socket(zmq.SUB)
        stuck.setsockopt(zmq.RCVHWM, 1)
        stuck.setsockopt(zmq.SUBSCRIBE, b"")
        stuck.connect(server.events.endpoint)
        try:
            t0 = time.monotonic()
            for i in range(300):  # 300 batches, each with 4 blocks of token ids, none read
                [a] = c.allocate([list(range(i * 1000, i * 1000 + 4 * BS))])
                c.commit([a.seq_id])
                c.free([a.seq_id])
            assert time.monotonic() - t0 < 60
            c.check_integrity()
        finally:
            stuck.close(0)
            ctx.term()
        assert wait_published(server, 301)  # batch 0 and one per commit: none dropped on the daemon's side


def test_shutdown_publishes_all_blocks_cleared(tmp_ipc):
    endpoint, d = tmp_ipc
    server = Server.create(SMALL, endpoint, events=EventsConfig(f"ipc://{d}/ev.sock")).start()
    router = Router(server.events.endpoint, server.events.replay_endpoint)
    try:
        with Client(endpoint) as c:
            router.ready(c)
        server.stop()
        while True:  # the session's end may come first; the last batch clears everything
            _, _, batch = router.next()
            if any(isinstance(e, AllBlocksCleared) for e in batch.events):
                break
    finally:
        server.stop()
        router.close()
    assert not os.path.exists(f"{d}/ev.sock") and not os.path.exists(f"{d}/ev.sock.replay")  # unlinked


def test_a_subscription_follows_a_daemon_restarted_on_its_endpoint(tmp_ipc):
    """`kvpager events` (`Subscription`) across a daemon restarted on the same events
    endpoint: before, it took only a received batch 0 as a new publisher, and that
    batch goes out at bind, before the SUB socket reconnects; so every batch of the
    new daemon numbered up to the old one's last was skipped as seen already. Now a
    batch numbered no later than the last that came over the SUB socket is a new
    publisher's: its earlier batches are replayed from 0, then it goes on."""
    from kvpager import PoolSpec
    from kvpager.events_cli import Subscription

    _, d = tmp_ipc
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=64, block_size=8, dtype="float32")
    ev = f"ipc://{d}/ev.sock"
    sub = Subscription(ev, replay_endpoint_for(ev))
    n = 0

    def follow(c: Client, until: Any) -> list[tuple[int, list[str]]]:
        """Commit a new prompt at a time until the batches yielded satisfy ``until``."""
        nonlocal n
        got: list[tuple[int, list[str]]] = []
        deadline = time.monotonic() + 15
        while not until(got):
            assert time.monotonic() < deadline, got
            n += 1
            [a] = c.allocate([[n] * 9])
            c.commit([a.seq_id])
            got += [(b.seq, [e["type"] for e in b.events]) for b in sub.batches(idle=0.2)]
        return got

    try:
        with running_server(spec, endpoint=f"ipc://{d}/kv1.sock", events=EventsConfig(ev)) as first, \
                Client(first.endpoint) as c:
            old = follow(c, lambda got: any(seq >= 6 for seq, _ in got))
        with running_server(spec, endpoint=f"ipc://{d}/kv2.sock", events=EventsConfig(ev)) as second, \
                Client(second.endpoint) as c:
            # (until the new daemon's batches reach the old one's last, which the old code skipped)
            got = follow(c, lambda got: any(seq > max(s for s, _ in old) + 1 for seq, _ in got[1:]))
        seqs = [seq for seq, _ in got]
        assert 0 in seqs, got
        after = got[seqs.index(0):]  # (before it: the first daemon's closing batch)
        assert [seq for seq, _ in after] == list(range(len(after)))  # the new daemon's every batch, in order
        assert after[0][1] == ["AllBlocksCleared"] and all(t == ["BlockStored"] for _, t in after[1:])
    finally:
        sub.close()


def test_a_subscription_follows_a_new_daemon_that_got_past_the_old_ones_numbers(tmp_ipc):
    """As above, where the new daemon publishes past the old one's last batch before
    the SUB socket reconnects (a slow network: a 1.5 s reconnect interval): no batch
    numbered at or below the last came, so the new one's first batches (its
    AllBlocksCleared, its first stores) were never yielded, and the gap was filled
    from the old numbers on. A gap now asks the replay socket for the batch numbered
    as the last one yielded: another there is a new publisher, replayed from 0."""
    from kvpager import PoolSpec
    from kvpager.events_cli import Subscription

    _, d = tmp_ipc
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=64, block_size=8, dtype="float32")
    ev = f"ipc://{d}/ev.sock"

    def commit(c: Client, first: int, count: int) -> None:
        for k in range(first, first + count):
            [a] = c.allocate([[k] * 9])
            c.commit([a.seq_id])

    got: list[tuple[int, list[str]]] = []
    with Subscription(ev, replay_endpoint_for(ev)) as sub:
        sub._sub.setsockopt(zmq.RECONNECT_IVL, 1500)

        def read() -> None:
            for b in sub.batches(idle=15.0):  # (until the new daemon's last batch; the idle wait a bound)
                got.append((b.seq, [e["type"] for e in b.events]))
                if b.seq == 12 and any(seq == 0 for seq, _ in got):
                    return

        reader = threading.Thread(target=read, daemon=True)
        with running_server(spec, endpoint=f"ipc://{d}/kv1.sock", events=EventsConfig(ev)) as first, \
                Client(first.endpoint) as c:
            reader.start()
            time.sleep(0.5)  # (subscribed)
            commit(c, 1000, 3)
            time.sleep(0.5)
        with running_server(spec, endpoint=f"ipc://{d}/kv2.sock", events=EventsConfig(ev)) as second, \
                Client(second.endpoint) as c:
            commit(c, 2000, 10)  # (past the old daemon's numbers while the SUB socket waits to reconnect)
            time.sleep(2.5)
            commit(c, 3000, 2)
            reader.join(20)
        assert not reader.is_alive()
    seqs = [seq for seq, _ in got]
    assert 0 in seqs, got
    after = got[seqs.index(0):]
    assert [seq for seq, _ in after] == list(range(13)), got  # the new daemon's every batch, in order
    assert after[0][1] == ["AllBlocksCleared"] and all(t == ["BlockStored"] for _, t in after[1:])


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the process's resident memory")
def test_replay_peers_that_never_read_hold_no_copies_of_the_history(tmp_ipc):
    """Each replay peer that asked for the history and read none of it held up to
    REPLAY_HWM copies of kept batches in the daemon (pyzmq copies frames under 64 KiB):
    32 such peers took about 100 MB, and more with every wave. Queued answers refer
    to the kept batches now."""
    endpoint, d = tmp_ipc
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=16, num_blocks=1024, block_size=16, dtype="float32")
    config = EventsConfig(f"ipc://{d}/ev.sock", replay_endpoint=free_tcp_endpoint())
    ctx, peers = zmq.Context.instance(), []
    with running_server(spec, endpoint=endpoint, events=config) as server, Client(endpoint) as c:
        for k in range(100):  # 100 kept batches of ~50 KB (a 10,000-token commit each)
            [a] = c.allocate([list(range(10**6 + k * 20000, 10**6 + k * 20000 + 10001))])
            c.commit(a.seq_id)
            c.free(a.seq_id)
        c.stats()
        time.sleep(0.5)
        before = _rss_mb()
        try:
            for _ in range(32):  # each asks for the whole history and never reads
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.RCVHWM, 1)
                s.setsockopt(zmq.RCVBUF, 1024)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(server.events.replay_endpoint)
                s.send_multipart([b"", (0).to_bytes(8, "big")])
                peers.append(s)
            time.sleep(4)  # (64 MB/s of replay budget: every peer's queue full by now)
            grown = _rss_mb() - before
        finally:
            for s in peers:
                s.close(0)
        assert grown < 25, f"{grown:.0f} MB more for 32 replay peers that read nothing"
