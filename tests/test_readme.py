"""The README's examples run as written (the worker example against a live daemon)."""

import re
from pathlib import Path

from daemon_helpers import running_server

README = Path(__file__).parents[1] / "README.md"


def blocks():
    found = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(found) >= 2
    return found


def test_embedded_example_runs():
    for code in blocks():
        if "Client()" not in code:
            exec(compile(code, str(README), "exec"), {})


def test_worker_example_runs_against_a_daemon(monkeypatch):
    [code] = [c for c in blocks() if "Client()" in c]
    with running_server() as server:
        monkeypatch.setenv("KVPAGER_ENDPOINT", server.endpoint)
        scope = {"prompt_ids": list(range(40)), "next_token": 7}
        exec(compile(code, str(README), "exec"), scope)
        scope["pool"].close()
        assert server.pool.stats().num_sequences == 0
        server.pool.check_integrity()
