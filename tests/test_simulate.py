"""The memory-efficiency simulator (tools/simulate.py): targets and internal consistency."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from kvpager import KVPool

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location(
        "kvpager_simulate", ROOT / "tools" / "simulate.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sim = _load()
SHORT = ["--steps", "400"]


def run_json(capsys, *argv: str) -> dict:
    assert sim.main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object, one line
    return json.loads(out)


@pytest.fixture(scope="module")
def default_report() -> dict:
    args = sim.parser().parse_args(SHORT)
    report, _ = sim.simulate(args)
    return report


def test_default_workload_meets_targets(default_report):
    r = default_report
    assert r["slot_utilization_avg"] >= 0.96
    assert r["slot_utilization_at_peak"] >= 0.96
    assert r["contiguous_max_seqs"] == 4096 * 16 // 4096
    assert r["concurrency_vs_contiguous"] >= 4
    assert r["peak_concurrent_seqs"] >= 4 * r["contiguous_max_seqs"]
    # the system prompt's 31 full blocks are held once, however many requests use it
    assert r["shared_prompt_full_blocks"] == 500 // 16
    assert r["shared_prompt_max_copies"] == 1
    assert r["prefix_hit_rate"] > 0.2


def test_report_is_consistent(default_report):
    r = default_report
    assert r["tokens_stored_avg"] <= r["tokens_without_sharing_avg"]
    assert r["saved_by_sharing"] == pytest.approx(r["saved_by_fork"] + r["saved_by_prefix"])
    assert r["saved_by_fork"] > 0 and r["saved_by_prefix"] > 0
    assert r["peak_used_slots"] <= r["pool_tokens"]
    assert r["requests_finished"] <= r["requests_admitted"] <= r["requests_arrived"]
    assert r["swap_ins"] <= r["swap_outs"]
    assert r["forks"] > 0


def test_json_output_parses_and_is_deterministic(capsys):
    a = run_json(capsys, "--steps", "150", "--seed", "3")
    b = run_json(capsys, "--steps", "150", "--seed", "3")
    c = run_json(capsys, "--steps", "150", "--seed", "4")
    for d in (a, b, c):
        d.pop("wall_s")
    assert a == b
    assert a != c
    assert a["config"]["seed"] == 3 and a["config"]["steps"] == 150


def test_human_output(capsys):
    assert sim.main(["--steps", "50"]) == 0
    out = capsys.readouterr().out
    assert "token slots holding real tokens" in out
    assert "paged / contiguous" in out


def _step_and_check(s, steps: int) -> int:
    """Step the simulator, and at every step count independently, from the pool's
    block tables and reference counts, how the system prompt is stored."""
    k = s.args.shared_prompt_len // s.args.block_size
    checked = 0
    for t in range(steps):
        s.step(t)
        stats = s.pool.stats()
        assert stats.tokens_stored <= stats.token_slots_allocated
        blocks = s.pool.blocks()
        tables = {i.seq_id: i.block_table for i in s.pool.sequences()}
        users = [
            tables[x.seq_id] for r in s.running + list(s.swapped) if r.shared for x in r.samples
        ]
        heads = [[b for b in table[:k] if b] for table in users]
        if sum(map(len, heads)) < 2 * k:
            continue
        distinct = {b for h in heads for b in h}
        assert len(distinct) <= k, f"step {t}: system prompt held in {len(distinct)} blocks"
        # every holder points at the same block per position, and the reference
        # count of each equals the number of block tables holding it
        refs: dict[int, int] = {}
        for table in tables.values():
            for b in table:
                refs[b] = refs.get(b, 0) + 1
        for b in distinct:
            assert blocks.ref_cnt[b] == refs[b]
        checked += 1
    return checked


def test_shared_prompt_stored_once_independent_count():
    args = sim.parser().parse_args(["--steps", "200", "--seed", "1"])
    s = sim.Simulator(sim.make_pool(args), args)
    assert _step_and_check(s, args.steps) > 100
    assert s.shared_prompt_max_copies == 1
    s.pool.check_integrity()


class NoPublishPool:
    """A pool that never publishes prefixes (commit does nothing): the simulator's
    stored-once check must see the copies."""

    def __init__(self, pool: KVPool):
        self.pool = pool

    def __getattr__(self, name):
        return getattr(self.pool, name)

    def commit(self, seq_ids, upto=None):
        return [0] * len(seq_ids)


def test_stored_once_check_sees_copies():
    args = sim.parser().parse_args(["--steps", "60", "--seed", "1"])
    s = sim.Simulator(NoPublishPool(sim.make_pool(args)), args)
    for t in range(args.steps):
        s.step(t)
    assert s.shared_prompt_max_copies > 1


@pytest.mark.parametrize(
    "argv",
    [
        # small pool, small host pool: swaps, and recompute once the host is full
        ["--blocks", "600", "--max-model-len", "1024", "--host-blocks", "64", "--rate", "0.3"],
        # no host pool at all: every preemption recomputes
        ["--blocks", "600", "--max-model-len", "1024", "--host-blocks", "0", "--rate", "0.3"],
        [
            "--length-dist",
            "pareto",
            "--prompt-shape",
            "1.8",
            "--output-shape",
            "2",
            "--block-size",
            "8",
        ],
        ["--shared-prompt-len", "0", "--n", "1"],
    ],
)
def test_variants_keep_integrity(capsys, argv):
    r = run_json(capsys, "--steps", "250", "--check-every", "1", *argv)
    assert 0.9 < r["slot_utilization_avg"] <= 1
    assert r["shared_prompt_max_copies"] <= 1
    host = r["config"]["host_blocks"]
    if r["config"]["blocks"] == 600:  # the small pools run out
        assert r["swap_outs"] + r["recomputes"] > 0
    if host == 0:
        assert r["swap_outs"] == 0 and r["recomputes"] > 0


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit):
        sim.main(["--length-dist", "pareto", "--prompt-shape", "1.0"])
    with pytest.raises(SystemExit):
        sim.main(["--blocks", "10"])


@pytest.mark.parametrize("argv", [
    ["--prompt-mean", "0"], ["--output-mean", "-5"], ["--prompt-shape", "-1"], ["--host-blocks", "-1"],
    ["--seed", "-1"], ["--shared-prompt-len", "-1"], ["--rate", "inf"], ["--rate", "1e9"], ["--steps", "-5"],
    ["--watermark", "2"], ["--check-every", "-1"], ["--block-size", "0"], ["--plot", "/kvpager-no-such/x.png"],
    # a pool of exactly n sequences of max_model_len: a request that long never fits at admission
    ["--steps", "300", "--blocks", "256", "--n", "1", "--shared-prompt-len", "0"],
])
def test_values_the_run_cannot_take_are_one_line_errors(argv, capsys):
    """These ended in tracebacks (ValueError, InvalidArgument, FileNotFoundError), hung
    (a rate of 1e9 a step), or admitted nothing for the whole run without a word (a
    pool that holds a longest request but not its admission's room)."""
    with pytest.raises(SystemExit) as e:
        sim.main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_plot_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "memory.png"
    assert sim.main(["--steps", "60", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="matplotlib"):
        sim.main(["--steps", "5", "--plot", str(tmp_path / "x.png")])


def test_lengths_have_the_requested_mean():
    rng = np.random.default_rng(0)
    for dist, shape in (("lognormal", 1.0), ("pareto", 2.5)):
        x = sim.lengths(rng, dist, 300, shape, 200_000)
        assert x.min() >= 1
        assert x.mean() == pytest.approx(300, rel=0.05)
