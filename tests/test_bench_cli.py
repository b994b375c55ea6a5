"""`kvpager bench` runs the benchmark tools and collects their output."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvpager.backends import cuda_available
from kvpager.cli import main


def test_bench_allocator_json():
    result = CliRunner().invoke(main, ["bench", "--json", "allocator"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = data["results"]["allocator"]["rows"]
    assert {(r["op"], r["batch"]) for r in rows} == {
        (op, b) for op in ("allocate", "free", "fork", "prefix match") for b in (1, 256)
    }
    assert all(r["us_per_block"] > 0 for r in rows)
    assert data["failed"] == {}


def test_bench_rejects_unknown_names():
    result = CliRunner().invoke(main, ["bench", "nonesuch"])
    assert result.exit_code == 2 and "unknown benchmark" in result.output


@pytest.mark.skipif(cuda_available(), reason="with a GPU `kvpager bench peers` runs the benchmark")
def test_bench_lists_peers_and_says_what_it_needs():
    result = CliRunner().invoke(main, ["bench", "--json", "peers"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["results"] == {} and data["failed"] == {}
    why = data["skipped"]["peers"]
    assert why == "no GPU" or why.startswith("needs")


def test_bench_rpc_measures_every_row_it_names():
    """`tools/bench_rpc.py` at a tiny size: the daemon round trips of both
    transports (packed and list ids in the paired rows, the synchronized and
    the staggered decode steps), the in-process figures and the daemon's share,
    each a finite p50 <= p99."""
    import math
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "tools" / "bench_rpc.py"), "--iters", "200", "--batch", "32",
                          "--clients", "1", "--seconds", "0.2", "--json"],
                         capture_output=True, text=True, timeout=240, cwd=str(root), check=True)
    data = json.loads(out.stdout)
    steps = ["step x32: append, record_tokens, commit", "step x32, staggered lengths: three calls"]
    rows = ["append x1", "append x32", "append_flat x32", *steps, "step x32: the same as one batch",
            "step x32, staggered lengths: one batch", "heartbeat", "raw append x1", "raw append x32",
            "paired: bare echo"] + [f"paired: raw append x32, {form}{diff}" for form in ("packed ids", "list ids")
                                    for diff in ("", " - echo, per pair")]
    figures = [data["daemon_handle"][k] for k in ("append x1", "append x32 (packed ids)", "append x32 (list ids)")]
    figures += [data["in_process"][k] for k in ("append x1", "append x32", *steps)]
    for name in ("ipc", "tcp"):
        daemon = data["transports"][name]["daemon"]
        assert set(daemon) == set(rows), name
        figures += [v for k, v in daemon.items() if "- echo" not in k]  # differences may be negative
        assert data["transports"][name]["bare"][0] > 0
    assert all(math.isfinite(p50) and 0 < p50 <= p99 for p50, p99 in figures)
    assert data["transports"]["ipc"]["throughput_ops_s"]["1"] > 0


def test_hf_families_sweep_reports_matches_and_refusals():
    """`tools/hf_families.py` on two types: Llama gives transformers' tokens in both
    variants, MPT (ALiBi, and attention outside the interface) is refused, nothing mismatches."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "tools" / "hf_families.py"), "llama", "mpt", "--json",
                          "--jobs", "2"], capture_output=True, text=True, timeout=600, cwd=str(root), check=True)
    rows = {(r["type"], r["variant"]): r for r in json.loads(out.stdout)["rows"]}
    assert {k: r["outcome"] for k, r in rows.items()} == {
        ("llama", "gqa"): "match", ("llama", "mha"): "match",
        ("mpt", "gqa"): "refused", ("mpt", "mha"): "refused"}
    assert all("ALiBi" in rows["mpt", v]["detail"] for v in ("gqa", "mha"))  # (its attn_config.alibi, by name)


def test_bench_allocator_at_scale_with_fewer_live_sequences_than_a_session():
    """`--live` under a session's 1,000 sequences: one session of them (a
    StatisticsError before: no median of zero ends of a session)."""
    from tool_helpers import tool_module

    with tool_module("bench_allocator") as tool:
        rows = tool.bench_live(500, 1000, 3)
    ops = {r["op"]: r for r in rows}
    assert ops["stats()"]["live"] == 500 and ops["end a session: free its 500 sequences"]["ms"] > 0
