"""`kvpager top`: the full-screen view in pseudo-terminals of 60x15 and 200x50,
read back through a terminal emulator (pyte); rates; the frames without a
terminal and with --json."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import pytest
from daemon_helpers import running_server, subprocess_env

from kvpager import top
from kvpager.client import Client
from kvpager.types import PoolStats, SessionInfo, TenantUsage

pyte = pytest.importorskip("pyte")  # a terminal emulator (the test extra)


class Terminal:
    """``argv`` on a pseudo-terminal of ``rows`` x ``cols``, its output fed to a
    pyte screen of the same size."""

    def __init__(self, argv: list[str], rows: int, cols: int):
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = dict(subprocess_env(), TERM="xterm", LINES=str(rows), COLUMNS=str(cols))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.master = master

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    return
                if not data:
                    return
                self.stream.feed(data)

    def wait_for(self, pred, timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump(0.1)
            if pred(self.screen.display):
                return True
            if self.proc.poll() is not None:
                self.pump(0.2)
                return pred(self.screen.display)
        return False

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


@pytest.fixture(scope="module")
def busy_daemon():
    with running_server(heartbeat_timeout=30) as server:
        workers = [Client(server.endpoint, name=f"worker-with-a-long-client-name-{i}") for i in range(3)]
        prompt = list(range(48))
        [a] = workers[0].allocate([prompt], salt="tenant-a")
        workers[0].commit(a.seq_id)
        workers[1].allocate([prompt + [1], prompt + [2]], salt="tenant-a")
        workers[2].pin([prompt], salt="tenant-a")
        yield server, workers
        for w in workers:
            w.close()


@pytest.mark.parametrize("rows, cols", [(15, 60), (50, 200)])
def test_top_renders_without_wrapping(busy_daemon, rows, cols):
    server, workers = busy_daemon
    term = Terminal([sys.executable, "-m", "kvpager", "top", "--endpoint", server.endpoint, "--interval", "0.3"],
                    rows, cols)
    try:
        # Wait for the second frame: the one with rates.
        assert term.wait_for(lambda d: any(x.startswith("last ") for x in d)), "\n".join(term.screen.display)
        screen = [line.rstrip() for line in term.screen.display]
        assert len(screen) == rows and all(len(line) <= cols - 1 for line in screen)  # the last column stays free
        # Each line whole on its own row: a line that wrapped would push the next one down.
        st = workers[0].stats()
        assert (st.used_blocks, st.shared_blocks, st.pinned_blocks, st.num_sequences) == (5, 3, 3, 3)
        narrow = [f"used 5 (shared 3, pinned 3)  free {st.free_blocks}", "cached 3 (evictable 0)  8.0 KiB/block"]
        wide = [f"blocks 95: used 5 (shared 3, pinned 3)  cached 3 (evictable 0)  free {st.free_blocks}  (8.0 KiB"]
        expect = ["kvpager top  ", "usage [", *(narrow if cols < 100 else wide), "last 0.", "seqs 3 (0 swapped)",
                  "tenants 1 (0 over quota)  sessions 3"]
        for line, start in zip(screen, expect):
            assert line.startswith(start), (line, start)
        assert screen[0].endswith("q: quit") and ("ipc://" in screen[0] or "kv.sock" in screen[0])
        assert screen[1].endswith("% used") and screen[1].count("[") == screen[1].count("]") == 1
        assert "req/s  prefix hit" in screen[len(expect) - 3]
        header = next(i for i, x in enumerate(screen) if x.startswith("SESSION"))
        rows_shown = [x.split() for x in screen[header + 1 :] if x]
        by_name = {r[0]: r for r in rows_shown}
        for w in workers:  # every session: name, pid, its client name (cut to fit), seqs, pins
            r = by_name[w.session_name]
            assert r[1] == str(os.getpid()) and r[2].startswith("worker-with")
        assert by_name[workers[1].session_name][-3:-1] == ["2", "0"]
        assert by_name[workers[2].session_name][-3:-1] == ["0", "1"]
        if rows >= 20:  # room for the tenants table
            assert any(x.startswith("tenant-a") for x in screen) and any(x.startswith("TENANT") for x in screen)
            assert any("worker-with-a-long-client-name-1" in x for x in screen)  # wide: names whole
        term.send(b"q")
        assert term.proc.wait(10) == 0
    finally:
        term.close()


def test_top_fits_a_tiny_terminal_and_quits_on_escape(busy_daemon):
    server, _ = busy_daemon
    term = Terminal([sys.executable, "-m", "kvpager", "top", "--endpoint", server.endpoint], 6, 30)
    try:
        assert term.wait_for(lambda d: d[0].startswith("kvpager top"))
        assert all(len(x.rstrip()) <= 29 for x in term.screen.display)
        term.send(b"\x1b")
        assert term.proc.wait(10) == 0
    finally:
        term.close()


def test_top_ends_after_iterations_in_a_terminal(busy_daemon):
    server, _ = busy_daemon
    term = Terminal([sys.executable, "-m", "kvpager", "top", "--endpoint", server.endpoint, "--interval", "0.1",
                     "--iterations", "3"], 24, 80)
    try:
        term.pump(0.5)
        assert term.proc.wait(20) == 0
    finally:
        term.close()


def stats(**kw) -> PoolStats:
    base = dict(total_blocks=100, free_blocks=50, evictable_blocks=20, used_blocks=30, shared_blocks=0,
                cached_blocks=25, num_sequences=3, swapped_sequences=0, host_total_blocks=0, host_free_blocks=0,
                prefix_query_tokens=0, prefix_hit_tokens=0, tokens_stored=0, token_slots_allocated=0,
                block_size=16, bytes_per_block=1024)
    return PoolStats(**{**base, **kw})


def session(name, requests, **kw):
    return SessionInfo(name, "w", 1, kw.get("sequences", 0), 0, requests, 1.0, 0.0, False)


def test_rates_over_an_interval():
    a = top.Snapshot(10.0, stats(prefix_query_tokens=100, prefix_hit_tokens=40), 1000,
                     (session("s1", 10), session("s2", 5)))
    b = top.Snapshot(12.0, stats(prefix_query_tokens=300, prefix_hit_tokens=190), 1402,
                     (session("s1", 210), session("s3", 7)))
    r = top.rates(a, b)
    assert r.seconds == 2.0 and r.requests_per_s == 200.0  # 402 less this view's own 2, over 2 s
    assert (r.prompt_tokens, r.hit_tokens, r.hit_rate) == (200, 150, 0.75)
    assert r.session_requests_per_s == {"s1": 100.0}  # s3 is new: no rate yet
    idle = top.rates(b, top.Snapshot(13.0, b.stats, None, ()))
    assert idle.hit_rate is None and idle.requests_per_s is None


def test_usage_bar_counts_used_evictable_and_free():
    assert top.usage_bar(stats(), 12) == "[###::.....]"  # 10 cells: 30% used, 20% evictable
    bar = top.usage_bar(stats(used_blocks=100, evictable_blocks=0, free_blocks=0), 22)
    assert bar == "[" + "#" * 20 + "]"
    assert top.usage_bar(stats(used_blocks=0, evictable_blocks=0, free_blocks=100), 7) == "[.....]"


def test_lines_fit_every_size_and_cut_sessions_to_the_height():
    many = tuple(session(f"s{i}", i, sequences=i) for i in range(40))
    tenants = tuple(TenantUsage(f"t{i}", 5, 1, 0, 2 if i % 2 else None) for i in range(10))
    snap = top.Snapshot(1.0, stats(tenants=tenants), 5, many)
    for width in (20, 40, 60, 80, 200):
        for height in (3, 10, 15, 30, 50):
            out = top.lines(snap, None, "ipc:///" + "x" * 100, width, height)
            assert len(out) <= height and all(len(x) <= width - 1 for x in out)
    out = top.lines(snap, None, "ipc:///run/k.sock", 80, 15)
    assert out[-1] == "... 35 more sessions" and out[-7].startswith("SESSION")
    assert out[-6].split()[0] == "s39"  # the sessions holding the most sequences first
    tall = top.lines(snap, None, "ipc:///run/k.sock", 200, 50)
    assert tall[5].startswith("tenants 10 (5 over quota)") and sum(x[:2] in ("t1", "t3") for x in tall) == 2
    assert sum(x.endswith("  over") for x in tall) == 5 and not any("more tenants" in x for x in tall)
    mid = top.lines(snap, None, "ipc:///run/k.sock", 200, 30)  # 22 rows left: a third to tenants
    assert "... 3 more tenants" in mid and mid[-1] == "... 29 more sessions" and len(mid) == 30


def test_a_small_terminal_shows_the_tenants_in_the_rows_the_sessions_leave():
    """A 60x15 terminal (the size the README promises readable) showed no tenants
    table at all, with six rows left blank: tenants took rows only on screens 20
    rows tall. The rows the sessions leave are theirs now."""
    one = (session("s0", 1, sequences=1),)
    three = tuple(TenantUsage(f"t{i}", 5, 1, 0, None) for i in range(3))
    out = top.lines(top.Snapshot(1.0, stats(tenants=three), 5, one), None, "ipc:///run/k.sock", 60, 15)
    assert len(out) == 15 and sum(x.split()[0] in ("t0", "t1", "t2") for x in out if x) == 3
    assert out[-2].startswith("SESSION") and out[-1].split()[0] == "s0"
    two = (*one, session("s1", 1))
    eight = tuple(TenantUsage(f"t{i}", 5, 1, 0, None) for i in range(8))
    out = top.lines(top.Snapshot(1.0, stats(tenants=eight), 5, two), None, "ipc:///run/k.sock", 60, 15)
    assert len(out) == 15 and "... 7 more tenants" in out and out[-3].startswith("SESSION")  # the sessions whole


def test_top_without_a_terminal_prints_frames_and_json(busy_daemon):
    server, workers = busy_daemon
    out = subprocess.run([sys.executable, "-m", "kvpager", "top", "--endpoint", server.endpoint, "--iterations", "2",
                          "--interval", "0.1"], capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    text = out.stdout.splitlines()
    heads = [i for i, x in enumerate(text) if x.startswith("kvpager top")]
    assert len(heads) == 2 and heads[0] == 0
    assert "rates: measuring ..." in text[: heads[1]] and any("req/s" in x for x in text[heads[1] :])
    out = subprocess.run([sys.executable, "-m", "kvpager", "top", "--json", "--endpoint", server.endpoint,
                          "--iterations", "2", "--interval", "0.1"], capture_output=True, text=True, timeout=60,
                         env=subprocess_env())
    first, second = (json.loads(x) for x in out.stdout.splitlines())
    assert first["rates"] is None and first["sequences"] == 3 and first["stats"]["pinned_blocks"] == 3
    assert second["rates"]["seconds"] > 0 and {s["name"] for s in second["sessions"]} == {
        w.session_name for w in workers}


def test_top_outlives_an_interval_past_the_heartbeat_timeout():
    """`kvpager top --interval 60 >> usage.log`: its session beat only with its requests,
    and one refresh interval past the daemon's heartbeat timeout (5 s by default) ended it:
    the second frame was "this session is not open" and exit code 5."""
    with running_server(heartbeat_timeout=0.5) as server:
        out = subprocess.run([sys.executable, "-m", "kvpager", "top", "--json", "--endpoint", server.endpoint,
                              "--iterations", "3", "--interval", "1.2"], capture_output=True, text=True, timeout=60,
                             env=subprocess_env())
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.splitlines()) == 3
        assert not server.sessions.sessions  # (its session ended with it: bye)
