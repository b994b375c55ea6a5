"""Quiet sessions (hello's ``quiet``): an inspection's open and clean end logged
at debug. Every `kvpager stats` / `seqs` / `top` added two INFO lines to the
daemon's log (its session opened and ended), so a monitoring loop of them
filled it. A quiet session that held something, or did not end by its own bye,
is still logged at INFO; a daemon that predates the argument is asked without
it. Against a daemon in a thread; its log read through caplog."""

from __future__ import annotations

import logging
import time

import pytest
from click.testing import CliRunner
from daemon_helpers import running_server

from kvpager import protocol
from kvpager.cli import main
from kvpager.client import Client
from kvpager.errors import InvalidArgument


def _lines(caplog: pytest.LogCaptureFixture, name: str) -> dict[str, list[int]]:
    """The levels of the daemon's open and end lines of session ``name``."""
    out: dict[str, list[int]] = {"opened": [], "ended": []}
    for r in caplog.records:
        if r.name != "kvpager.server":
            continue
        msg = r.getMessage()
        for what in out:
            if msg.startswith(f"session {name} ") and f" {what}" in msg:
                out[what].append(r.levelno)
    return out


def test_a_quiet_sessions_open_and_bye_are_logged_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="kvpager.server")
    with running_server() as server:
        with Client(server.endpoint, quiet=True) as quiet:
            quiet.stats()
            quiet.sequences()
        with Client(server.endpoint) as loud:
            loud.stats()
        assert _lines(caplog, quiet.session_name) == {"opened": [logging.DEBUG], "ended": [logging.DEBUG]}
        assert _lines(caplog, loud.session_name) == {"opened": [logging.INFO], "ended": [logging.INFO]}


def test_a_quiet_session_that_held_sequences_or_was_lost_is_logged_at_info(caplog):
    """Its end freed sequences (what an operator looks for when blocks go), or it
    missed heartbeats: INFO, whatever it asked."""
    caplog.set_level(logging.DEBUG, logger="kvpager.server")
    with running_server(heartbeat_timeout=0.5) as server:
        with Client(server.endpoint, quiet=True) as holder:
            holder.allocate([[1, 2, 3]])
        assert _lines(caplog, holder.session_name)["ended"] == [logging.INFO]
        silent = Client(server.endpoint, quiet=True, heartbeat=False)
        try:
            for _ in range(100):  # expired within a few expiry rounds (a bounded wait)
                if _lines(caplog, silent.session_name)["ended"]:
                    break
                time.sleep(0.05)
            assert _lines(caplog, silent.session_name)["ended"] == [logging.INFO]
        finally:
            silent.close()


def test_quiet_must_be_a_bool_and_a_refused_hello_opens_nothing():
    with running_server() as server:
        with pytest.raises(InvalidArgument, match="quiet must be a bool"):
            Client(server.endpoint, quiet="yes")
        with Client(server.endpoint) as c:
            before = len(server.sessions)
            with pytest.raises(InvalidArgument, match="hello: quiet must be a bool"):
                c._call("hello", {"client": "x", "quiet": 1})
            assert len(server.sessions) == before


def test_a_daemon_that_predates_quiet_is_asked_without_it(monkeypatch, caplog):
    """Its hello refused the unknown argument: every inspection command of a newer
    CLI failed against it. The client asks again without it (logged at INFO there,
    as every session was)."""
    caplog.set_level(logging.DEBUG, logger="kvpager.server")
    allowed, required = protocol.OP_ARGS["hello"]
    monkeypatch.setitem(protocol.OP_ARGS, "hello", (allowed - {"quiet"}, required))
    with running_server() as server:
        with Client(server.endpoint, quiet=True) as c:
            assert c.spec == server.pool.spec and c.sequences() == []
        assert _lines(caplog, c.session_name)["opened"] == [logging.INFO]
        with pytest.raises(InvalidArgument, match="quiet must be a bool"):  # (a bad value: still refused here)
            Client(server.endpoint, quiet=None)


def test_the_inspection_commands_open_quiet_sessions(caplog):
    caplog.set_level(logging.DEBUG, logger="kvpager.server")
    with running_server() as server:
        for cmd in (["stats"], ["seqs"], ["sessions"], ["top", "--iterations", "1"]):
            result = CliRunner().invoke(main, [*cmd, "--endpoint", server.endpoint], catch_exceptions=False)
            assert result.exit_code == 0, result.output
        info = [r.getMessage() for r in caplog.records
                if r.name == "kvpager.server" and r.levelno >= logging.INFO and r.getMessage().startswith("session ")]
        assert info == []
        debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "opened by kvpager-cli" in r.getMessage()]
        assert len(debug) == 4


def _open_levels(caplog: pytest.LogCaptureFixture, name: str) -> list[int]:
    return [r.levelno for r in caplog.records
            if r.name == "kvpager.server" and r.getMessage().startswith(f"session {name} opened")]


def test_a_quiet_client_stays_quiet_after_reconnecting_to_a_daemon_that_takes_quiet(monkeypatch, caplog):
    """The hello asked again without ``quiet`` dropped it from the client's own
    arguments: every later hello of that client (a `reconnect` to the upgraded,
    restarted daemon) went without it, its sessions logged at INFO for its life."""
    caplog.set_level(logging.DEBUG, logger="kvpager.server")
    allowed, required = protocol.OP_ARGS["hello"]
    with running_server() as server:
        monkeypatch.setitem(protocol.OP_ARGS, "hello", (allowed - {"quiet"}, required))
        c = Client(server.endpoint, quiet=True)
        try:
            assert _open_levels(caplog, c.session_name) == [logging.INFO]  # the old daemon: as every session
            monkeypatch.setitem(protocol.OP_ARGS, "hello", (allowed, required))  # the daemon now takes it
            c.reconnect()
            assert _open_levels(caplog, c.session_name) == [logging.DEBUG]
        finally:
            c.close()
