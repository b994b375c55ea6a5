"""The Redis Cluster store's raw reads (`kvpager.remote_cluster`): lookups'
``GETRANGE`` replies and probes' ``TYPE`` replies read off the socket of a
node's redis-py connection by the call's deadline, as the standalone store
reads them (`kvpager.remote_resp`).

Through redis-py's pipelines a value is copied whole before it reaches the
caller's row, and each read is bounded by the socket timeout alone: a master
whose replies came a byte at a time held a probe of 20 keys, on the daemon's
loop, 9 s at a 0.1 s timeout, and then answered it as if nothing were wrong.
Read raw, every reply of a call is in by its deadline (`lookup_deadline`) or
the call fails; a connection left with part of a reply in it is dropped,
never reused (`_raw`). A key a master answers ``ASK`` / ``MOVED`` for is
handed back to the store's fan-out, which asks the node named (``ASKING``
first, whose ``+OK`` is read here: `_asked`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager.remote_cluster_calls import Side
from kvpager.remote_resp import (
    FetchError,
    Reader,
    ReplyError,
    lookup_deadline,
    read_range,
    reply_error,
)
from kvpager.remote_store import KEY_ABSENT, KEY_OTHER, KEY_STRING, KEY_WRONG_LENGTH

if TYPE_CHECKING:
    from kvpager.remote_cluster import Plan


class RawReads:
    """`RedisClusterStore`'s lookups and probes read raw (mixed into it, before
    `Store`, whose `get_into` is the path without raw reads): needs ``raw_reads``,
    ``_chunk_bytes``, ``_timeout``, ``_ask``, ``_moved``, ``_call`` and ``_spread``."""

    def get_into(self, keys: Seq[str], out: np.ndarray, sizes: np.ndarray,
                 done: Callable[[int, int], None] | None = None) -> None:
        if not self.raw_reads:
            return super().get_into(keys, out, sizes, done)  # (`Store`'s: redis-py's GET copied)
        sizes[:] = -1
        if not len(keys):
            return
        width = out.shape[1]
        rows = memoryview(out).cast("B")
        per = max(1, round(self._chunk_bytes / width))  # a master's keys a pipeline (as a standalone store's)
        deadline = 0.0

        def job(client: Any, plan: Plan) -> list[tuple[int, Any]]:
            def talk(conn: Any, reader: Reader) -> list[tuple[int, Any]]:
                redirected = []
                for lo in range(0, len(plan), per):  # (a reply of every key at once ran at half the speed)
                    part = plan[lo : lo + per]
                    commands = []
                    for i, ask in part:
                        if ask:
                            commands.append(("ASKING",))
                        commands.append(("GETRANGE", keys[i], 0, width))
                    conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                    redirected += self._read_gets(reader, part, rows, width, sizes, done)
                return redirected

            return _raw(client, deadline, talk)

        def run(side: Side, rc: Any) -> None:
            nonlocal deadline
            # the nodes' replies together, in as many chunks one after another as a master could
            # have; from here, once the client has its slot map (a first lookup reads it: on a
            # loaded host that took the lookup's whole time, and the lookup failed)
            deadline = lookup_deadline(self._timeout, len(keys) * width, -(-len(keys) // per))
            self._spread(side, rc, keys, job)

        self._call(0, run)

    def _read_gets(self, reader: Reader, plan: Plan, rows: memoryview, width: int, sizes: np.ndarray,
                   done: Callable[[int, int], None] | None) -> list[tuple[int, Any]]:
        """The replies to a node's pipelined ``GETRANGE``s (``ASKING`` first where
        the plan says): each value of ``width`` bytes into its row, its length
        into ``sizes`` (`kvpager.remote_resp.read_range`: -1 absent, empty or
        another Redis type, ``width + 1`` longer); the keys redirected."""
        redirected = []
        for i, ask in plan:
            if ask:
                _asked(reader)
            try:
                read_range(reader, rows, width, sizes, i)
            except ReplyError as e:
                redirected.append((i, self._redirection(e)))
                continue
            if done is not None:
                done(i, i + 1)
        if not reader.idle():
            raise FetchError("malformed reply: bytes after the replies to GETRANGE")
        return redirected

    def _redirection(self, e: ReplyError) -> Any:
        """The ``AskError`` / ``MovedError`` of an ``ASK`` / ``MOVED`` reply; ``e``
        itself (raised) for any other error reply."""
        if not e.reply.startswith(("MOVED ", "ASK ")):
            raise e
        word, rest = e.reply.split(" ", 1)
        try:
            return (self._moved if word == "MOVED" else self._ask)(rest)
        except ValueError:
            raise FetchError(f"malformed reply: {e.reply[:200]!r}") from None

    def _types(self, keys: Seq[str], width: int | None = None) -> np.ndarray:
        """`exists_many` read as a lookup is: each master's ``TYPE`` replies (one
        status line each; ``ASKING`` first where the plan says; with ``width`` a
        ``STRLEN`` after each, `kvpager.remote_key_types.key_types`) read raw, every one by
        the call's deadline (`lookup_deadline`). Through redis-py's pipelines each read
        was bounded by the timeout alone: a master whose replies came a byte at a time
        held a probe of 20 keys, on the daemon's loop, 9 s at a 0.1 s timeout, and
        then answered it as if nothing were wrong."""
        out = np.full(len(keys), KEY_OTHER, dtype=np.int8)
        codes = {b"+none": KEY_ABSENT, b"+string": KEY_STRING}
        length = None if width is None else b":%d" % width
        deadline = 0.0

        def job(client: Any, plan: Plan) -> list[tuple[int, Any]]:
            def talk(conn: Any, reader: Reader) -> list[tuple[int, Any]]:
                commands = []
                for i, ask in plan:
                    if ask:
                        commands.append(("ASKING",))
                    commands.append(("TYPE", keys[i]))
                    if width is not None:  # (ASKING holds for the next command only)
                        commands += [("ASKING",), ("STRLEN", keys[i])] if ask else [("STRLEN", keys[i])]
                conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                redirected = []
                for i, ask in plan:
                    if ask:
                        _asked(reader)
                    line = reader.line()
                    if line[:1] == b"-":  # NOPERM and the like fail the call; ASK / MOVED are followed
                        redirected.append((i, self._redirection(reply_error(line, " to TYPE"))))
                    elif line[:1] == b"+" and len(line) > 1:
                        out[i] = codes.get(line, KEY_OTHER)
                    else:
                        raise FetchError(f"malformed reply: {line[:200]!r} to TYPE")
                    if width is None:
                        continue
                    if ask:
                        _asked(reader)
                    size = reader.line()
                    if size[:1] == b"-" and not size.startswith(b"-WRONGTYPE"):  # (redirected with its TYPE)
                        if line[:1] != b"-":
                            raise reply_error(size, " to STRLEN")
                    elif size[:1] not in (b":", b"-"):
                        raise FetchError(f"malformed reply: {size[:200]!r} to STRLEN")
                    elif out[i] == KEY_STRING and size != length:
                        out[i] = KEY_WRONG_LENGTH
                if not reader.idle():
                    raise FetchError("malformed reply: bytes after the replies to TYPE")
                return redirected

            return _raw(client, deadline, talk)

        def run(side: Side, rc: Any) -> None:
            nonlocal deadline
            deadline = lookup_deadline(self._timeout, 16 * len(keys))  # (as a standalone store's probe)
            self._spread(side, rc, keys, job)

        self._call(0, run)
        return out


def _asked(reader: Reader) -> None:
    """The reply to an ``ASKING`` sent before a redirected key's command: ``+OK``."""
    if (line := reader.line()) != b"+OK":
        if line[:1] == b"-":
            raise reply_error(line, " to ASKING")
        raise FetchError(f"malformed reply: {line[:200]!r} to ASKING")


def _raw(client: Any, deadline: float, talk: Callable[[Any, Reader], list[tuple[int, Any]]]) -> list[tuple[int, Any]]:
    """``talk(conn, reader)`` on a connection of the node client ``client``'s pool,
    its replies read raw by ``deadline``; a connection left with part of a reply in it
    (any failure) is dropped, never reused."""
    pool = client.connection_pool
    conn = pool.get_connection()
    broken = True
    try:
        if conn._sock is None:
            conn.connect()
        reader = Reader(conn._sock, deadline)
        out = talk(conn, reader)
        reader.restore()
        broken = False
        return out
    finally:
        if broken:
            with contextlib.suppress(Exception):
                conn.disconnect()
        pool.release(conn)
