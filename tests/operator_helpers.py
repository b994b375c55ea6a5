"""What the operator tests share (test_operator_lifecycle.py,
test_operator_limits.py): ``kvpager serve`` in a process of its own, started
as from a terminal and stopped with SIGTERM, and the /dev/shm segments of a
daemon's pid; bounded by WAIT."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from daemon_helpers import as_from_a_terminal, subprocess_env, terminate, wait_until

WAIT = 30
ARGS = ["--model", "tiny", "--blocks", "64", "--host-memory", "256K", "--device", "cpu"]


def serve(endpoint: str, *extra: str, preexec=None) -> subprocess.Popen:
    """``kvpager serve`` in a process of its own, once it serves (``proc.lines``: its log);
    its SIGINT and SIGHUP at their defaults (`as_from_a_terminal`) before ``preexec``."""

    def started() -> None:
        as_from_a_terminal()
        if preexec is not None:
            preexec()

    proc = subprocess.Popen([sys.executable, "-m", "kvpager", "serve", "--endpoint", endpoint, *ARGS, *extra],
                            env=subprocess_env(), stderr=subprocess.PIPE, text=True, preexec_fn=started)
    proc.lines = []
    proc.reader = threading.Thread(target=lambda: proc.lines.extend(proc.stderr), daemon=True)
    proc.reader.start()
    if not wait_until(lambda: any("kvpager serving on" in x for x in proc.lines) or proc.poll() is not None, WAIT) \
            or proc.poll() is not None:
        stop(proc)
        raise RuntimeError("daemon did not start:\n" + "".join(proc.lines))
    return proc


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM (a kill past WAIT), its log read to the end: its exit status."""
    terminate(proc, WAIT)
    proc.reader.join(WAIT)
    return proc.returncode


def segments(pid: int) -> list[str]:
    """The /dev/shm segments of the daemon of ``pid``."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"kvp{pid}_")]
