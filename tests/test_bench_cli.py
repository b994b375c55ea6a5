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
