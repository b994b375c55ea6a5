"""`kvpager top`: a live full-screen view of a daemon.

Each refresh asks the daemon for its stats (with its request counter) and
its sessions, two small requests whatever the pool holds, and shows rates
over the interval (requests per second, in all and per session; prefix hit
rate of the prompt tokens allocated in the interval), a usage bar, pinned
blocks, tenants and the sessions with their client names and pids.

The screen is drawn with the standard library's ``curses``: no dependency,
keys (``q`` quits) and terminal resizes come with it, and every line is cut
to the window's width, so nothing wraps in a small terminal. (``rich`` draws
richer tables, but would be a new dependency and still needs raw keyboard
handling.) Without a terminal, or with ``--json``, each refresh prints a
frame (or a JSON line) instead.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from kvpager.errors import UnknownOp
from kvpager.render import human_bytes, printable, salt_label
from kvpager.types import PoolStats, SessionInfo


@dataclass(frozen=True)
class Snapshot:
    at: float  # time.monotonic() when taken
    stats: PoolStats
    requests: int | None  # the daemon's request counter (None: an older daemon)
    sessions: tuple[SessionInfo, ...]


@dataclass(frozen=True)
class Rates:
    """What happened between two snapshots."""

    seconds: float
    requests_per_s: float | None
    prompt_tokens: int  # prompt tokens allocated
    hit_tokens: int  # of those, found in the prefix cache
    session_requests_per_s: dict[str, float]

    @property
    def hit_rate(self) -> float | None:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else None

    def to_dict(self) -> dict[str, Any]:
        return dict(seconds=self.seconds, requests_per_s=self.requests_per_s, prompt_tokens=self.prompt_tokens,
                    hit_tokens=self.hit_tokens, hit_rate=self.hit_rate,
                    session_requests_per_s=self.session_requests_per_s)


def take(client: Any) -> Snapshot:
    """One refresh's worth: the pool's stats and the sessions, without this client's own."""
    stats, counters = client.daemon_stats()
    try:
        sessions = tuple(s for s in client.sessions() if s.name != client.session_name)
    except UnknownOp:  # a daemon from before the sessions op
        sessions = ()
    return Snapshot(time.monotonic(), stats, counters.get("requests"), sessions)


def rates(prev: Snapshot, cur: Snapshot) -> Rates:
    dt = max(cur.at - prev.at, 1e-9)
    reqs = None
    if cur.requests is not None and prev.requests is not None:
        reqs = max(cur.requests - prev.requests - 2, 0) / dt  # less this view's own two requests
    before = {s.name: s.requests for s in prev.sessions}
    per = {s.name: (s.requests - before[s.name]) / dt for s in cur.sessions if s.name in before}
    return Rates(dt, reqs, cur.stats.prefix_query_tokens - prev.stats.prefix_query_tokens,
                 cur.stats.prefix_hit_tokens - prev.stats.prefix_hit_tokens, per)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + ("~" if width else "")


def usage_bar(st: PoolStats, width: int) -> str:
    """``[###::....]``: used, evictable (cached, reusable), free; ``width`` in all."""
    inner = max(width - 2, 1)
    total = max(st.total_blocks, 1)
    used = round(inner * st.used_blocks / total)
    ev = min(round(inner * st.evictable_blocks / total), inner - used)
    return "[" + "#" * used + ":" * ev + "." * (inner - used - ev) + "]"


def _n(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def lines(snap: Snapshot, r: Rates | None, endpoint: str, width: int, height: int) -> list[str]:
    """The screen as at most ``height`` lines of at most ``width - 1`` characters
    (the last column stays free: curses cannot write the bottom-right cell)."""
    w = max(width - 1, 1)
    st = snap.stats
    clock = time.strftime("%H:%M:%S")
    head_tail = f"  {clock}  q: quit"
    room = max(w - 13 - len(head_tail), 8)
    where = endpoint if len(endpoint) <= room else "~" + endpoint[len(endpoint) - room + 1 :]  # its tail
    pct = f" {100 * st.used_blocks / max(st.total_blocks, 1):5.1f}% used"
    out = ["kvpager top  " + where + head_tail, "usage " + usage_bar(st, max(w - 6 - len(pct), 3)) + pct]
    narrow = w < 100  # the same figures in more, shorter lines
    used = f"used {st.used_blocks} (shared {st.shared_blocks}, pinned {st.pinned_blocks})"
    cached = f"cached {st.cached_blocks} (evictable {st.evictable_blocks})"
    if narrow:
        out += [f"{used}  free {st.free_blocks}", f"{cached}  {human_bytes(st.bytes_per_block)}/block"]
    else:
        out.append(f"blocks {st.total_blocks}: {used}  {cached}  free {st.free_blocks}"
                   f"  ({human_bytes(st.bytes_per_block)} each)")
    if r is None:
        out.append("rates: measuring ...")
    else:
        req = "-" if r.requests_per_s is None else _n(r.requests_per_s)
        hit = "-" if r.hit_rate is None else f"{100 * r.hit_rate:.1f}%"
        out.append(f"last {r.seconds:.1f}s: {req} req/s  prefix hit {hit} of {r.prompt_tokens} "
                   + ("tokens" if narrow else "prompt tokens"))
    tokens = "" if narrow else f"  tokens {st.tokens_stored}"
    slots = f"{100 * st.slot_utilization:.1f}%" if st.token_slots_allocated else "-"  # (none allocated)
    out.append(f"seqs {st.num_sequences} ({st.swapped_sequences} swapped){tokens}"
               f"  slots used {slots}  host {st.host_free_blocks}/{st.host_total_blocks} free")
    over = sum(t.over_quota for t in st.tenants)
    out.append(f"tenants {max(st.num_tenants, len(st.tenants))} ({over} over quota)  sessions {len(snap.sessions)}"
               f"  {'hit' if narrow else 'all-time prefix hit'} {100 * st.prefix_hit_rate:.1f}%"
               + (" all-time" if narrow else ""))
    room = height - len(out) - 2  # a blank line and the sessions' header
    slack = room - len(snap.sessions) - 2  # rows the sessions leave, less the table's blank line and header
    if st.tenants and (room >= 6 and height >= 20 or slack >= 1):  # a tenants table where there is room for it
        # a third of the rows on a tall screen, else what the sessions leave (a 60x15 terminal showed
        # no tenants with rows to spare): the last row saying how many more where not all fit
        fit = max(room // 3, 2) if room >= 6 and height >= 20 else 0
        if slack > fit:
            fit = slack if slack >= len(st.tenants) else max(slack - 1, 1)
        shown = st.tenants[: min(len(st.tenants), fit)]
        out.append("")
        out.append(f"{'TENANT':<20} {'CACHED':>7} {'EVICT':>7} {'PINNED':>7} {'QUOTA':>7}")
        for t in shown:
            quota = "-" if t.quota is None else str(t.quota)
            out.append(f"{salt_label(t.salt, 20):<20} {t.cached_blocks:>7} {t.evictable_blocks:>7} "
                       f"{t.pinned_blocks:>7} {quota:>7}" + ("  over" if t.over_quota else ""))
        if len(st.tenants) > len(shown):
            out.append(f"... {len(st.tenants) - len(shown)} more tenants")
    out.append("")
    name_w = max(min(w - 44, 40), 6)
    out.append(f"{'SESSION':<8} {'PID':>8} {'CLIENT':<{name_w}} {'SEQS':>6} {'PINS':>5} {'REQ/S':>8}")
    room = height - len(out)
    sessions = sorted(snap.sessions, key=lambda s: (-s.sequences, s.name))
    shown = sessions if len(sessions) <= room else sessions[: max(room - 1, 0)]
    for s in shown:
        rate = "-" if r is None or s.name not in r.session_requests_per_s else _n(r.session_requests_per_s[s.name])
        pid = "-" if s.pid is None else str(s.pid)
        out.append(f"{s.name:<8} {pid:>8} {_fit(printable(s.client), name_w):<{name_w}} {s.sequences:>6} {s.pins:>5} {rate:>8}")
    if len(shown) < len(sessions):
        out.append(f"... {len(sessions) - len(shown)} more sessions")
    return [_fit(x, w) for x in out[:height]]


def run_screen(client: Any, interval: float, iterations: int) -> None:
    """The full-screen view until ``q`` (or Ctrl-C, or ``iterations`` refreshes)."""
    import curses

    def main(scr: Any) -> None:
        with contextlib.suppress(curses.error):  # a terminal without cursor visibility control
            curses.curs_set(0)
        scr.timeout(100)  # keys are read every 100 ms between refreshes
        prev, cur = None, take(client)
        done, next_at, dirty = 1, time.monotonic() + interval, True
        while True:
            if dirty:
                height, width = scr.getmaxyx()
                scr.erase()
                for y, text in enumerate(lines(cur, None if prev is None else rates(prev, cur),
                                               client.endpoint, width, height)):
                    with contextlib.suppress(curses.error):  # the window shrank under us: the next frame fits
                        scr.addstr(y, 0, text)
                scr.refresh()
                dirty = False
            key = scr.getch()
            if key in (ord("q"), ord("Q"), 27):
                return
            if key == curses.KEY_RESIZE:
                dirty = True
            if time.monotonic() >= next_at:
                if iterations and done >= iterations:
                    return
                prev, cur = cur, take(client)
                done, next_at, dirty = done + 1, time.monotonic() + interval, True

    with contextlib.suppress(KeyboardInterrupt):
        curses.wrapper(main)
