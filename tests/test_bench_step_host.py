"""tools/bench_step_host.py off the GPU, on its tiny model and a CPU pool: every
part it times ran and nests inside the part that calls it, the step's wall time
holds them all, the pool's calls are the owed ones (a block's worth of passes a
`record_tokens`), and the module functions it wrapped are put back."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tool_helpers import tool_module  # noqa: E402


@pytest.fixture(scope="module")
def tool():
    with tool_module("bench_step_host") as module:
        yield module


def test_parts_nest_and_the_wrappers_go(tool):
    import kvpager.hf.attention as attention
    import kvpager.hf.pipeline as pipeline

    before = (pipeline.fed_tokens, pipeline.queue_copy, attention.write_attend)
    t = tool.measure(tool.tiny_model(), "cpu", batch=5, steps=20, warmup=4)
    assert (pipeline.fed_tokens, pipeline.queue_copy, attention.write_attend) == before
    ran = {k: v for k, v in t.items() if k != "refill"}  # (a CPU pool's plans are made anew: none refilled)
    assert all(v > 0 for v in ran.values()), t
    assert t["_append"] + t["plan"] + t["fed_tokens"] + t["_forward"] + t["queue_copy"] <= t["_launch"]
    assert t["write_attend"] <= t["_forward"] and t["refill"] <= t["plan"]
    assert t["_update"] + t["record_tokens"] + t["commit"] <= t["_complete"]
    assert t["_launch"] + t["_complete"] <= t["step"] and t["outside the forward"] == pytest.approx(
        t["step"] - t["_forward"])
