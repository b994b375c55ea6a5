"""`kvpager demo` end to end: daemon + worker processes, figures checked independently."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from daemon_helpers import subprocess_env


def test_demo_json_figures():
    bs, system = 16, 256
    out = subprocess.run(
        [sys.executable, "-m", "kvpager", "demo", "--json", "--workers", "3", "--requests", "2",
         "--system-prompt", str(system), "--new-tokens", "8", "--max-model-len", "2048"],
        capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)  # stdout holds the JSON alone; progress went to stderr
    progress = out.stderr.splitlines()
    phases = ["starting a daemon (", "daemon ready at ipc://", "worker 0 wrote the 256-token system prompt",
              "worker ", "worker ", "worker ", "every worker at its peak", "workers freed their sequences"]
    assert len(progress) == len(phases) and all(
        re.fullmatch(r"\[ *\d+\.\ds\] .*", line) and line.split("] ", 1)[1].startswith(p)
        for line, p in zip(progress, phases)), progress
    found = sorted(int(x.split("worker ")[1].split(":")[0]) for x in progress[3:6])
    assert found == [0, 1, 2]
    assert r["requests"] == 6 and len(r["request_tokens"]) == 6 and r["check_ok"] is True
    bpb = r["kv_bytes_contiguous"] // (6 * 2048) * bs
    sys_blocks = system // bs
    # The system prompt stored once; every request's own tail in its own blocks.
    own = sum(-(-n // bs) - sys_blocks for n in r["request_tokens"])
    assert r["kv_bytes_paged"] == (sys_blocks + own) * bpb
    assert r["kv_bytes_no_sharing"] == sum(-(-n // bs) for n in r["request_tokens"]) * bpb
    assert r["shared_blocks"] == sys_blocks
    # 5 of 6 requests hit the whole system prompt (the first one computed it).
    prompt_tokens = sum(n - 8 for n in r["request_tokens"])
    assert abs(r["prefix_hit_rate"] - 5 * system / prompt_tokens) < 1e-9
    assert r["saving_vs_contiguous"] > 4


def test_demo_table_output():
    out = subprocess.run(
        [sys.executable, "-m", "kvpager", "demo", "--workers", "2", "--requests", "1",
         "--system-prompt", "64", "--new-tokens", "2"],
        capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )
    assert out.returncode == 0, out.stderr
    assert "kvpager (paged + shared prefix)" in out.stdout and "integrity check" in out.stdout
    assert "ok" in out.stdout.splitlines()[-1]
    assert "daemon ready at" in out.stderr and "[" not in out.stdout.splitlines()[0]
    quiet = subprocess.run(
        [sys.executable, "-m", "kvpager", "demo", "--quiet", "--workers", "1", "--requests", "1",
         "--system-prompt", "32", "--new-tokens", "1"],
        capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )
    assert quiet.returncode == 0 and quiet.stderr == "" and "integrity check" in quiet.stdout
