"""Careless and hostile callers of the control plane, pins, tenants and
tensor-parallel ranks: salts UTF-8 cannot encode (embedded, through a `Client`
and the CLI's argv), quotas past int64 (every `stats` reply was unencodable) or
as NumPy integers, quota counts in digits `int` refuses (`kvpager quota`,
`serve --quota`), the control token's hint, salts and client names that carry
control characters (`kvpager tenants` / `sessions` / `top` and the daemon's
log); and, already right, wrong ranks and writes of all heads, and pins across
sessions' ends. Each a typed error with nothing changed, or the right answer."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest
from click.testing import CliRunner
from daemon_helpers import SMALL, running_server, subprocess_env

from kvpager import KVPool, PoolSpec
from kvpager.cli import main
from kvpager.client import Client
from kvpager.errors import InvalidArgument, LimitExceeded, NotOwner, NotPinned, OutOfBlocks
from kvpager.render import salt_label

CONTROL = "control-token-of-enough-length-42"
BS = SMALL.block_size
PROMPT = list(range(3 * BS + 5))
BAD_TEXT = "\udcff"  # what Python makes of the byte 0xff in argv or a file name: no UTF-8


def cache(c, tokens=PROMPT, salt=None) -> None:
    [a] = c.allocate([tokens], salt=salt)
    c.commit(a.seq_id)
    c.free(a.seq_id)


def run(*args, env=None):
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def server():
    with running_server(SMALL, heartbeat_timeout=30, control_token=CONTROL, max_pinned_blocks=10) as s:
        yield s


def test_a_salt_utf8_cannot_encode_is_invalid_argument(server):
    # Was UnicodeEncodeError: from the root key (embedded) and from msgpack (a Client, the CLI).
    pool = KVPool(SMALL)
    cache(pool)
    before = pool.stats()
    for call in (lambda: pool.allocate([PROMPT], salt=BAD_TEXT), lambda: pool.cached_tokens([PROMPT], BAD_TEXT),
                 lambda: pool.pin([PROMPT], BAD_TEXT), lambda: pool.unpin([PROMPT], BAD_TEXT),
                 lambda: pool.set_quota("a" + BAD_TEXT, 3), lambda: pool.allocate([PROMPT, PROMPT], ["x", BAD_TEXT])):
        with pytest.raises(InvalidArgument, match="UTF-8"):
            call()
    assert pool.stats() == before and pool.pins() == []
    pool.check_integrity()
    with Client(server.endpoint, control_token=CONTROL) as c:
        cache(c)
        before = c.stats()
        for call in (lambda: c.allocate([PROMPT], salt=BAD_TEXT), lambda: c.pin([PROMPT], BAD_TEXT),
                     lambda: c.set_quota(BAD_TEXT, 3), lambda: c.pin([PROMPT], [BAD_TEXT])):
            with pytest.raises(InvalidArgument, match="UTF-8"):
                call()
        assert c.stats() == before and c.pins() == [] and c.sequences() == []  # and the session goes on
        c.check_integrity()
    ep = ["--endpoint", server.endpoint]
    code, _, err = run("quota", BAD_TEXT, "5", *ep, env={"KVPAGER_CONTROL_TOKEN": CONTROL})
    assert code == 2 and "UTF-8" in err and err.startswith("error:")
    result = CliRunner().invoke(main, ["pin", "--salt", BAD_TEXT, "-", *ep], input=json.dumps(PROMPT),
                                env={"KVPAGER_CONTROL_TOKEN": CONTROL}, catch_exceptions=False)
    assert result.exit_code == 2 and "UTF-8" in result.stderr
    with Client(server.endpoint) as c:
        assert c.pins() == [] and all(t.quota is None for t in c.stats().tenants)


def test_quotas_past_int64_are_refused_and_numpy_integers_taken(server):
    pool = KVPool(SMALL)
    for blocks in (1 << 63, 1 << 70, -1, 2.0, True, np.float64(2), np.uint64(1 << 63)):
        with pytest.raises(InvalidArgument, match=r"quota must be a number of blocks in \[0, 2\*\*63\)"):
            pool.set_quota("x", blocks)
    assert pool.stats().tenants == ()
    pool.set_quota("x", np.int64(3))  # as a Client sends it (was refused by the embedded pool alone)
    pool.set_quota("y", (1 << 63) - 1)
    assert {t.salt: t.quota for t in pool.stats().tenants} == {"x": 3, "y": (1 << 63) - 1}
    assert type(pool.stats().tenants[0].quota) is int
    with Client(server.endpoint, control_token=CONTROL) as c:
        with pytest.raises(InvalidArgument):  # the serving process's own pool: was taken, and then...
            server.pool.set_quota("huge", 1 << 70)
        with pytest.raises(InvalidArgument, match="2\\*\\*63"):  # msgpack carries it; the pool refuses
            c.set_quota("huge", (1 << 64) - 1)
        with pytest.raises(InvalidArgument, match="integers in"):  # msgpack cannot carry it: said so
            c.set_quota("huge", 1 << 64)
        # ... every stats reply (kvpager stats, tenants, top) was "cannot send a int over the wire"
        assert "huge" not in {t.salt for t in c.stats().tenants}
        c.set_quota("big", np.int64((1 << 63) - 1))
        assert {t.salt: t.quota for t in c.stats().tenants}["big"] == (1 << 63) - 1
        c.set_quota("big", None)
        c.check_integrity()


def test_quota_counts_int_refuses_are_usage_errors(server, tmp_path):
    # str.isdigit() takes '²' and int() refuses it: a traceback from `kvpager quota` and `serve --quota`.
    env = {"KVPAGER_CONTROL_TOKEN": CONTROL}
    for blocks in ("²", "1²", "٣"):
        code, _, err = run("quota", "tenant-q", blocks, "--endpoint", server.endpoint, env=env)
        assert code == 2 and "BLOCKS must be" in err
        result = CliRunner().invoke(main, ["serve", "--model", "tiny", "--blocks", "8", "--device", "cpu",
                                           "--endpoint", f"ipc://{tmp_path}/q.sock", "--quota", f"t={blocks}"],
                                    catch_exceptions=False)
        assert result.exit_code == 2 and "SALT=BLOCKS" in result.output
    with Client(server.endpoint) as c:
        assert "tenant-q" not in {t.salt for t in c.stats().tenants}


def test_serve_refuses_a_quota_past_int64_at_start(tmp_path):
    # Was taken: the daemon served, and every stats reply failed to encode.
    endpoint = f"ipc://{tmp_path}/big.sock"
    proc = subprocess.run([sys.executable, "-m", "kvpager", "serve", "--model", "tiny", "--blocks", "8", "--device",
                           "cpu", "--endpoint", endpoint, "--quota", "x=99999999999999999999"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "quota must be a number of blocks" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_refused_control_token_gets_the_control_tokens_hint(server, tmp_path, monkeypatch):
    # Was "the daemon has a token: set KVPAGER_TOKEN...", of a daemon without one.
    monkeypatch.delenv("KVPAGER_CONTROL_TOKEN", raising=False)
    monkeypatch.delenv("KVPAGER_CONTROL_TOKEN_FILE", raising=False)
    wrong = tmp_path / "wrong"
    wrong.write_text("a-wrong-control-token-of-length\n")
    wrong.chmod(0o600)
    ep = ["--endpoint", server.endpoint]
    for args in (["quota", "t", "4", *ep], ["quota", "t", "4", "--control-token-file", str(wrong), *ep]):
        code, _, err = run(*args)
        hint = err.splitlines()[-1]
        assert code == 6 and hint.startswith("next:") and "--control-token-file" in hint, err
        assert "KVPAGER_TOKEN," not in hint
    with running_server(SMALL) as plain:  # a daemon without a control token: the session opens, the op says why
        code, _, err = run("quota", "t", "4", "--endpoint", plain.endpoint, env={"KVPAGER_CONTROL_TOKEN": CONTROL})
        assert code == 6 and "no control token" in err and "control-token-file" in err.splitlines()[-1]
    with Client(server.endpoint) as c:
        assert "t" not in {t.salt for t in c.stats().tenants}


HOSTILE_SALT = "ten\x00ant\nforged-tenant    99    99    99    -"
HOSTILE_NAME = "evil\x00\x1b[2J\nforged"


def _printable(text: str) -> bool:
    return all(line.isprintable() for line in text.splitlines())


def test_salts_and_client_names_cannot_forge_or_break_the_operators_views(server, caplog):
    caplog.set_level(logging.INFO, logger="kvpager.server")
    with Client(server.endpoint, name=HOSTILE_NAME) as w:
        cache(w, salt=HOSTILE_SALT)
        w.pin([PROMPT], HOSTILE_SALT)
        ep = ["--endpoint", server.endpoint]
        code, out, _ = run("tenants", *ep)
        assert code == 0 and _printable(out) and "forged-tenant" in out
        assert len(out.splitlines()) == 2 + len(w.stats().tenants)  # no row of its own making
        code, out, _ = run("sessions", *ep)
        assert code == 0 and _printable(out) and len(out.splitlines()) == 3
        code, out, _ = run("pins", *ep)
        assert code == 0 and _printable(out) and len(out.splitlines()) == 2 + len(w.pins())
        code, out, _ = run("top", "--iterations", "1", *ep)  # no terminal: frames as text
        assert code == 0 and _printable(out) and "evil\\x00\\x1b[2J\\nforged" in out
        assert salt_label(HOSTILE_SALT, 13) == "ten\\x00ant..."
        # a str salt that read as the default tenant, or as bytes, is quoted: each label names one tenant
        labels = [salt_label(s) for s in (None, "", "-", b"\xab", "0xab", '"0xab"', "user-7", b"-")]
        assert labels[:2] == ["-", "-"] and len(set(labels[1:])) == 7, labels
        assert labels[2:] == ['"-"', "0xab", '"0xab"', '""0xab""', "user-7", "0x2d"]
        # a backslash escaped too: a newline and a backslash then "n" name two tenants
        assert salt_label("team\nA") == "team\\nA" and salt_label("team\\nA") == "team\\\\nA"
        # curses refuses NUL: `kvpager top` on a terminal died with "embedded null character"
        assert _top_on_a_terminal(server.endpoint) == 0
        w.unpin([PROMPT], HOSTILE_SALT)
    opened = [r.getMessage() for r in caplog.records if "opened by evil" in r.getMessage()]
    assert opened and all(m.isprintable() for m in opened)  # one log line, not a forged second
    assert all(m.isprintable() for m in (r.getMessage() for r in caplog.records) if "evil" in m)


def _top_on_a_terminal(endpoint: str) -> int:
    """`kvpager top` for two refreshes on a pseudo-terminal of 40 x 120; its exit status."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = dict(subprocess_env(), TERM="xterm", LINES="40", COLUMNS="120")
    proc = subprocess.Popen([sys.executable, "-m", "kvpager", "top", "--endpoint", endpoint, "--interval", "0.1",
                             "--iterations", "2"], stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.05)[0]:
                try:
                    os.read(master, 65536)  # drained: the child never blocks on a full terminal
                except OSError:
                    break
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


# -- already right: kept as they are -----------------------------------------------------

def test_ranks_refuse_wrong_numbers_all_heads_and_whole_pool_kv_ops():
    spec = PoolSpec(num_layers=2, num_kv_heads=4, head_dim=16, num_blocks=32, block_size=8, dtype="float32",
                    num_host_blocks=8)
    every_head = np.ones((10, 4, 16), np.float32)
    with running_server(spec, devices=["cpu", "cpu"], heartbeat_timeout=30) as srv:
        for rank in (2, 5):
            with pytest.raises(InvalidArgument, match=r"rank must be an int in \[0, 2\)"):
                Client(srv.endpoint, rank=rank, heartbeat=False)
        for rank in (-1, True, 1.0):
            with pytest.raises(InvalidArgument, match="rank must be an int"):
                Client(srv.endpoint, rank=rank, heartbeat=False)
        assert len(srv.sessions) == 0
        with Client(srv.endpoint) as driver, Client(srv.endpoint, rank=0) as r0, Client(srv.endpoint, rank=1) as r1:
            [a] = r0.allocate([list(range(10))])
            for call in (lambda: r0.write(0, a.slots, every_head, every_head),
                         lambda: r0.remote_write(0, a.slots, every_head, every_head)):
                with pytest.raises(InvalidArgument, match=r"shape \(10, 2, 16\)"):
                    call()
            for call in (lambda: driver.attend(0, [a.seq_id], np.ones((1, 4, 16), np.float32)), lambda: driver.kv(0)):
                with pytest.raises(InvalidArgument, match=r"Client\(rank=r\)"):  # no rank named: no K/V
                    call()
            with pytest.raises(NotOwner):  # another session's sequence (a rank worker's own, here)
                driver.remote_write(0, a.slots, every_head[:, :2], every_head[:, :2])
            r1.close()  # one rank's session ends: the others' sequences stay
            assert driver.sequences()[0].seq_id == a.seq_id
            driver.check_integrity()
    pool = KVPool(spec, devices=["cpu", "cpu"])
    [a] = pool.allocate([list(range(10))])
    for what, call in (("write", lambda: pool.write(0, a.slots, every_head, every_head)),
                       ("plan", lambda: pool.plan([a.seq_id])), ("kv", lambda: pool.kv(0))):
        with pytest.raises(InvalidArgument, match=f"{what} through pool.rank"):
            call()
    for r in (-1, 2, True, 1.0, np.array(1)):
        with pytest.raises(InvalidArgument, match="rank must be an int"):
            pool.rank(r)
    pool.check_integrity()


def test_pins_uncached_twice_across_salts_and_session_ends(server):
    with Client(server.endpoint) as a, Client(server.endpoint, control_token=CONTROL) as ctl:
        assert a.pin([list(range(500, 540))]) == [0] and a.pins() == []  # nothing cached: no pin
        cache(a, salt=b"t")
        assert a.pin([PROMPT], "t") == [3 * BS]  # "t" and b"t": one tenant, one prefix
        assert a.unpin([PROMPT], b"t") == [3 * BS]
        with pytest.raises(NotPinned):
            a.unpin([PROMPT], "t")
        assert ctl.pin([PROMPT], "t", keep=True) == [3 * BS]
        a.pin([PROMPT], "t")
        ctl.set_quota("t", 0)  # under what it holds: pinned blocks are never victims
        b = Client(server.endpoint)
        with pytest.raises(OutOfBlocks):  # every block taken, every evictable one evicted: not the pinned
            for i in range(SMALL.num_blocks):
                b.allocate([list(range(1000 + 100 * i, 1000 + 100 * i + 2 * BS))])
        assert a.cached_tokens([PROMPT], "t") == [3 * BS]
        b.close()
        a.close()  # a's pin goes with its session; the kept pin stays
        ctl.set_quota("t", None)
        [p] = ctl.pins()
        assert p.owner is None and p.count == 1
        assert ctl.unpin([PROMPT], "t", keep=True) == [3 * BS] and ctl.pins() == []
        ctl.check_integrity()


def test_a_ranked_pool_releases_every_rank_when_one_fails_to_close():
    """Closing a pool of ranks stopped at the first rank whose close raised,
    leaving the others' memory held."""
    spec = PoolSpec(num_layers=2, num_kv_heads=4, head_dim=8, num_blocks=16, block_size=16, dtype="float32")
    pool = KVPool(spec, devices=["cpu", "cpu"])
    first, second = pool.backend.ranks

    def broken() -> None:
        raise RuntimeError("rank 0 failed to close")

    first.close = broken
    with pytest.raises(RuntimeError, match="rank 0"):
        pool.close()
    assert second.closed


def test_a_rank_is_not_closed_alone():
    """`pool.rank(r).close()` was an AttributeError; it now says to close the pool,
    and the pool and its ranks go on."""
    spec = PoolSpec(num_layers=2, num_kv_heads=4, head_dim=8, num_blocks=16, block_size=16, dtype="float32")
    pool = KVPool(spec, devices=["cpu", "cpu"])
    with pytest.raises(InvalidArgument, match=r"pool.close\(\)"):
        pool.rank(1).close()
    [a] = pool.allocate([list(range(10))])
    pool.rank(1).write(0, a.slots, np.ones((10, 2, 8), np.float32), np.ones((10, 2, 8), np.float32))
    pool.close()


def test_an_operator_looks_at_a_daemon_whose_sessions_are_all_taken():
    """Every session taken (a leak of clients): `kvpager sessions` needs one too, and
    was refused with "see `kvpager --help`", so nobody could see who held them. A
    session with the control token may open `CONTROL_SESSIONS` past the limit: the
    command takes the environment's token there, and without one says how to look."""
    from kvpager.limits import Limits
    from kvpager.server_ops import CONTROL_SESSIONS

    with running_server(SMALL, heartbeat_timeout=30, control_token=CONTROL, limits=Limits(sessions=2)) as s:
        held = [Client(s.endpoint, name=f"leaky-{i}") for i in range(2)]
        try:
            with pytest.raises(LimitExceeded, match="control token"):
                Client(s.endpoint)  # (an ordinary client is refused as before, told why)
            code, _, err = run("sessions", "--endpoint", s.endpoint, env={"KVPAGER_CONTROL_TOKEN": ""})
            assert code == 2 and "KVPAGER_CONTROL_TOKEN" in err and "--max-sessions" in err
            code, out, _ = run("sessions", "--endpoint", s.endpoint, "--json",
                               env={"KVPAGER_CONTROL_TOKEN": CONTROL})
            assert code == 0 and {x["client"] for x in json.loads(out)} >= {"leaky-0", "leaky-1"}
            control = [Client(s.endpoint, control_token=CONTROL) for _ in range(CONTROL_SESSIONS)]
            with pytest.raises(LimitExceeded, match="taken too"):
                Client(s.endpoint, control_token=CONTROL)
            for c in control:
                c.close()
        finally:
            for c in held:
                c.close()


def test_a_full_daemon_without_a_control_token_says_no_session_is_kept_for_an_operator():
    """Every session taken on a daemon without a control token: the refusal told
    the operator to send the control token, which this daemon does not have, so
    no advice it gave could be followed. It says that no session is kept, and how
    to keep some."""
    from kvpager.limits import Limits

    with running_server(SMALL, heartbeat_timeout=30, limits=Limits(sessions=1)) as s, \
            Client(s.endpoint, name="only"):
        with pytest.raises(LimitExceeded, match="this daemon has no control token, so no session is kept") as e:
            Client(s.endpoint)
        assert "--control-token-file" in str(e.value) and "may open" not in str(e.value)
        code, _, err = run("sessions", "--endpoint", s.endpoint, env={"KVPAGER_CONTROL_TOKEN": ""})
        assert code == 2 and "no control token" in err and "--max-sessions" in err
