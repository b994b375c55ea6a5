"""The inspection commands against a running daemon (CPU backend), and without one."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from daemon_helpers import ipc_endpoint, running_server

from kvpager.cli import main
from kvpager.client import Client


@pytest.fixture(scope="module")
def daemon():
    with running_server() as server:
        client = Client(server.endpoint, timeout=10)
        prompt = list(range(40))
        [a] = client.allocate([prompt])
        client.commit(a.seq_id)
        [b] = client.allocate([prompt + [1, 2, 3]])
        client.fork(b.seq_id, 2)
        yield server, client, a, b
        client.close()


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_stats_json_matches_the_pool(daemon):
    server, client, a, b = daemon
    code, out = invoke("stats", "--json", "--endpoint", server.endpoint)
    assert code == 0
    data = json.loads(out)
    assert data == client.stats().to_dict()
    assert data["num_sequences"] == 4 and data["prefix_hit_tokens"] == 32 and data["shared_blocks"] == 3


def test_stats_table(daemon):
    server, *_ = daemon
    code, out = invoke("stats", "--endpoint", server.endpoint)
    assert code == 0
    assert "prefix hit rate" in out and "sequences        4 (0 swapped)" in out
    st = daemon[1].stats()
    assert f"slot utilization {100 * st.slot_utilization:.1f}% ({st.tokens_stored} tokens in " in out


def test_stats_of_an_empty_pool_claim_no_slot_utilization():
    """No slots allocated: no share of them holds tokens ("100.0% (0 tokens in 0
    slots)" before), in `stats` and in `top`'s frame alike."""
    from kvpager import top as view

    with running_server() as server:
        code, out = invoke("stats", "--endpoint", server.endpoint)
        assert code == 0 and "slot utilization -  (no slots allocated)" in out, out
        with Client(server.endpoint, timeout=10) as client:
            frame = "\n".join(view.lines(view.take(client), None, server.endpoint, 120, 40))
    assert "slots used -" in frame and "100.0%" not in frame, frame


def test_seqs(daemon):
    server, client, a, b = daemon
    code, out = invoke("seqs", "--json", "--endpoint", server.endpoint)
    assert code == 0
    rows = json.loads(out)
    assert [r["seq_id"] for r in rows] == [s.seq_id for s in client.sequences()]
    row_b = next(r for r in rows if r["seq_id"] == b.seq_id)
    assert row_b["block_table"] == list(b.block_table) and row_b["owner"] == client.session_name
    assert row_b["state"] == "resident" and row_b["num_tokens"] == 43
    code, out = invoke("seqs", "--endpoint", server.endpoint)
    assert code == 0 and "block table" in out and client.session_name in out and client.session not in out


def test_seqs_of_a_session_or_a_process_and_at_most_a_limit():
    """`kvpager seqs` printed every sequence of the pool (6.4 MB at 100,000, ~9 s):
    ``--session`` / ``--pid`` keep one session's or process's, ``--limit`` the first
    ones, asking the daemon no further than it needs."""
    from kvpager.protocol_ops import SEQUENCES_PAGE

    with running_server() as server, Client(server.endpoint, timeout=10, map_pool=False) as one, \
            Client(server.endpoint, timeout=10, map_pool=False) as two:
        [a] = one.allocate([[1, 2, 3]])
        mine = [a.seq_id, *one.fork(a.seq_id, SEQUENCES_PAGE + 9)[0]]
        theirs = [b.seq_id for b in two.allocate([[4, 5]] * 3)]

        def rows(*args):
            code, out = invoke("seqs", "--json", "--endpoint", server.endpoint, *args)
            assert code == 0, out
            return [r["seq_id"] for r in json.loads(out)]

        before = server.requests
        assert rows("--session", two.session_name, "--limit", "1") == theirs[:1]
        assert server.requests - before <= 3  # (the daemon picks a session's out: not a page of 1 each)
        assert rows("--session", two.session_name) == theirs
        assert rows("--session", two.session_name, "--session", one.session_name) == sorted(mine + theirs)
        assert rows("--session", two.session_name, "--session", one.session_name, "--limit", "5") == \
            sorted(mine + theirs)[:5]
        assert rows("--session", "nobody") == []
        assert rows("--pid", str(os.getpid()), "--limit", "3") == sorted(mine + theirs)[:3]
        before = server.requests
        assert rows("--limit", "2") == sorted(mine + theirs)[:2]
        asked_two = server.requests - before
        before = server.requests
        assert len(rows()) == len(mine) + len(theirs)
        assert asked_two < server.requests - before  # (a page of 2, not every page)
        code, out = invoke("seqs", "--endpoint", server.endpoint, "--limit", "2")
        assert code == 0 and "(the first 2, more not shown: --limit)" in out and len(out.splitlines()) == 5, out
        for args in (["--limit", "3", "--session", two.session_name], ["--limit", str(len(mine) + 3)]):
            code, out = invoke("seqs", "--endpoint", server.endpoint, *args)
            assert code == 0 and "more not shown" not in out, out  # (no more than shown)


def test_blocks_map_shows_shared_runs(daemon):
    server, client, a, b = daemon
    code, out = invoke("blocks", "--json", "--endpoint", server.endpoint)
    assert code == 0
    data = json.loads(out)
    bm = client.blocks()
    assert data["ref_cnt"] == bm.ref_cnt.tolist()
    assert data["state"][0] == "null"
    # a, b and b's two children share the two full prompt blocks: ref 4 each.
    shared_blocks = [i for i, r in enumerate(data["ref_cnt"]) if r == 4]
    assert shared_blocks == sorted(a.block_table[:2])
    lo, hi = shared_blocks
    expected = [dict(start=lo, length=2, ref=4)] if hi == lo + 1 else [
        dict(start=lo, length=1, ref=4), dict(start=hi, length=1, ref=4)]
    assert [r for r in data["shared_runs"] if r["ref"] == 4] == expected
    code, out = invoke("blocks", "--endpoint", server.endpoint, "--width", "32")
    assert code == 0 and out.splitlines()[0].split()[1][0] == "0"  # block 0: null
    glyphs = "".join(line.split()[1] for line in out.splitlines() if line[:8].strip().isdigit())
    assert glyphs[a.block_table[0]] == "4" and glyphs.count("4") == 2


def test_check_passes_and_exits_zero(daemon):
    server, *_ = daemon
    code, out = invoke("check", "--endpoint", server.endpoint)
    assert code == 0 and out.startswith("ok")
    code, out = invoke("check", "--json", "--endpoint", server.endpoint)
    assert json.loads(out) == {"ok": True}


def test_top_runs_a_bounded_number_of_refreshes(daemon):
    server, *_ = daemon
    code, out = invoke("top", "--json", "--iterations", "2", "--interval", "0.01", "--endpoint", server.endpoint)
    assert code == 0
    lines = [json.loads(x) for x in out.splitlines()]
    assert len(lines) == 2 and lines[0]["stats"]["num_sequences"] == 4


@pytest.mark.parametrize("cmd", ["stats", "seqs", "blocks", "check", "top"])
def test_no_daemon_gives_one_line_and_next_command(cmd):
    endpoint, _ = ipc_endpoint()
    result = CliRunner().invoke(main, [cmd, "--endpoint", endpoint])
    assert result.exit_code == 3
    err = result.stderr if hasattr(result, "stderr") else result.output
    lines = [x for x in err.splitlines() if x]
    assert lines[0].startswith("error: no kvpager daemon at " + endpoint)
    assert lines[1].startswith("next: start one with `kvpager serve`")


def test_check_fails_with_exit_code_one_on_a_broken_pool():
    with running_server() as server, Client(server.endpoint, timeout=10) as c:
        [a] = c.allocate([[1, 2, 3]])
        # Corrupt the daemon's allocator on purpose (white-box) to see the failure path.
        server.pool.manager.pool.ref_cnt[a.block_table[0]] += 1
        code, out = invoke("check", "--endpoint", server.endpoint)
        assert code == 1 and "FAILED" in out and "ref_cnt 2" in out
        server.pool.manager.pool.ref_cnt[a.block_table[0]] -= 1


def test_a_check_told_to_wait_past_its_timeout_says_so():
    """The daemon asked the check to wait longer than the command's --timeout: the
    hint said only "see `kvpager --help`"."""
    import time

    with running_server() as server:
        server._check_took, server._check_after = 10.0, time.monotonic() + 100.0  # (as after a 10 s check)
        result = CliRunner().invoke(main, ["check", "--endpoint", server.endpoint, "--timeout", "2"])
    assert result.exit_code == 2, result.output
    assert "try again in" in result.output and "holds checks to a share of its time" in result.output, result.output
