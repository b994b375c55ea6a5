"""`kvpager serve --quota / --max-pinned-blocks / --control-token-file` and the
control commands (pin, unpin, quota, pins, tenants, sessions) against it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from daemon_helpers import daemon_process, ipc_endpoint

from kvpager.cli import main
from kvpager.client import Client

CONTROL = "control-token-of-enough-length-42"
PROMPT = list(range(40))  # two full blocks of 16


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("ctl") / "control"
    token_file.write_text(CONTROL + "\n")
    endpoint, _ = ipc_endpoint()
    args = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32", "--blocks", "64",
            "--device", "cpu", "--quota", "tenant-a=1", "--quota", "=7", "--quota", "odd=name=3",
            "--max-pinned-blocks", "5", "--control-token-file", str(token_file)]
    with daemon_process(args, endpoint) as proc, Client(endpoint) as worker:
        [a] = worker.allocate([PROMPT], salt="tenant-a")
        worker.commit(a.seq_id)
        worker.free(a.seq_id)
        yield endpoint, worker, token_file, proc


def run(*args, env=None):
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_quotas_and_pin_cap_from_serve(daemon):
    endpoint, worker, *_ = daemon
    st = worker.stats()
    assert st.max_pinned_blocks == 5
    assert {t.salt: t.quota for t in st.tenants} == {"tenant-a": 1, None: 7, "odd=name": 3}
    code, out, _ = run("tenants", "--json", "--endpoint", endpoint)
    rows = {r["salt"]: r for r in json.loads(out)}
    assert code == 0 and rows["tenant-a"] == dict(salt="tenant-a", cached_blocks=2, evictable_blocks=2,
                                                  pinned_blocks=0, quota=1)
    code, out, _ = run("tenants", "--endpoint", endpoint)
    assert code == 0 and "tenant-a" in out and "over" in out  # 2 cached, quota 1


def test_pin_unpin_through_the_cli(daemon, tmp_path):
    endpoint, worker, token_file, _ = daemon
    tokens = tmp_path / "prompt.json"
    tokens.write_text(json.dumps(PROMPT))
    code, out, _ = run("pin", "--salt", "tenant-a", str(tokens), "--endpoint", endpoint,
                       "--control-token-file", str(token_file))
    assert code == 0 and out.strip() == "pinned 32 of 40 tokens"
    [p] = worker.pins()  # the daemon's pin: it outlived the command's session
    assert (p.owner, p.salt, p.num_tokens) == (None, "tenant-a", 32)
    code, out, _ = run("pins", "--json", "--endpoint", endpoint)
    assert json.loads(out) == [dict(owner=None, salt="tenant-a", num_tokens=32, count=1,
                                    block_table=list(p.block_table), pin_id=p.pin_id)]
    code, out, _ = run("pins", "--endpoint", endpoint)
    assert "daemon" in out and "tenant-a" in out
    code, out, _ = run("unpin", "--salt", "tenant-a", "-", "--endpoint", endpoint,
                       env={"KVPAGER_CONTROL_TOKEN": CONTROL}, )
    assert code == 2 and "token ids" in (out + _)  # empty stdin: not JSON
    result = CliRunner().invoke(main, ["unpin", "--salt", "tenant-a", "-", "--endpoint", endpoint],
                                input=json.dumps([PROMPT]), env={"KVPAGER_CONTROL_TOKEN": CONTROL})
    assert result.exit_code == 0 and result.stdout.strip() == "unpinned 32 tokens"
    assert worker.pins() == []
    code, out, err = run("unpin", "--salt", "tenant-a", str(tokens), "--endpoint", endpoint,
                         "--control-token-file", str(token_file))
    assert code == 2 and "no pin of the pool left" in err


def test_control_commands_without_the_token(daemon, tmp_path, monkeypatch):
    endpoint, worker, *_ = daemon
    monkeypatch.delenv("KVPAGER_CONTROL_TOKEN", raising=False)
    monkeypatch.delenv("KVPAGER_CONTROL_TOKEN_FILE", raising=False)
    tokens = tmp_path / "prompt.json"
    tokens.write_text(json.dumps([PROMPT]))
    for args in (["pin", str(tokens)], ["quota", "tenant-a", "4"]):
        code, _, err = run(*args, "--endpoint", endpoint)
        assert code == 6 and "control token" in err and err.splitlines()[-1].startswith("next:")
    assert worker.pins() == [] and {t.salt: t.quota for t in worker.stats().tenants}["tenant-a"] == 1


def test_quota_command(daemon):
    endpoint, worker, token_file, _ = daemon
    ctl = ["--endpoint", endpoint, "--control-token-file", str(token_file)]
    assert run("quota", "tenant-b", "12", *ctl)[:2] == (0, "tenant tenant-b: quota 12 blocks\n")
    assert {t.salt: t.quota for t in worker.stats().tenants}["tenant-b"] == 12
    assert run("quota", "tenant-b", "none", *ctl)[:2] == (0, "tenant tenant-b: no quota\n")
    assert "tenant-b" not in {t.salt for t in worker.stats().tenants}  # no blocks, no quota: gone
    code, _, err = run("quota", "tenant-b", "3.5", *ctl)
    assert code == 2 and "BLOCKS must be" in err
    # a dash-led value is an argument: "No such option '-1'" before, and a tenant '-c' unreachable
    code, _, err = run("quota", "tenant-b", "-1", *ctl)
    assert code == 2 and "BLOCKS must be" in err
    assert run("quota", "-c", "5", *ctl)[:2] == (0, "tenant -c: quota 5 blocks\n")
    assert {t.salt: t.quota for t in worker.stats().tenants}["-c"] == 5


def test_sessions_command(daemon):
    endpoint, worker, *_ = daemon
    code, out, _ = run("sessions", "--json", "--endpoint", endpoint)
    rows = json.loads(out)
    assert code == 0 and [r["name"] for r in rows] == [worker.session_name]  # not the command's own
    assert rows[0]["pid"] == worker._hello_args["pid"] and rows[0]["control"] is False
    code, out, _ = run("sessions", "--endpoint", endpoint)
    assert worker.session_name in out and "requests" in out


@pytest.mark.parametrize("args, match", [
    (["--quota", "tenant"], "SALT=BLOCKS"),
    (["--quota", "t=-1"], "SALT=BLOCKS"),
    (["--max-pinned-blocks", "-1"], "max-pinned-blocks"),
])
def test_bad_serve_control_options(args, match):
    result = CliRunner().invoke(main, ["serve", "--model", "tiny", "--blocks", "8", "--device", "cpu", *args])
    assert result.exit_code == 2 and match in result.output


def test_token_ids_on_stdin_are_read_bounded(monkeypatch):
    """``kvpager pin -`` read stdin whole (``< /dev/zero`` until memory ran out),
    where a file is read to at most 1 GiB: stdin is bounded the same way now."""
    import io

    import click

    from kvpager import control_cli

    monkeypatch.setattr(control_cli, "TOKENS_MOST", 64)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"[" + b"1, " * 40 + b"1]")))
    with pytest.raises(click.BadParameter, match="more than 64 bytes"):
        control_cli.read_prompts("-")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"[[1, 2, 3], [4]]")))
    assert control_cli.read_prompts("-") == [[1, 2, 3], [4]]
