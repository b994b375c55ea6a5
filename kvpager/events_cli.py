"""`kvpager events`: tail a daemon's KV event stream (or a vLLM engine's).

Subscribes to the PUB socket, fills gaps in the sequence numbers from the
replay socket, and prints one row per event (``--json``: one JSON object per
batch, the events with vLLM's field names). `Subscription` is the reusable
part: batches in sequence order, each at most once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import click
import msgpack
import zmq

from kvpager import env
from kvpager.channel import wait_ms
from kvpager.endpoints import check_endpoint, open_socket, probe, text
from kvpager.errors import InvalidArgument
from kvpager.events import parse_batch
from kvpager.events_pub import replay_endpoint_for
from kvpager.inspect_cli import Seconds


@dataclass(frozen=True)
class Batch:
    """One ``EventBatch``: its sequence number, timestamp and events (maps with
    the tag under ``type``), and whether it came from the replay socket."""

    seq: int
    ts: float
    events: list[dict[str, Any]]
    replayed: bool = False


def _batch(seq: int, payload: bytes, replayed: bool) -> Batch:
    try:
        ts, events = parse_batch(msgpack.unpackb(payload, raw=False, strict_map_key=False))
    except Exception as e:
        raise InvalidArgument(f"batch {seq} is not an event batch: {e}") from None
    return Batch(seq, ts, events, replayed)


class Subscription:
    """A SUB socket on ``endpoint`` (topic prefix ``topic``) and a DEALER on
    ``replay``: `batches` yields every batch once, in order, asking the replay
    socket for what the PUB socket skipped (and, with ``start``, for
    everything from that sequence number on before the live stream)."""

    def __init__(self, endpoint: str, replay: str | None, topic: str = "", start: int | None = None):
        text(topic, "topic")
        self.endpoint = check_endpoint(endpoint)
        self.replay_endpoint = check_endpoint(replay) if replay else None
        self._ctx = zmq.Context()
        self._sub = open_socket(self._ctx, zmq.SUB, self.endpoint)
        self._topic = topic.encode()
        self._sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        self._sub.connect(self.endpoint)
        self._replay: zmq.Socket | None = None
        if self.replay_endpoint:
            self._replay = self._replay_socket()
        self.last = -1 if start is None else start - 1  # the last sequence number yielded
        self._sub_last = -1  # the last one that came over the SUB socket
        self._last_batch: Batch | None = None  # the last batch yielded (from the SUB socket)
        self._catch_up = start is not None

    def _replay_socket(self) -> zmq.Socket:
        sock = open_socket(self._ctx, zmq.DEALER, self.replay_endpoint)
        sock.connect(self.replay_endpoint)
        return sock

    def close(self) -> None:
        self._sub.close()
        if self._replay is not None:
            self._replay.close()
        self._ctx.term()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def batches(self, idle: float | None = None) -> Iterator[Batch]:
        """Batches as they come; stops after ``idle`` seconds without one yielded (None:
        never). Frames that yield nothing (batches seen already, or before ``start``:
        one remembered from before the daemon restarted, past its numbers now) do not
        count as one: they restarted the wait, so it never ended."""
        if self._catch_up:
            yield from self.replay(self.last + 1)
        deadline = None if idle is None else time.monotonic() + idle
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._sub.poll(wait_ms(left)):
                    return
            elif not self._sub.poll(None):
                return
            frames = self._sub.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                continue  # not an event message
            seq = int.from_bytes(frames[1], "big")
            # One publisher's batches come over this socket in order: one numbered no later than
            # the last that came here is a restarted publisher's (a daemon started again on the
            # endpoint; its batch 0, AllBlocksCleared, went out at its bind, before this socket
            # reconnected). Before, only its batch 0 was taken as that, and so every batch of the
            # new daemon numbered up to the old one's last was skipped as seen already.
            # (Batches at or below `last` that come after a replay are later than the last that
            # came here: seen already, from the replay socket.)
            restarted = self._sub_last >= 0 and seq <= self._sub_last
            self._sub_last = seq
            if not restarted and seq > self.last + 1 and self.last >= 0 and self._replaced():
                # A gap, and the replay socket's batch numbered as the last one yielded is another:
                # a new publisher that got past the old one's numbers before this socket reconnected
                # (its first batches were lost, the gap filled from the old numbers on).
                restarted = True
            if restarted:
                self.last = -1
                yield from self.replay(0, until=seq)  # the new publisher's batches before this one
            if seq <= self.last:
                continue  # seen already, from the replay socket
            if seq > self.last + 1 and self.last >= 0:
                yield from self.replay(self.last + 1, until=seq)
            self.last = seq
            self._last_batch = _batch(seq, frames[2], False)
            yield self._last_batch
            if deadline is not None:  # (a replay's batches came just before this one)
                deadline = time.monotonic() + idle

    def _replaced(self) -> bool:
        """Whether the replay socket's batch numbered as the last one yielded differs from
        it (its time or events): another publisher's. One it no longer keeps is no sign
        (an old batch of the same publisher goes; nothing this socket yielded is kept then)."""
        mine = self._last_batch
        if self._replay is None or mine is None or mine.seq != self.last:
            return False
        with contextlib.closing(self._answer(mine.seq)) as answer:
            theirs = next((_batch(seq, payload, True) for seq, payload in answer if seq == mine.seq), None)
        return theirs is not None and (theirs.ts, theirs.events) != (mine.ts, mine.events)

    def replay(self, start: int, until: int | None = None, timeout: float = 2.0) -> Iterator[Batch]:
        """Kept batches from ``start`` (before ``until``) from the replay socket, past the
        last one yielded, waiting at most ``timeout`` seconds for each (`_answer`)."""
        with contextlib.closing(self._answer(start, timeout)) as answer:  # (closed at once if left part-way)
            for seq, payload in answer:
                if seq > self.last and (until is None or seq < until):
                    self.last = seq
                    yield _batch(seq, payload, True)

    def _answer(self, start: int, timeout: float = 2.0) -> Iterator[tuple[int, bytes]]:
        """The replay socket's answer from ``start``: (seq, payload) of each kept batch.
        An answer left part-way (the wait ran out, or the caller stopped reading) goes
        with its socket: the next replay asks on a new one, where only its own answer
        comes (on the old one it read the rest of this answer as its own and stopped at
        that answer's end)."""
        if self._replay is None:
            return
        ended = False
        try:
            # (bounded: a replay endpoint that is no ZeroMQ ROUTER, whose handshake failed, left
            # the socket without a peer, and the send blocked for ever, --idle and --count unheard)
            self._replay.setsockopt(zmq.SNDTIMEO, wait_ms(timeout))
            try:
                self._replay.send_multipart([b"", start.to_bytes(8, "big")])
            except zmq.Again:
                return
            while self._replay.poll(wait_ms(timeout)):
                frames = self._replay.recv_multipart()[1:]  # the empty delimiter first
                if len(frames) < 2 or not frames[-1]:
                    ended = True
                    return  # the end marker: [(topic,) seq -1, b""]
                if len(frames) == 3 and not frames[0].startswith(self._topic):
                    continue  # another topic's batch (map format names it; array format does not)
                yield int.from_bytes(frames[-2], "big"), frames[-1]
        finally:
            if not ended:
                self._replay.close()  # (linger 0: what is queued for it is dropped)
                self._replay = self._replay_socket()

def _hex(h: Any) -> str:
    if isinstance(h, int):
        return f"{h:016x}"
    if isinstance(h, bytes):
        return h.hex()
    return "-" if h is None else str(h)


def batch_rows(b: Batch) -> list[tuple[object, ...]]:
    """Table rows of a batch: seq, time, event, medium, blocks, hashes, parent, tokens."""
    when = time.strftime("%H:%M:%S", time.localtime(b.ts)) + f".{int(b.ts * 1000) % 1000:03d}"
    rows = []
    for e in b.events:
        hashes = e.get("block_hashes") or []
        shown = " ".join(map(_hex, hashes[:2])) + (" ..." if len(hashes) > 2 else "")
        tokens = e.get("token_ids")
        rows.append((f"{b.seq}{'r' if b.replayed else ''}", when, e["type"], e.get("medium") or "-",
                     len(hashes), shown or "-", _hex(e.get("parent_block_hash")) if "parent_block_hash" in e
                     else "-", len(tokens) if tokens is not None else "-"))
    return rows


_COLUMNS = (("seq", 8), ("time", 12), ("event", 16), ("medium", 6), ("blocks", 6), ("hashes", 37),
            ("parent", 16), ("tokens", 6))


def line(values: tuple[object, ...]) -> str:
    """One row of the tail, in fixed-width columns (rows arrive one at a time)."""
    return "  ".join(str(v).ljust(w) for v, (_, w) in zip(values, _COLUMNS)).rstrip()


@click.command("events")
@click.option("--endpoint", default=None,
              help="The daemon's events endpoint (default: KVPAGER_EVENTS_ENDPOINT), e.g. tcp://127.0.0.1:5557.")
@click.option("--replay-endpoint", default=None,
              help="Its replay socket (default: the next TCP port, or the ipc path + .replay).")
@click.option("--topic", default="", help="Topic prefix to subscribe to (default: every topic).")
@click.option("--from-seq", "start", type=click.IntRange(min=0, max=(1 << 63) - 1), default=None,
              help="First replay the kept batches from this sequence number (0: all the daemon keeps).")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after this many batches.")
@click.option("--idle", type=Seconds(open_low=True, high=sys.float_info.max), default=None,
              help="Stop after this many seconds without a batch (default: wait until Ctrl-C).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per batch instead of a table.")
def events_command(endpoint: str | None, replay_endpoint: str | None, topic: str, start: int | None,
                   count: int | None, idle: float | None, as_json: bool) -> None:
    """Tail the KV event stream: vLLM's BlockStored / BlockRemoved / AllBlocksCleared."""
    endpoint = endpoint or env.events_endpoint()
    if not endpoint:
        raise click.UsageError("give --endpoint, or set KVPAGER_EVENTS_ENDPOINT (the daemon's --events-endpoint)")
    for ep in (endpoint, replay_endpoint or ""):
        if ep.startswith("inproc://"):
            raise click.UsageError(f"{ep}: inproc:// reaches only a publisher in the same process, and this "
                                   "command runs in a process of its own: give the daemon's ipc:// or tcp:// "
                                   "events endpoint")
    try:
        sub = Subscription(endpoint, replay_endpoint or replay_endpoint_for(endpoint), topic, start)
    except InvalidArgument as e:
        raise click.ClickException(str(e)) from None
    why = probe(endpoint)
    if why is not None:
        sub.close()
        raise click.ClickException(f"no KV event publisher at {endpoint} ({why}): start the daemon with "
                                   "--events-endpoint, or pass the one it uses")
    replay_why = probe(sub.replay_endpoint) if sub.replay_endpoint else None
    if replay_why is not None:  # a publisher has both: the daemon's request endpoint, say, has none
        click.echo(f"warning: nothing listens at the replay endpoint {sub.replay_endpoint} ({replay_why}): is "
                   f"{endpoint} the daemon's --events-endpoint (not its request endpoint)? Else pass "
                   "--replay-endpoint", err=True)
    seen = 0
    try:
        with sub:
            if not as_json:
                click.echo(line(tuple(name for name, _ in _COLUMNS)))
            for b in sub.batches(idle):
                if as_json:
                    click.echo(json.dumps({"seq": b.seq, "ts": b.ts, "replayed": b.replayed, "events": b.events},
                                          default=_hex))
                else:
                    for row in batch_rows(b):
                        click.echo(line(row))
                seen += 1
                if count is not None and seen >= count:
                    break
    except InvalidArgument as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        pass
    except OSError as e:  # the output cannot be written (a full disk); a closed pipe: click ends quietly
        if e.errno == errno.EPIPE:
            raise
        raise click.ClickException(f"cannot write the output: {e.strerror or e}") from None
    if count is not None and seen < count:
        click.echo(f"error: {seen} of {count} batches before {idle} s without one", err=True)
        sys.exit(4)
