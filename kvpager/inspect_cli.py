"""`kvpager stats | seqs | blocks | check | top`: look inside a running daemon.

Each command asks the daemon for a result type (`PoolStats`, `SequenceInfo`,
`BlockMap`) and renders it: a table for people, ``--json`` for scripts.
Failures print one line and the next command to try, and exit non-zero.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from kvpager import env, render
from kvpager.errors import (
    DaemonUnavailable,
    IntegrityError,
    KVPagerError,
    LimitExceeded,
    ProtocolError,
    RequestTimeout,
    SessionLost,
    Unauthorized,
)
from kvpager.protocol_ops import SEQUENCES_PAGE

# exception type -> (exit code, hint: the next thing to try)
HINTS: list[tuple[type[BaseException], int, str]] = [
    (DaemonUnavailable, 3, "start one with `kvpager serve`, or pass --endpoint / set KVPAGER_ENDPOINT"),
    (RequestTimeout, 4, "the daemon is busy or stuck: retry with a larger --timeout (KVPAGER_TIMEOUT)"),
    (Unauthorized, 6, "the daemon has a token: set KVPAGER_TOKEN, or KVPAGER_TOKEN_FILE to its file"),
    (SessionLost, 5, "the daemon restarted or dropped this session: run the command again"),
    # a reply that is no kvpager reply: another program listens there (once only "see kvpager --help")
    (ProtocolError, 2, "is a kvpager daemon listening there? check --endpoint / KVPAGER_ENDPOINT "
                       "(another program, or a daemon of another kvpager version, answers)"),
    (IntegrityError, 1, "a kvpager bug: save `kvpager blocks --json` and `kvpager seqs --json` for the report"),
    (KVPagerError, 2, "see `kvpager --help`"),
]


class Seconds(click.ParamType):
    """A finite number of seconds in [``low``, ``high``] (``low`` itself refused where
    ``open_low``): click's FloatRange lets nan and inf through, and ``time.sleep`` or
    ``subprocess.run`` then fail with a traceback."""

    name = "seconds"

    def __init__(self, low: float = 0.0, high: float = 7 * 86400, open_low: bool = False):
        self.low, self.high, self.open_low = low, high, open_low

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not (math.isfinite(x) and (x > self.low if self.open_low else x >= self.low) and x <= self.high):
            lo = f"more than {self.low:g}" if self.open_low else f"at least {self.low:g}"
            self.fail(f"{value!r} is not a number of seconds {lo} and at most {self.high:g}", param, ctx)
        return x


#: the hint for a refused control token (an Unauthorized that names it): the client token's would mislead
CONTROL_HINT = ("the daemon's control token differs: set KVPAGER_CONTROL_TOKEN (or KVPAGER_CONTROL_TOKEN_FILE) "
                "to its token, or unset it for the read-only commands")


def fail(e: BaseException) -> None:
    for cls, code, hint in HINTS:
        if isinstance(e, cls):
            if isinstance(e, Unauthorized) and "control token" in str(e):
                hint = CONTROL_HINT
            elif isinstance(e, LimitExceeded) and "sessions open at once" in str(e):
                hint = SESSIONS_HINT
            elif isinstance(e, DaemonUnavailable) and isinstance(e.__context__, RequestTimeout):
                hint = STUCK_HINT  # (its hello went unanswered: something listens there)
            elif isinstance(e, DaemonUnavailable) and "takes no new connections" in str(e):
                hint = FULL_HINT
            elif isinstance(e, LimitExceeded) and getattr(e, "limit", None) == "check_share":
                hint = CHECK_HINT
            from kvpager.channel import TIMEOUT_ADVICE

            # (a timed-out request's advice, in a timeout or a daemon found stuck: the command's own flag)
            text = str(e).replace(TIMEOUT_ADVICE, "give the command a larger --timeout (or KVPAGER_TIMEOUT)")
            click.echo(f"error: {text}", err=True)
            click.echo(f"next: {hint}", err=True)
            sys.exit(code)
    raise e


#: the hint where the daemon asked a check to wait longer than the command's timeout
CHECK_HINT = ("the daemon holds checks to a share of its time (a large pool's check takes long): run it again "
              "after the wait it names, or give --timeout more than that wait")

#: the hints where hello went unanswered (a daemon stopped or stuck, or busy past the timeout), and where
#: the daemon's connections are at the most its open files hold (`kvpager.server_watch`)
STUCK_HINT = ("something listens there but did not answer in time: a daemon stopped (SIGSTOP, a paused container) "
              "or busy; retry with a larger --timeout (KVPAGER_TIMEOUT), or look at the daemon's log")
FULL_HINT = ("close the clients' unused connections (a process that opens clients and never closes them?), or "
             "restart the daemon with a larger open files limit (ulimit -n; systemd LimitNOFILE=)")

#: the hint where hello found every session taken (the daemon's message says how many)
SESSIONS_HINT = ("every session the daemon allows is open: where it has a control token, set KVPAGER_CONTROL_TOKEN "
                 "(or KVPAGER_CONTROL_TOKEN_FILE) to it to look anyway (`kvpager sessions`: which clients hold "
                 "them); else close clients, or restart it with a larger --max-sessions (and a "
                 "--control-token-file)")


def connect(endpoint: str | None, timeout: float | None, heartbeat: bool = False) -> Any:
    """The command's client (``heartbeat``: its session kept open by heartbeats, for
    a command that waits between its requests). Where every session is taken, once
    more with the control token of the environment, if there is one: such a session
    may open past the limit, so an operator can see who holds the sessions (the
    token is not sent otherwise: a wrong one would refuse the read-only commands)."""
    from kvpager.client import Client
    from kvpager.endpoints import other_process_endpoint

    endpoint = other_process_endpoint(endpoint)

    def opened(**token: Any) -> Any:
        return Client(endpoint, timeout=timeout, heartbeat=heartbeat, map_pool=False, name="kvpager-cli", quiet=True,
                      **token)

    try:
        return opened()
    except LimitExceeded as e:
        token = env.control_token()
        if token is None or "sessions open at once" not in str(e):
            raise
        return opened(control_token=token)


def daemon_command(fn: Callable[..., None] | None = None, *, heartbeat: bool = False) -> Any:
    """A command that talks to the daemon: adds --endpoint/--timeout/--json,
    opens a client, maps errors to a one-line message and an exit code.
    ``heartbeat``: the client beats while the command waits between requests
    (`top`); a session silent past the daemon's heartbeat timeout is ended."""
    if fn is None:
        return functools.partial(daemon_command, heartbeat=heartbeat)

    @click.option("--endpoint", default=None, help="Daemon endpoint (default: KVPAGER_ENDPOINT or the private ipc socket).")
    @click.option("--timeout", type=Seconds(open_low=True, high=sys.float_info.max), default=None, help="Seconds to wait for each reply (KVPAGER_TIMEOUT; default 10).")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    @functools.wraps(fn)
    def wrapper(endpoint: str | None, timeout: float | None, as_json: bool, **kwargs: Any) -> None:
        try:
            client = connect(endpoint, timeout, heartbeat)
        except KVPagerError as e:
            fail(e)
        try:
            fn(client, as_json, **kwargs)
        except KVPagerError as e:
            fail(e)
        finally:
            client.close()

    return click.command()(wrapper)


def emit(as_json: bool, data: object, text: str) -> None:
    """Print a command's answer (`write`)."""
    write(json.dumps(data, indent=2) if as_json else text)


def write(text: str) -> None:
    """Print ``text``; an output that cannot be written (a full disk, a closed
    terminal) is a one-line error and exit code 1, not a traceback (a closed
    pipe, `| head`, click ends quietly)."""
    try:
        click.echo(text)
    except OSError as e:
        if e.errno == errno.EPIPE:
            raise
        click.echo(f"error: cannot write the output: {e.strerror or e}", err=True)
        sys.exit(1)


@daemon_command
def stats(client: Any, as_json: bool) -> None:
    """The pool at a glance: blocks free / evictable / used / shared, prefix hits."""
    st = client.stats()
    data, text = st.to_dict(), render.stats_text(st)
    remote = client.remote_stats() if client.remote else None  # a daemon with a remote tier
    if remote is not None:
        data["remote"] = remote.to_dict()
        text += "\n\n" + render.remote_text(remote)
    emit(as_json, data, text)


@daemon_command
@click.option("--session", "sessions", multiple=True, metavar="NAME",
              help="Only the sequences of this session (its name, as `kvpager sessions` shows it; repeatable).")
@click.option("--pid", "pids", multiple=True, type=click.IntRange(min=0),
              help="Only the sequences of sessions of this client process (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most this many sequences, the first in id order (asked no further than needed).")
def seqs(client: Any, as_json: bool, sessions: tuple[str, ...], pids: tuple[int, ...], limit: int | None) -> None:
    """Sequences with owner session, length, blocks, shared blocks and state."""
    from kvpager.client_seqs import sequence_pages

    procs = set(pids)
    # (pages of the limit and one more where every sequence counts: one request says whether more exist)
    page_size = SEQUENCES_PAGE if limit is None or procs else min(limit + 1, SEQUENCES_PAGE)
    seq_list: list[Any] = []
    for owner in dict.fromkeys(sessions) or [None]:  # (a session's pages: the daemon picks them out)
        got: list[Any] = []
        for page in sequence_pages(client, page_size, owner):
            got.extend(s for s in page if not procs or s.owner_pid in procs)
            if limit is not None and len(got) > limit:
                break
        seq_list.extend(got)
    if len(sessions) > 1:
        seq_list.sort(key=lambda s: s.seq_id)
    more = limit is not None and len(seq_list) > limit
    if more:
        del seq_list[limit:]
    text = render.sequences_text(seq_list)
    if more:
        text += f"\n(the first {limit}, more not shown: --limit)"
    emit(as_json, [render.sequence_dict(s) for s in seq_list], text)


@daemon_command
@click.option("--width", type=click.IntRange(min=1), default=64, show_default=True, help="Blocks per line.")
def blocks(client: Any, as_json: bool, width: int) -> None:
    """A map of the pool: state and reference count of every block."""
    bm = client.blocks()
    emit(as_json, render.blocks_dict(bm), render.blocks_text(bm, width))


@daemon_command
def check(client: Any, as_json: bool) -> None:
    """Run the allocator's integrity check; exit code 0 if it holds, 1 if not."""
    try:
        client.check_integrity()
    except IntegrityError as e:
        emit(as_json, {"ok": False, "error": str(e)}, f"FAILED: {e}")
        sys.exit(1)
    emit(as_json, {"ok": True}, "ok: every block is free, evictable or in use exactly once; ref counts match")


@daemon_command(heartbeat=True)  # (without, an --interval past the heartbeat timeout lost the session)
@click.option("--interval", type=Seconds(), default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--iterations", type=click.IntRange(min=0), default=0, help="Stop after this many refreshes (0: until q or Ctrl-C).")
def top(client: Any, as_json: bool, interval: float, iterations: int) -> None:
    """A live view: usage, rates over each interval, tenants, sessions (q quits).
    Without a terminal, or with --json, a frame (a JSON line) per refresh."""
    from kvpager import top as view

    if not as_json and sys.stdout.isatty() and sys.stdin.isatty():
        view.run_screen(client, interval, iterations)
        return
    n, prev = 0, None
    try:
        while True:
            cur = view.take(client)
            r = None if prev is None else view.rates(prev, cur)
            if as_json:
                write(json.dumps({"time": time.time(), "stats": cur.stats.to_dict(),
                                  "sequences": cur.stats.num_sequences,
                                  "rates": None if r is None else r.to_dict(),
                                  "sessions": [vars(s) for s in cur.sessions]}))
            else:
                size = shutil.get_terminal_size()
                write("\n".join(view.lines(cur, r, client.endpoint, size.columns, size.lines)) + "\n")
            n, prev = n + 1, cur
            if iterations and n >= iterations:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


COMMANDS = [stats, seqs, blocks, check, top]
