"""The soaks' crew of worker processes (`soak_workers.main` in each): started
together, one SIGKILLed and replaced at a time, their results read at the
end, any still running killed. Used by test_soak.py and test_soak_tier.py."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from typing import Any

from daemon_helpers import subprocess_env, wait_until

from kvpager.client import Client


def spawn(endpoint: str, seed: int, seconds: float) -> subprocess.Popen:
    code = f"import soak_workers; soak_workers.main({endpoint!r}, {seed}, {seconds})"
    return subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


class Crew:
    """``count`` workers doing random ops against ``endpoint`` for ``seconds``."""

    def __init__(self, endpoint: str, count: int, seconds: float):
        self.endpoint = endpoint
        self.end = time.monotonic() + seconds
        self.procs = [spawn(endpoint, k, seconds) for k in range(count)]
        self.killed = 0

    def replace_one(self, rng: random.Random) -> None:
        """SIGKILL a worker chosen by ``rng`` (if it still runs, and the soak has
        more than 5 s left) and start another for the time that is left."""
        victim = rng.randrange(len(self.procs))
        if self.procs[victim].poll() is None and time.monotonic() < self.end - 5:
            self.procs[victim].kill()
            self.procs[victim].wait(10)
            self.killed += 1
            self.procs[victim] = spawn(self.endpoint, 1000 + self.killed, self.end - time.monotonic())

    def results(self, timeout: float) -> list[dict[str, Any]]:
        """Each worker's last line of output (its counts and bugs), once it ends."""
        return [json.loads(p.communicate(timeout=timeout)[0].strip().splitlines()[-1]) for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def drained(endpoint: str, within: float, log: list[str]) -> Any:
    """After a soak's workers are done: the allocator consistent, every session
    drained within ``within`` seconds (the killed workers' time out), consistent
    again, and no traceback in the daemon's ``log``. Returns the daemon's remote
    tier counters (None without a tier)."""
    with Client(endpoint, timeout=30) as obs:
        obs.check_integrity()
        assert wait_until(lambda: obs.stats().num_sequences == 0, timeout=within)
        obs.check_integrity()
        remote = obs.remote_stats()
    assert not any("Traceback" in line for line in log), "".join(log)
    return remote
