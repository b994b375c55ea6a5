"""A hostile or broken "Redis" on a free port, for the remote tier's tests of
slow stores: a RESP3 HELLO, +OK to every other command but reads and probes,
whose replies it trickles."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class TricklingServer:
    """Reads (``GETRANGE``, ``GET``, ``MGET``) answered with a value announced
    ``announce`` bytes long (``None``: 1 GB; ``"exact"``: as long as the
    ``GETRANGE`` asked, a value of the right length), then ``chunk`` bytes every
    ``every`` seconds for ``seconds`` (or until the value is sent), then it hangs
    up; probes (``TYPE``) answered ``+string`` for every key, ``chunk`` bytes at a
    time alike."""

    def __init__(self, seconds: float, announce: int | str | None = None, chunk: int = 64 << 10,
                 every: float = 0.01):
        self.seconds, self.announce, self.chunk, self.every = seconds, announce, chunk, every
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}"
        self.threads: list[threading.Thread] = []
        self.done = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _commands(buf: bytearray) -> list[list[bytes]]:
        """Whole commands (arrays of bulk strings) taken off the front of ``buf``."""
        out = []
        while True:
            try:
                lines = bytes(buf).split(b"\r\n")
                n, at, args = int(lines[0][1:]), 1, []
                for _ in range(n):
                    args.append(lines[at + 1])
                    at += 2
                if at >= len(lines):
                    return out
            except (ValueError, IndexError):
                return out
            used = sum(len(x) + 2 for x in lines[:at])
            del buf[:used]
            out.append(args)

    def _trickle(self, conn: socket.socket, head: bytes, zeros: int = 0, tail: bytes = b"") -> None:
        """``head``, ``zeros`` zero bytes and ``tail``, ``chunk`` bytes every ``every``
        seconds, for at most ``seconds``."""
        deadline = time.monotonic() + self.seconds
        total = len(head) + zeros + len(tail)
        with contextlib.suppress(OSError):
            for at in range(0, total, self.chunk):
                if time.monotonic() >= deadline or self.done.is_set():
                    return
                piece = bytearray(min(self.chunk, total - at))  # zeros, the head and tail laid over them
                for offset, part in ((0, head), (len(head) + zeros, tail)):
                    lo, hi = max(offset, at), min(offset + len(part), at + len(piece))
                    if lo < hi:
                        piece[lo - at : hi - at] = part[lo - offset : hi - offset]
                conn.sendall(piece)
                time.sleep(self.every)

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            while not self.done.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                commands = self._commands(buf)
                types = [args for args in commands if args[0].upper() == b"TYPE"]
                if types:  # a probe's pipeline: every reply, trickled
                    self._trickle(conn, b"+string\r\n" * len(types))
                    continue
                for args in commands:
                    name = args[0].upper()
                    if name == b"HELLO":  # redis-py asks for RESP3
                        conn.sendall(b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n")
                        continue
                    if name not in (b"MGET", b"GET", b"GETRANGE"):
                        conn.sendall(b"+OK\r\n")
                        continue
                    head = b"*%d\r\n" % (len(args) - 1) if name == b"MGET" else b""
                    n = int(args[3]) if self.announce == "exact" else self.announce or 1_000_000_000
                    self._trickle(conn, head + b"$%d\r\n" % n, n, b"\r\n")
                    return  # hang up

    def close(self) -> None:
        self.done.set()
        self.sock.close()
        for t in self.threads:
            t.join(10)
