"""A `Client` called from a signal handler while one of its own calls waits for
its reply, and clients whose process ends without `close`:

- a call from the handler took the waiting call's reply (that call then timed
  out, telling to raise the timeout): refused by name now, the waiting call
  answered;
- `close` from the handler closed the socket under the waiting call (an
  untyped ZMQError): kept until that call is done, then made;
- a client collected just before the process exits (a script's ``main()``
  returning) and a `multiprocessing` child's open client (which ends with
  ``os._exit``, no atexit handler) held their sessions until the daemon's
  heartbeat timeout: their byes are said at exit.

Bounded waits, free endpoints, daemons in processes of their own."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from daemon_helpers import (
    SMALL,
    daemon_process,
    ipc_endpoint,
    running_server,
    subprocess_env,
    wait_until,
)

from kvpager.client import Client
from kvpager.errors import InvalidArgument, SessionLost

GEOMETRY = ["--layers", "1", "--kv-heads", "1", "--head-dim", "8", "--block-size", "16", "--blocks", "64",
            "--dtype", "float32", "--device", "cpu"]


def _slow(server, op: str, delay: float, then) -> None:
    """``op``'s next request answered ``delay`` s late; ``then()`` runs (this process's
    SIGALRM armed) once the daemon has it. Later ones run as before."""
    kept = server._handlers[op]

    def run(session, args):
        server._handlers[op] = kept
        then()
        time.sleep(delay)
        return kept(session, args)

    server._handlers[op] = run


def test_a_call_from_a_signal_handler_during_a_call_is_refused_and_the_call_answered():
    with running_server(SMALL, heartbeat_timeout=30) as server, Client(server.endpoint, timeout=2) as c:
        [a] = c.allocate([list(range(20))])
        seen: list[BaseException] = []

        def handler(*_):
            try:
                c.stats()
            except BaseException as e:
                seen.append(e)

        old = signal.signal(signal.SIGALRM, handler)
        _slow(server, "fork", 0.3, lambda: signal.setitimer(signal.ITIMER_REAL, 0.05))
        try:
            t0 = time.monotonic()
            [[child]] = c.fork(a.seq_id)
            took = time.monotonic() - t0
        finally:
            signal.signal(signal.SIGALRM, old)
        assert len(seen) == 1 and isinstance(seen[0], InvalidArgument) and "from within a call" in str(seen[0])
        assert took < 1.5  # answered, not timed out
        assert c.sequence(child).num_tokens == 20
        assert c.stats().num_sequences == 2


@pytest.mark.parametrize("op", ["fork", "stats"])
def test_close_from_a_signal_handler_during_a_call_closes_once_the_call_is_done(op):
    """``stats`` holds no lock of its own beyond its request's: the close kept
    for later was made as the handler's own call ended, while the interrupted
    one still waited, and was kept again, for ever (RecursionError)."""
    with running_server(SMALL, heartbeat_timeout=30) as server, \
            Client(server.endpoint, timeout=5, heartbeat=False) as look:
        c = Client(server.endpoint, timeout=2)
        [a] = c.allocate([list(range(20))])
        old = signal.signal(signal.SIGALRM, lambda *_: c.close())
        _slow(server, op, 0.3, lambda: signal.setitimer(signal.ITIMER_REAL, 0.05))
        try:
            got = c.fork(a.seq_id) if op == "fork" else c.stats()  # answered: its socket not closed under it
        finally:
            signal.signal(signal.SIGALRM, old)
        if op == "fork":
            assert got[0][0] > a.seq_id
        else:
            assert got.num_sequences == 1
        with pytest.raises(SessionLost, match="closed"):
            c.stats()
        assert wait_until(lambda: look.stats().num_sequences == 0 and len(look.sessions()) == 1, 5)


def test_a_client_collected_as_the_process_exits_ends_its_session():
    endpoint, _ = ipc_endpoint()
    script = textwrap.dedent(f"""
        from kvpager.client import Client

        def main():
            worker = Client({endpoint!r}, timeout=5)
            worker.allocate([list(range(40))])

        main()
        print("allocated", flush=True)
    """)
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "60"], endpoint), \
            Client(endpoint, timeout=5, heartbeat=False) as look:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                              env=subprocess_env())
        assert done.returncode == 0 and "allocated" in done.stdout, done.stderr
        assert wait_until(lambda: look.stats().used_blocks == 0 and len(look.sessions()) == 1, 5)


def _child_allocates(endpoint: str) -> None:
    worker = Client(endpoint, timeout=5)
    worker.allocate([list(range(40))])


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_multiprocessing_child_with_an_open_client_ends_its_session(method):
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "60"], endpoint), \
            Client(endpoint, timeout=5, heartbeat=False) as look:
        proc = multiprocessing.get_context(method).Process(target=_child_allocates, args=(endpoint,))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        assert wait_until(lambda: look.stats().used_blocks == 0 and len(look.sessions()) == 1, 5)
