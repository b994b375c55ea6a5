"""Beam search on a GPU pool (`kvpager.hf.beam_search`): transformers' hypotheses on
the GPU and the CPU backend's, beams forked on the device. Skips without CUDA."""

from __future__ import annotations

import pytest
from gpu_helpers import cupy_torch_or_skip

pytest.importorskip("transformers")
_, torch = cupy_torch_or_skip()

from test_hf_beams import PROMPTS, transformers_beams  # noqa: E402
from test_hf_models import make_model  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import beam_search, generate, spec_for_model  # noqa: E402

pytestmark = pytest.mark.gpu

GPU_SIZES = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)  # head dim 32


@pytest.mark.parametrize("settings", [dict(num_beams=4), dict(num_beams=3, length_penalty=0.5, early_stopping=True)])
def test_gpu_beams_against_transformers_and_the_cpu(settings):
    model = make_model("llama", **GPU_SIZES)
    spec = spec_for_model(model, num_blocks=256, block_size=16)
    cpu = beam_search(model, KVPool(spec), PROMPTS, 10, eos_token_id=None, num_return_sequences=2, **settings)
    model = model.cuda()
    pool = KVPool(spec, device="cuda:0")
    got = beam_search(model, pool, PROMPTS, 10, eos_token_id=None, num_return_sequences=2, **settings)
    for p, g, c in zip(PROMPTS, got, cpu):
        want, scores = transformers_beams(model, p, 10, 2, None, **settings)
        assert g.tokens == want == c.tokens
        assert g.scores == pytest.approx(scores, abs=1e-4)
    assert pool.counters().cow_blocks > 0 and pool.stats().num_sequences == 0
    pool.check_integrity()


@pytest.mark.parametrize("compile", [False, True], ids=["captured", "compiled"])
def test_gpu_captured_steps_give_the_eager_hypotheses(compile, monkeypatch):
    """``cuda_graphs=True``: every step after the prefill one replay of a step captured
    once (every beam of every prompt a row: 16 rows, then 12 in a bucket of 16), the
    eager search's hypotheses and scores, an end token among them; ``generate``'s
    beams take the option too (before, it ran them eagerly whatever it said)."""
    import importlib.util

    import kvpager.hf.beams

    if compile and importlib.util.find_spec("triton") is None:
        pytest.skip("compile needs triton")
    launches = []

    class Counted(kvpager.hf.beams.DecodeGraphs):
        def launch(self, *args, **kwargs):
            launches.append(len(args[0]))
            return super().launch(*args, **kwargs)

    monkeypatch.setattr(kvpager.hf.beams, "DecodeGraphs", Counted)
    model = make_model("llama", **GPU_SIZES).cuda()
    pool = KVPool(spec_for_model(model, num_blocks=256, block_size=16), device="cuda:0")
    eos = PROMPTS[3][0]
    for settings in (dict(num_beams=4), dict(num_beams=3, length_penalty=0.5, early_stopping=True)):
        eager = beam_search(model, pool, PROMPTS, 10, eos_token_id=eos, num_return_sequences=2, **settings)
        assert not launches
        captured = beam_search(model, pool, PROMPTS, 10, eos_token_id=eos, num_return_sequences=2,
                               cuda_graphs=True, compile=compile, **settings)
        rows = len(PROMPTS) * settings["num_beams"]
        assert launches and set(launches) == {rows}
        launches.clear()
        for c, e in zip(captured, eager):
            assert c.tokens == e.tokens
            assert c.scores == pytest.approx(e.scores, abs=1e-4)
        best = generate(model, pool, PROMPTS, 10, eos_token_id=eos, cuda_graphs=True, compile=compile, **settings)
        assert best == [e.tokens[0] for e in eager] and set(launches) == {rows}
        launches.clear()
    assert pool.stats().num_sequences == 0
    pool.check_integrity()
