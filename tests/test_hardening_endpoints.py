"""Issue 11, endpoints and input: TCP only with a token (required beyond
loopback), an ipc:// endpoint that never removes what is not a socket, and a
one-line error for every bad command-line or environment input. Each test is
an attack that once worked against a CPU daemon; bounded waits, free endpoints."""

from __future__ import annotations

import subprocess
import sys

import pytest
from daemon_helpers import SMALL, Raw, free_tcp_endpoint, req, running_server, subprocess_env

from kvpager.client import Client
from kvpager.errors import InvalidArgument, Unauthorized
from kvpager.server import Server

TOKEN = "a-test-token-of-enough-length-0123"


def test_tcp_with_a_token():
    """D7: over loopback TCP any local user could read and write others' data."""
    with running_server(SMALL, endpoint=free_tcp_endpoint(), token=TOKEN) as server:
        for token in (None, "", "wrong-token-wrong-token"):
            with pytest.raises(Unauthorized, match="token"):
                Client(server.endpoint, token=token, heartbeat=False)
        raw = Raw(server.endpoint)
        try:
            for rid, op in enumerate(("stats", "sequences", "blocks", "check", "tables", "cached_tokens")):
                args = {"seq_ids": [1]} if op == "tables" else {"prompts": [[1]]} if op == "cached_tokens" else {}
                assert raw.send(req(rid, op, args))[2]["code"] == "unauthorized"
        finally:
            raw.close()
        with Client(server.endpoint, token=TOKEN) as c:
            [a] = c.allocate([[1, 2, 3]])
            assert c.sequence(a.seq_id).num_tokens == 3
    # on loopback a token is optional
    with running_server(SMALL, endpoint=free_tcp_endpoint()) as server, Client(server.endpoint) as c:
        c.stats()


def test_a_token_is_required_beyond_loopback(monkeypatch):
    monkeypatch.delenv("KVPAGER_TOKEN", raising=False)
    for endpoint in ("tcp://0.0.0.0:0", "tcp://*:0"):
        with pytest.raises(InvalidArgument, match="token"):
            Server.create(SMALL, endpoint).bind()
    with running_server(SMALL, endpoint="tcp://0.0.0.0:0", token=TOKEN) as server:
        port = server.endpoint.rsplit(":", 1)[1]
        with Client(f"tcp://127.0.0.1:{port}", token=TOKEN) as c:
            c.stats()


def test_an_ipc_endpoint_never_removes_what_is_not_a_socket(tmp_path):
    """D8: `serve --endpoint ipc://PATH` deleted PATH when it was a regular file."""
    precious = tmp_path / "precious.txt"
    precious.write_text("data")
    link = tmp_path / "link.sock"
    link.symlink_to(precious)
    for path in (precious, link, tmp_path):
        with pytest.raises(InvalidArgument, match="not a socket"):
            Server.create(SMALL, f"ipc://{path}").bind()
    assert precious.read_text() == "data" and link.is_symlink()
    code = subprocess.run(
        [sys.executable, "-m", "kvpager", "serve", "--layers", "1", "--kv-heads", "1", "--head-dim", "16",
         "--blocks", "8", "--device", "cpu", "--endpoint", f"ipc://{precious}"],
        env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert code.returncode != 0 and "not a socket" in code.stderr and "Traceback" not in code.stderr
    assert precious.read_text() == "data"


GEOMETRY = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--device", "cpu"]


@pytest.mark.parametrize("args, env", [
    (["serve", *GEOMETRY, "--blocks", "abc"], {}),
    (["serve", *GEOMETRY, "--blocks", "-5"], {}),
    (["serve", *GEOMETRY, "--blocks", "8", "--endpoint", "tcp://127.0.0.1:99999"], {}),
    (["serve", *GEOMETRY, "--blocks", "8", "--endpoint", "foo://x"], {}),
    (["serve", *GEOMETRY, "--blocks", "8", "--heartbeat-timeout", "-1"], {}),
    (["serve", *GEOMETRY, "--blocks", "8", "--max-ids", "lots"], {}),
    (["serve", *GEOMETRY, "--blocks", "8", "--token-file", "/nonexistent/token"], {}),
    (["serve", *GEOMETRY, "--memory", "1x"], {}),
    (["serve", *GEOMETRY, "--memory", "100T"], {}),  # more than /dev/shm holds
    (["serve", *GEOMETRY, "--blocks", "8"], {"KVPAGER_HEARTBEAT_TIMEOUT": "soon"}),
    (["serve", *GEOMETRY, "--blocks", "8"], {"KVPAGER_MAX_MESSAGE": "-3"}),
    (["serve", *GEOMETRY, "--blocks", "8"], {"KVPAGER_MAX_SEQUENCES": "many"}),
    (["serve", *GEOMETRY, "--blocks", "8"], {"KVPAGER_ENDPOINT": "foo://x"}),
    (["stats"], {"KVPAGER_ENDPOINT": "foo://x"}),
    (["stats"], {"KVPAGER_TIMEOUT": "abc"}),
    (["stats"], {"KVPAGER_RUNTIME_DIR": "relative/dir"}),
    (["serve", *GEOMETRY, "--blocks", "8"], {"KVPAGER_RUNTIME_DIR": "relative/dir"}),
    (["stats", "--endpoint", "tcp://127.0.0.1:1", "--timeout", "-1"], {}),
    (["seqs", "--endpoint", "ipc:///nonexistent/kv.sock"], {}),
    (["blocks", "--width", "0"], {}),
    (["top", "--interval", "-1"], {}),
])
def test_bad_cli_and_environment_inputs_get_a_clear_error(args, env, tmp_path, monkeypatch):
    """Every bad command-line or environment input: a one-line error, a
    non-zero exit, never a traceback."""
    from click.testing import CliRunner

    from kvpager.cli import main

    monkeypatch.setenv("KVPAGER_RUNTIME_DIR", str(tmp_path / "rt"))
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "rror" in result.output


@pytest.mark.parametrize("endpoint", ["tcp://[zz]:1", "tcp://[::1:5", "tcp://[]:5", "tcp://a b:5", "tcp://a/b:5", "tcp://127.0.0.1:80:90", "tcp://::1:5"])
def test_a_tcp_endpoint_whose_host_is_none_is_refused_by_name(endpoint):
    """These passed the check and ended in tracebacks later: the URL parser's (``kvpager
    stats``, ``serve``) or ZeroMQ's (``kvpager events``)."""
    from kvpager.endpoints import check_endpoint

    with pytest.raises(InvalidArgument, match="tcp endpoints are tcp://HOST:PORT"):
        check_endpoint(endpoint)
    out = subprocess.run([sys.executable, "-m", "kvpager", "stats", "--endpoint", endpoint], env=subprocess_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    for good in ("tcp://[::1]:5", "tcp://127.0.0.1:5", "tcp://host.example:5", "tcp://[fe80::1%lo]:5"):
        assert check_endpoint(good) == good

