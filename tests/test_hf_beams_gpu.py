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
from kvpager.hf import beam_search, spec_for_model  # noqa: E402

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
