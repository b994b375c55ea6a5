"""One DEALER socket to the daemon and its request/reply loop with a deadline.

`Client` holds one for its calls and its heartbeat thread another.
"""

from __future__ import annotations

import math
import time

import zmq

from kvpager.endpoints import open_socket, probe
from kvpager.errors import DaemonUnavailable, RequestTimeout
from kvpager.protocol import Reply, decode_reply

#: ZeroMQ's RCVTIMEO is a C int of milliseconds: a longer wait is cut to it (about 24.8 days).
MAX_RCVTIMEO = 2**31 - 1


def wait_ms(seconds: float) -> int:
    """A wait as ZeroMQ takes one (RCVTIMEO, a poll's timeout): at least 1 ms, at most
    `MAX_RCVTIMEO` (a C int of milliseconds: a huge timeout overflowed it)."""
    return max(1, math.ceil(min(seconds * 1000, MAX_RCVTIMEO)))


#: seconds a request waits before it asks whether the daemon is still there (`Channel.request`)
LOOK_AFTER = 0.25


#: What a timed-out request's error tells a program (the CLI tells its own flag: `kvpager.inspect_cli.fail`)
TIMEOUT_ADVICE = "raise KVPAGER_TIMEOUT or pass timeout= to Client"


class Channel:
    """One DEALER socket and its request/reply loop with a deadline."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.gone = False  # the last request found nothing listening (DaemonUnavailable)
        self.sock = self._open()

    def _open(self) -> zmq.Socket:
        sock = open_socket(zmq.Context.instance(), zmq.DEALER, self.endpoint)
        sock.connect(self.endpoint)
        return sock

    def reset(self) -> None:
        """A socket that timed out may still receive the late reply: replace it."""
        self.sock.close(0)
        self.sock = self._open()

    def close(self) -> None:
        self.sock.close(0)

    def request(self, body: bytes, rid: int, op: str, timeout: float) -> Reply:
        deadline = time.monotonic() + timeout
        sock = self.sock
        # Each wait is a poll of the socket for what is left of the timeout: a
        # poll that a signal interrupts goes on for what is left (pyzmq's
        # zmq_poll counts the time), where a blocking recv bounded by RCVTIMEO
        # began its whole wait again after each signal (a handler run every
        # 50 ms held a call to a stopped daemon past its timeout for as long as
        # the daemon stayed stopped; about 1 us a request). The first wait is
        # at most `LOOK_AFTER`: a reply that has not come by then asks whether
        # the daemon is still there (a gone one is said at once, not after the
        # whole timeout), then the rest of the timeout is waited out.
        try:
            sock.send(body, zmq.NOBLOCK)
        except zmq.Again:  # (its queue full: nothing sent, said as no reply)
            pass
        else:
            looked = False
            while True:
                remaining = deadline - time.monotonic()
                wait = remaining if looked else min(remaining, LOOK_AFTER)
                if wait > 0 and zmq.zmq_poll([(sock, zmq.POLLIN)], wait_ms(wait)):
                    reply = decode_reply(sock.recv(zmq.NOBLOCK))
                    if reply.id == rid or reply.id is None:
                        return reply
                    continue  # a late reply to an earlier request: dropped, the rest waited out
                if looked or deadline - time.monotonic() <= 0:
                    break
                looked = True
                if probe(self.endpoint) is not None:
                    break  # gone: said below
        self.reset()
        why = probe(self.endpoint)
        if why is not None:
            self.gone = True
            raise DaemonUnavailable(f"the kvpager daemon at {self.endpoint} is gone ({why})")
        raise RequestTimeout(
            f"no reply from the kvpager daemon at {self.endpoint} to {op!r} within {timeout:g}s; {TIMEOUT_ADVICE}"
        )
