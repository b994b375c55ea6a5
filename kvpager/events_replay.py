"""The KV event stream's replay answers (`kvpager.events_pub`): the ROUTER
socket's requests read and answered from the kept batches, on the
publisher's thread between its live batches.

A request is one frame, the first sequence number wanted; the answer is one
message per kept batch from there on, then the end marker (`END_SEQ`; the
framing: docs/protocol.md, "KV events"). Answers go out a few hundred
batches a turn (`REPLAY_TURN`), between the live batches, never waiting for
a peer: one whose queue is full (``SNDHWM``: `REPLAY_HWM`) gets the rest when
it has read some; one that read nothing for `REPLAY_STALL` seconds, or is
gone, gets nothing more. At most `REPLAY_PEERS` answers are under way at
once: a request past them gets the end marker alone, at once (as a request
past the last batch does), so its reader stops waiting and may ask again; a
peer's new request replaces its answer under way.

Replay work is bounded in time, whatever the readers do: answers share a
budget of ``EventsConfig.replay_rate`` bytes a second (`TokenBucket`; each
message counts at least `REPLAY_MIN_CHARGE` bytes, a message's fixed cost),
requests are read at most `REPLAY_REQUESTS` a second, and the thread sleeps
while either is spent (live batches still wake it and go out at once: they
never wait for the budget, nor count against it). Without the budget, readers
re-requesting replays in a loop kept the thread sending and took the GIL (and
a CPU) from the daemon's loop: with four, its ``stats`` slowed at the median
and several-fold at the 90th percentile (docs/protocol.md, "KV events").
"""

from __future__ import annotations

import contextlib
import logging

import zmq

log = logging.getLogger("kvpager.events")

#: The end of a replay answer: sequence number -1.
END_SEQ = (-1).to_bytes(8, "big", signed=True)
#: Messages the replay socket queues a peer: an answer goes on as the peer reads (its turns
#: wait while the queue is full). ZeroMQ's 1,000 let each peer that asked for the whole kept
#: history and read none of it hold up to 64 MiB once its answer was all queued.
REPLAY_HWM = 64
WAKE_S = 0.05  # how often the idle thread looks at the replay socket
#: Replay answers under way at once, and batches sent to them per turn (in all).
REPLAY_PEERS = 64
REPLAY_TURN = 256
#: Frames of at least this many bytes go out of the replay socket without a copy: a queued
#: answer refers to the kept batch (`ReplayAnswers._answer`).
REPLAY_ZERO_COPY = 4096
#: Seconds a replay answer waits for its peer to read before it is dropped.
REPLAY_STALL = 10.0
#: Bytes of replay answers a second, shared by all peers (`EventsConfig.replay_rate`):
#: the kept history (at most 10,000 batches, 64 MiB) in a few seconds.
REPLAY_RATE = 64 << 20
#: What one replay message counts against that budget at least, in bytes: sending a
#: message costs as much as copying ~16 KiB (about 8 us), so small batches count so.
REPLAY_MIN_CHARGE = 16 << 10
#: Seconds of budget saved while idle (a short catch-up goes out at once).
REPLAY_BURST_S = 0.1
#: Replay requests read a second (and at most this many at once: `REPLAY_PEERS`).
REPLAY_REQUESTS = 1000
#: The least the thread sleeps once a budget is spent (its work comes in slices).
REPLAY_PAUSE_S = 0.01


class TokenBucket:
    """``rate`` units a second, up to ``burst`` of them saved. A spend may run
    into debt (one message bigger than the bucket still goes), repaid before
    the next; the caller passes the time (`time.monotonic` or a test's)."""

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = float(rate), float(burst)
        self.tokens, self._last = self.burst, now

    def refill(self, now: float) -> float:
        """The tokens at ``now``."""
        if now > self._last:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
            self._last = now
        return self.tokens

    def take(self, n: float) -> None:
        self.tokens -= n

    def wait(self, want: float = 0.0) -> float:
        """Seconds until the bucket holds ``want`` (0 if it does)."""
        return max(0.0, want - self.tokens) / self.rate


class ReplayAnswers:
    """The replay side of `EventPublisher` (mixed into it; run by its thread
    alone): needs ``config``, ``published``, ``_topic``, ``_replay`` (the ROUTER
    socket), ``_kept`` (the kept batches, oldest first), ``_replays`` (answers
    under way: envelope -> (next seq, end seq, last progress)) and the budgets
    ``_budget`` (bytes) and ``_requests`` (`TokenBucket`s)."""

    def _replay_turn(self, now: float) -> float:
        """Read the requests waiting (as the request budget allows), send the
        answers under way their next batches (as the byte budget allows); the
        seconds to wait before the next turn (live batches wake it sooner)."""
        replay, requests = self._replay, self._requests
        requests.refill(now)
        while requests.tokens >= 1 and replay.poll(0):  # a flood of requests waits in the socket
            requests.take(1)
            self._request(replay.recv_multipart(), now)
        moved = self._answer(now)
        wait = 0.001 if moved else WAKE_S  # answers under way go on after a pause for the GIL
        if self._replays and self._budget.tokens <= 0:  # over budget: sleep, not spin
            wait = max(REPLAY_PAUSE_S, self._budget.wait())
        if requests.tokens < 1:  # requests may be waiting
            wait = min(wait, max(REPLAY_PAUSE_S, requests.wait(1.0)))
        return min(wait, WAKE_S)

    def _request(self, frames: list[bytes], now: float) -> None:
        """A replay request: ``[identity, (b""), start seq]``; its answer starts
        (the batches kept from there on, up to the last one published now)."""
        if len(frames) not in (2, 3) or (len(frames) == 3 and frames[1]):
            log.debug("KV events: malformed replay request of %d frames", len(frames))
            return
        envelope, start_bytes = tuple(frames[:-1]), frames[-1]
        if envelope not in self._replays and len(self._replays) >= REPLAY_PEERS:
            # Busy: the end marker at once (a few bytes, for an 8-byte request read at
            # most REPLAY_REQUESTS a second; not charged to the byte budget, so the
            # answers under way keep all of it), never waiting for the peer.
            log.debug("KV events: %d replays under way, a request answered with the end", len(self._replays))
            with contextlib.suppress(zmq.ZMQError):  # its queue full, or gone: nothing more to do
                self._replay.send_multipart(self._end_message(envelope), zmq.NOBLOCK)
            return
        start = int.from_bytes(start_bytes, "big") if len(start_bytes) == 8 else self.published
        self._replays[envelope] = (start, self.published, now)

    def _end_message(self, envelope: tuple[bytes, ...]) -> list[bytes]:
        """A replay answer's end marker on ``envelope``: ``[b"", seq -1, b""]``
        (``[seq -1, b""]`` in the "array" format)."""
        return [*envelope, *([b""] if self.config.format == "map" else []), END_SEQ, b""]

    def _answer(self, now: float) -> bool:
        """Send the answers under way their next batches (`REPLAY_TURN` in all,
        and while the byte budget holds any: each message costs its payload,
        at least `REPLAY_MIN_CHARGE`) and each finished one its end marker,
        without waiting for any peer; True if any moved. Peers take turns:
        one that got some goes to the back."""
        kept, send, bucket = self._kept, self._replay.send_multipart, self._budget
        first = kept[0][0] if kept else self.published  # batches before it are no longer kept
        head = [self._topic] if self.config.format == "map" else []
        turn, moved = REPLAY_TURN, False
        bucket.refill(now)
        for envelope, (seq, stop, since) in list(self._replays.items()):
            if not turn or bucket.tokens <= 0:
                break
            seq, sent = max(seq, first), 0
            try:
                while seq < stop and turn and bucket.tokens > 0:
                    payload = kept[seq - first][1]
                    # zero-copy: a queued message refers to the kept batch (copied, each peer that
                    # asked and never read held up to REPLAY_HWM copies until it disconnected)
                    send([*envelope, *head, seq.to_bytes(8, "big"), payload], zmq.NOBLOCK, copy=False)
                    bucket.take(max(len(payload), REPLAY_MIN_CHARGE))
                    seq += 1
                    sent += 1
                    turn -= 1
                if seq >= stop and bucket.tokens > 0:
                    send(self._end_message(envelope), zmq.NOBLOCK)
                    bucket.take(REPLAY_MIN_CHARGE)
                    del self._replays[envelope]
                    moved = True
                    continue
            except zmq.Again:  # the peer's queue is full: the rest when it has read some
                pass
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                del self._replays[envelope]  # the peer is gone
                continue
            if sent:
                del self._replays[envelope]  # to the back: the next turn serves the others first
                self._replays[envelope] = (seq, stop, now)
                moved = True
            elif now - since > REPLAY_STALL:  # offered a batch (the budget held one) and took none
                log.debug("KV events: a replay peer read nothing for %.0f s, its answer dropped", REPLAY_STALL)
                del self._replays[envelope]
        return moved
