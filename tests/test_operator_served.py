"""A daemon serving on through what an operator's machine does to it: its ipc
socket file removed while it serves (made again; said once where it cannot
be, also for an endpoint named by KVPAGER_ENDPOINT), clients refused at hello
(logged, without flooding). Each test once failed; bounded waits, free
endpoints, every daemon stopped."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
import time

import pytest
from daemon_helpers import (
    SMALL,
    ipc_endpoint,
    running_server,
    wait_until,
)

from kvpager.client import Client
from kvpager.errors import InvalidArgument, LimitExceeded
from kvpager.server_bind import check_before_allocating

WAIT = 30


def test_a_socket_file_removed_while_serving_is_made_again(caplog):
    """A /tmp cleaner (or logind ending the login session whose runtime folder held it,
    or an operator's ``rm``) removed the socket file: the daemon served on where no new
    client could reach it, without a word, and a second daemon started on the path
    beside it, the first one's pool held for nothing."""
    caplog.set_level(logging.INFO, logger="kvpager.server")
    endpoint, d = ipc_endpoint()
    path = endpoint[len("ipc://"):]
    try:
        with running_server(SMALL, endpoint) as server, Client(endpoint, timeout=5) as c:
            c.allocate([list(range(20))])
            os.unlink(path)
            assert wait_until(lambda: os.path.exists(path), WAIT)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            with Client(endpoint, timeout=5) as late:  # a new client reaches it again
                assert late.stats().num_sequences == 1
            with pytest.raises(InvalidArgument, match="another daemon already listens"):
                check_before_allocating(endpoint, None)
            assert any("was removed while serving" in r.getMessage() for r in caplog.records)
            assert server.endpoint == endpoint
        assert not os.path.exists(path)  # (the one made again is removed at the end too)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_socket_file_named_by_the_environment_is_made_again(monkeypatch):
    """The daemon's endpoint from KVPAGER_ENDPOINT, in a folder of mode 0755: the file
    was taken for the default one's, its folder checked as the private runtime
    folder and refused (an error in the log), and never made again."""
    endpoint, d = ipc_endpoint()
    os.chmod(d, 0o755)
    monkeypatch.setenv("KVPAGER_ENDPOINT", endpoint)
    path = endpoint[len("ipc://"):]
    try:
        with running_server(SMALL, endpoint):
            os.unlink(path)
            assert wait_until(lambda: os.path.exists(path), WAIT)
            with Client(endpoint, timeout=5) as late:
                assert late.stats().num_sequences == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_socket_file_that_cannot_be_made_again_is_said_once(caplog):
    """Its folder removed with it (a login session's runtime folder): said once, in the
    log, and the clients connected are served on; made again once the folder is back."""
    caplog.set_level(logging.INFO, logger="kvpager.server")
    endpoint, d = ipc_endpoint()

    def said() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "cannot be made again" in r.getMessage()]

    try:
        with running_server(SMALL, endpoint) as server, Client(endpoint, timeout=5) as c:
            shutil.rmtree(d)
            assert wait_until(lambda: said(), WAIT)
            assert c.allocate([list(range(20))]) and c.stats().num_sequences == 1
            time.sleep(3 * server._expiry_interval())
            assert len(said()) == 1 and said()[0].levelno == logging.ERROR
            os.mkdir(d, 0o700)  # its folder back: the file is made again
            assert wait_until(lambda: os.path.exists(endpoint[len("ipc://"):]), WAIT)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_refused_hellos_are_logged_without_flooding(caplog):
    """Clients refused at hello (a wrong token, every session taken) failed to connect
    and the daemon's log said nothing of it: the operator had no line saying why. Now
    the first of each kind is logged at once, then one a minute at most, counting the
    ones between."""
    from kvpager.errors import Unauthorized
    from kvpager.limits import Limits

    caplog.set_level(logging.INFO, logger="kvpager.server")
    token = "a-daemon-token-" + secrets.token_hex(8)

    def refused() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("hello refused")]

    with running_server(SMALL, token=token, limits=Limits(sessions=1)) as server, \
            Client(server.endpoint, token=token, timeout=5):
        for _ in range(20):
            with pytest.raises(LimitExceeded):
                Client(server.endpoint, token=token, timeout=5, heartbeat=False, name="worker-7")
            with pytest.raises(Unauthorized):
                Client(server.endpoint, token="not-" + token, timeout=5, heartbeat=False)
        lines = refused()
        assert len(lines) == 2 and all(r.levelno == logging.WARNING for r in lines)
        assert "limit_exceeded" in lines[0].getMessage() and "worker-7" in lines[0].getMessage()
        assert "unauthorized" in lines[1].getMessage() and token not in lines[1].getMessage()
        server._refused.every = 0.0  # (a minute on): the next line counts the ones held back
        with pytest.raises(LimitExceeded):
            Client(server.endpoint, token=token, timeout=5, heartbeat=False)
        assert "[19 more refused since the last such line]" in refused()[-1].getMessage()


def test_a_file_put_where_the_socket_was_is_left_alone_and_said_once(caplog):
    """Another local program puts a file of its own where the removed socket file was:
    the daemon never removes it nor binds over it, says so once, and serves its
    connected clients on; at its end the file is still there."""
    caplog.set_level(logging.INFO, logger="kvpager.server")
    endpoint, d = ipc_endpoint()
    path = endpoint[len("ipc://"):]

    def said() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "something else is there now" in r.getMessage()]

    try:
        with running_server(SMALL, endpoint) as server, Client(endpoint, timeout=5) as c:
            os.unlink(path)
            with open(path, "w") as f:
                f.write("not a socket")
            assert wait_until(lambda: said(), WAIT)
            time.sleep(3 * server._expiry_interval())
            assert len(said()) == 1 and said()[0].levelno == logging.ERROR
            assert c.allocate([list(range(20))]) and c.stats().num_sequences == 1
        with open(path) as f:
            assert f.read() == "not a socket"
    finally:
        shutil.rmtree(d, ignore_errors=True)
