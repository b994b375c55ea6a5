"""The daemon's KV event stream: ZeroMQ PUB with vLLM's framing, and a ROUTER
socket that replays missed batches.

The daemon's loop hands each request's events to `EventPublisher.publish`
(a queue put); a thread of its own numbers, encodes and sends them, keeps
the last batches for replay and answers replay requests, so neither
encoding nor a subscriber costs the loop anything. PUB never blocks: a
subscriber that does not keep up loses batches at its high-water mark
(and can ask for them again by sequence number).

Wire format (docs/protocol.md, "KV events"), as vLLM's `ZmqEventPublisher`:
- PUB, one message per batch: ``[topic, seq (8 bytes, big-endian), payload]``,
  ``payload`` the msgpack ``EventBatch`` (`kvpager.events.encode_batches`: a
  request's events, in batches of at most 16 KiB), ``seq`` counting
  from 0 per daemon start;
- replay (ROUTER): a request is one frame, the first sequence number wanted
  (8 bytes, big-endian; from a REQ socket, or a DEALER sending an empty
  delimiter frame first); the answer is one message per kept batch from
  there on, ``[topic, seq, payload]`` (``[seq, payload]`` in the "array"
  format, as earlier vLLM), then the end marker ``[b"", seq -1, b""]``
  (``[seq -1, b""]``). How answers go out, never waiting for a peer, and the
  budgets that bound their work in time: `kvpager.events_replay`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from kvpager.endpoints import (
    bind_lock,
    check_endpoint,
    endpoint_key,
    ipc_path,
    is_local,
    open_socket,
    prepare_ipc_bind,
    socket_file,
    text,
    unlink_socket_file,
)
from kvpager.errors import InvalidArgument
from kvpager.events import FORMATS, EventSink, encode_batches
from kvpager.events_replay import (  # noqa: F401 (re-exported: their home before kvpager.events_replay)
    END_SEQ,
    REPLAY_BURST_S,
    REPLAY_HWM,
    REPLAY_MIN_CHARGE,
    REPLAY_PAUSE_S,
    REPLAY_PEERS,
    REPLAY_RATE,
    REPLAY_REQUESTS,
    REPLAY_STALL,
    REPLAY_TURN,
    REPLAY_ZERO_COPY,
    WAKE_S,
    ReplayAnswers,
    TokenBucket,
)
from kvpager.server_watch import ConnectionWatch, backlog, open_files_limit, watched

log = logging.getLogger("kvpager.events")

#: Batches kept for replay, and at most this many bytes of them.
REPLAY_BATCHES = 10_000
REPLAY_BYTES = 64 << 20
#: Batches PUB queues per subscriber before it drops (ZeroMQ's default), each at most
#: `kvpager.events.BATCH_BYTES`: 16 MiB for one that reads nothing (a paused `kvpager events
#: | less`, a hung consumer). vLLM's 100,000, or batches of any size (one a request: 400
#: commits of 128k tokens grew the daemon 380 MB), pinned far more. One that falls behind by
#: more loses batches, which the replay socket has (the kept 10,000).
SEND_HWM = 1000
#: Bytes of a subscription the PUB socket takes besides the topic's (a longer one drops its
#: sender's connection): the subscribe command's name and the connection's handshake, which
#: the same limit bounds. ZeroMQ keeps a subscription as a trie node per byte, ~45 bytes of
#: the daemon's memory each, built on the publisher's thread: one subscription of 64 MiB from
#: a hostile subscriber made it grow by gigabytes, its stream stopped while it did. A prefix
#: longer than the topic never matches a batch.
SUBSCRIPTION_BYTES = 64
#: Distinct subscriptions the PUB socket may hold, all subscribers together: past it every
#: subscriber is dropped (the socket bound again; they connect again, and replay what they
#: missed). ZeroMQ keeps each as a trie branch until its subscriber leaves and offers no
#: way to drop one: a flood of 200,000 distinct ones from one subscriber grew the daemon by
#: 262 MiB. A subscriber takes one or two (the topic, or everything).
SUBSCRIPTIONS_MOST = 256
#: Subscription messages a subscriber's connection queues for the publisher's thread, which
#: reads them as it sends (each one a trie branch before it is counted): ZeroMQ's 1,000 each
#: let a few flooding connections add ~100 MiB between two of the thread's counts.
SUBSCRIPTION_HWM = 16


def replay_endpoint_for(endpoint: str) -> str:
    """The replay endpoint beside an events endpoint: the next TCP port
    (vLLM's 5557 / 5558 convention), else the same path with ``.replay``."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if port.isdigit() and 0 < int(port) < 65535:
            return f"tcp://{host}:{int(port) + 1}"
        raise InvalidArgument(f"events endpoint {endpoint!r}: give the replay endpoint too (kvpager serve "
                              "--events-replay-endpoint, kvpager events --replay-endpoint): no replay port "
                              "follows from this one")
    return endpoint + ".replay"


@dataclasses.dataclass(frozen=True)
class EventsConfig:
    """Where and how the daemon publishes KV events."""

    endpoint: str
    replay_endpoint: str | None = None  # default: `replay_endpoint_for(endpoint)`
    topic: str = ""
    format: str = "map"
    replay_rate: int = REPLAY_RATE  # bytes of replay answers a second, all peers together

    def __post_init__(self) -> None:
        check_endpoint(self.endpoint, bind=True)
        replay = self.replay_endpoint or replay_endpoint_for(self.endpoint)
        check_endpoint(replay, bind=True)
        if endpoint_key(replay) == endpoint_key(self.endpoint):
            raise InvalidArgument(f"the events replay endpoint must differ from the events endpoint {replay}")
        object.__setattr__(self, "replay_endpoint", replay)
        if self.format not in FORMATS:
            raise InvalidArgument(f"events format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not isinstance(self.topic, str):
            raise InvalidArgument(f"events topic must be a string, got {type(self.topic).__name__}")
        text(self.topic, "events topic")
        if type(self.replay_rate) is not int or self.replay_rate <= 0:
            raise InvalidArgument(f"events replay rate must be a positive number of bytes a second, "
                                  f"got {self.replay_rate!r}")


class EventPublisher(ReplayAnswers):
    """PUB + replay ROUTER for one daemon; ``publish`` is the only call the
    loop makes. `bind` opens both sockets (released again if either fails);
    `close` publishes ``AllBlocksCleared`` and stops the thread. Its thread
    answers replay requests between live batches (`ReplayAnswers`,
    `kvpager.events_replay`)."""

    def __init__(self, config: EventsConfig, block_size: int, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.block_size = block_size
        self.endpoint = config.endpoint
        self.replay_endpoint: str = config.replay_endpoint  # type: ignore[assignment]
        self._topic = config.topic.encode()
        self._queue: queue.SimpleQueue[tuple[float, list[Any]] | None] = queue.SimpleQueue()
        self._ctx: zmq.Context | None = None
        self._pub: zmq.Socket | None = None
        self._replay: zmq.Socket | None = None
        self._files: dict[str, tuple[int, int] | None] = {}  # the ipc socket files bound, to remove at close
        # their connections kept within the open files (`_watch`), by the socket each watches
        self._watches: dict[zmq.Socket, ConnectionWatch] = {}
        self._thread: threading.Thread | None = None
        self._kept: collections.deque[tuple[int, bytes]] = collections.deque()
        self._kept_bytes = 0
        # replay answers under way: envelope -> (next seq, end seq, last progress)
        self._replays: dict[tuple[bytes, ...], tuple[int, int, float]] = {}
        self.published = 0  # batches sent (the next sequence number)
        self._clock = clock  # replay budgets and stalls (a test's own clock drives them)
        self._subscriptions: set[bytes] = set()  # the distinct ones the PUB socket holds
        self._pub_options: dict[int, int] = {}
        self._cap: int | None = None
        self.subscribers_dropped = 0  # times every subscriber was dropped (`SUBSCRIPTIONS_MOST`)
        self._rebind_at = 0.0  # when to try `_bind_again` next, while the PUB socket is not bound
        now = clock()
        self._budget = TokenBucket(config.replay_rate, config.replay_rate * REPLAY_BURST_S, now)
        self._requests = TokenBucket(REPLAY_REQUESTS, REPLAY_PEERS, now)

    def bind(self, cap: int | None = None) -> None:
        """Bind PUB and replay sockets and start the thread; InvalidArgument
        naming the endpoint if either cannot be bound. ``cap``: the most
        connections each keeps (`watch`; None: not counted)."""
        self._ctx = zmq.Context()
        try:
            queue_of = backlog(open_files_limit())  # (`kvpager.server_watch`: counted in its reserve)
            # XPUB: PUB's wire, and it says each subscription new to it (`_count_subscriptions`)
            self._pub_options = {zmq.SNDHWM: SEND_HWM, zmq.BACKLOG: queue_of, zmq.RCVHWM: SUBSCRIPTION_HWM,
                                 zmq.MAXMSGSIZE: SUBSCRIPTION_BYTES + len(self._topic)}
            self._pub = self._bind(zmq.XPUB, self.endpoint, self._pub_options)
            self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
            # A request is 8 bytes: a much bigger one drops its sender's connection. Mandatory:
            # a send to a full or gone peer fails at once (not dropped unseen, the end marker too).
            self._replay = self._bind(zmq.ROUTER, self.replay_endpoint,
                                      {zmq.MAXMSGSIZE: 64, zmq.ROUTER_MANDATORY: 1, zmq.SNDHWM: REPLAY_HWM,
                                       zmq.BACKLOG: queue_of})
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay.copy_threshold = REPLAY_ZERO_COPY  # (pyzmq copies smaller frames even with copy=False)
        except BaseException:
            self._close_sockets()
            raise
        self._cap = cap
        if cap is not None:
            self._watch(cap)
        for ep in (self.endpoint, self.replay_endpoint):
            if not is_local(ep):
                log.warning("KV events at %s are readable from other hosts without authentication: "
                            "they carry prompts' token ids", ep)
        # The cache starts empty: batch 0 says so to anyone replaying from the start.
        sink = EventSink()
        sink.cleared()
        self.publish(time.time(), sink.take())
        self._thread = threading.Thread(target=self._run, name="kvpager-events", daemon=True)
        self._thread.start()
        log.info("KV events on %s (replay %s at most %d bytes/s, topic %r, %s format)", self.endpoint,
                 self.replay_endpoint, self.config.replay_rate, self.config.topic, self.config.format)

    def _watch(self, cap: int, replay: bool = True) -> None:
        """Keep each socket's connections (the PUB socket's alone, not ``replay``) at
        most ``cap`` (`kvpager.server_watch`): set up before the thread uses the
        sockets (a monitor is set up by the socket's thread), closed with them."""
        for sock, ep in ((self._pub, self.endpoint), (self._replay, self.replay_endpoint))[: 2 if replay else 1]:
            if not watched(ep):
                continue
            path = ipc_path(ep)
            self._watches[sock] = ConnectionWatch(sock, ep, cap, None if path is None or path.startswith("@")
                                                  else path, threading.Lock())

    def _bind(self, kind: int, endpoint: str, options: dict[int, int]) -> zmq.Socket:
        with bind_lock(endpoint):  # (two daemons' publishers started together: see bind_lock)
            prepare_ipc_bind(endpoint)
            sock = open_socket(self._ctx, kind, endpoint)
            for option, value in options.items():  # before bind: a listener keeps the options it had then
                sock.setsockopt(option, value)
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as e:
                sock.close()
                which = "replay endpoint" if kind == zmq.ROUTER else "endpoint"  # (the replay's port: events' + 1)
                raise InvalidArgument(f"cannot bind the KV events {which} {endpoint}: {e}") from None
        path = ipc_path(endpoint)
        if path:
            self._files[path] = socket_file(path)  # this publisher's own files alone are removed at close
            os.chmod(path, 0o600)  # token ids of prompts: this user only, like the daemon's socket
        return sock

    def publish(self, ts: float, items: list[Any]) -> None:
        """Queue one batch of recorded events (`EventSink.take`) for sending."""
        self._queue.put((ts, items))

    def close(self, timeout: float = 2.0) -> None:
        """Publish ``AllBlocksCleared`` (the pool is going away), send what is
        queued, stop the thread, close the sockets and unlink ipc files."""
        if self._thread is not None:
            sink = EventSink()
            sink.cleared()
            self.publish(time.time(), sink.take())
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None
            if self._pub is not None:
                self._pub.setsockopt(zmq.LINGER, 200)  # let the last batches leave
        self._close_sockets()

    def _close_sockets(self) -> None:
        for w in self._watches.values():  # (a renamed socket file named back: removed below)
            w.close()
        self._watches.clear()
        for sock, ep in ((self._pub, self.endpoint), (self._replay, self.replay_endpoint)):
            if sock is not None:
                sock.close()
                path = ipc_path(ep)
                unlink_socket_file(path, self._files.pop(path, None) if path else None)
        self._pub = self._replay = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # -- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        get, replay, clock = self._queue.get, self._replay, self._clock
        wait = WAKE_S
        while not replay.closed:  # closed under it only if close() gave up waiting
            try:
                item = get(timeout=wait)
                while True:  # this batch and every one queued behind it
                    if item is None:
                        return
                    try:
                        self._send(*item)
                    except Exception:
                        log.exception("KV events: a batch could not be sent")
                    item = get(block=False)
            except queue.Empty:
                pass
            try:
                self._count_subscriptions()
            except Exception:  # a bug: keep the stream going, say so
                log.exception("KV events: subscriptions could not be counted")
            try:
                wait = self._replay_turn(clock())
            except Exception:  # a bug: keep the stream going, say so
                log.exception("KV events: replay failed")
                wait = WAKE_S

    def _send(self, ts: float, items: list[Any]) -> None:
        """One request's events, as batches of at most `kvpager.events.BATCH_BYTES` numbered on."""
        kept = self._kept
        for payload in encode_batches(ts, items, self.block_size, self.config.format):
            seq = self.published
            self.published += 1
            if self._pub is not None:  # (None: not bound again yet, `_bind_again`)
                with contextlib.suppress(zmq.Again):  # PUB drops rather than blocks; replay still has it
                    self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), zmq.NOBLOCK)
            kept.append((seq, payload))
            self._kept_bytes += len(payload)
            while len(kept) > REPLAY_BATCHES or (self._kept_bytes > REPLAY_BYTES and len(kept) > 1):
                self._kept_bytes -= len(kept.popleft()[1])
        self._count_subscriptions()  # (each send read the subscriptions that came meanwhile)

    def _count_subscriptions(self) -> None:
        """Follow the distinct subscriptions the PUB socket holds (it says each one new to
        it, and each that no subscriber holds any more); past `SUBSCRIPTIONS_MOST`, drop
        every subscriber (`_drop_subscribers`)."""
        pub, subs = self._pub, self._subscriptions
        if pub is None:  # not bound again yet (`_drop_subscribers`): try once a second
            if self._clock() >= self._rebind_at:
                self._bind_again()
            return
        while True:
            try:
                note = pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if note[:1] == b"\x01":
                subs.add(note[1:])
                if len(subs) > SUBSCRIPTIONS_MOST:
                    self._drop_subscribers()
                    return
            elif note[:1] == b"\x00":
                subs.discard(note[1:])

    def _drop_subscribers(self) -> None:
        """Close the PUB socket and bind it again: ZeroMQ frees every subscription with
        it. Subscribers connect again (a SUB socket does so by itself) and ask the
        replay socket for the batches they missed."""
        self.subscribers_dropped += 1
        log.warning("KV events: more than %d distinct subscriptions (a subscriber sending them in a flood?): "
                    "every subscriber dropped, %s bound again (drop %d)", SUBSCRIPTIONS_MOST, self.endpoint,
                    self.subscribers_dropped)
        watch = self._watches.pop(self._pub, None)
        if watch is not None:
            watch.close()
        self._pub.close(linger=0)
        self._pub = None
        path = ipc_path(self.endpoint)
        unlink_socket_file(path, self._files.pop(path, None) if path else None)
        self._subscriptions.clear()
        self._bind_again()

    def _bind_again(self) -> None:
        """Bind the PUB socket again (`_drop_subscribers`); where that fails (the path
        taken meanwhile), batches are kept for replay unsent and it is tried again
        a second later."""
        try:
            self._pub = self._bind(zmq.XPUB, self.endpoint, self._pub_options)
        except InvalidArgument as e:
            self._rebind_at = self._clock() + 1.0
            log.error("KV events: %s; batches kept for replay until it binds", e)
            return
        if self._cap is not None:
            self._watch(self._cap, replay=False)

