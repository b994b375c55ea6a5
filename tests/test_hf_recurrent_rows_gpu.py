"""Scoring and beam search over models with recurrent layers on a GPU pool
(`kvpager.hf.scoring_rows`, `kvpager.hf.beams`): scores against transformers'
plain forward pass on the GPU, a shared context run once, beams against
transformers' beam search on the GPU. Skips without CUDA."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from gpu_helpers import cupy_torch_or_skip

pytest.importorskip("transformers")
_, torch = cupy_torch_or_skip()
pytest.importorskip("transformers.cache_utils", reason="needs transformers' cache layers")
if not hasattr(__import__("transformers.cache_utils").cache_utils, "LinearAttentionCacheLayerMixin"):
    pytest.skip("transformers without linear-attention cache layers", allow_module_level=True)

from test_hf_recurrent import make, prompts  # noqa: E402
from test_hf_scoring_gpu import reference  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import beam_search, score, spec_for_model  # noqa: E402

pytestmark = pytest.mark.gpu

CONTEXT = prompts(40, seed=3)[0]
PROMPTS = [CONTEXT + a for a in prompts(5, 3, 9, seed=4)] + prompts(33, 1, seed=5)
STARTS = [len(CONTEXT)] * 3 + [1, 1]


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next", "jamba", "lfm2", "nemotron_h"])
def test_scores_and_beams_on_a_gpu_pool(family):
    # (experts that read nothing back, so the beams' steps can be captured below)
    model = make(family, head_dim=32, hidden_size=128, experts_implementation="batched_mm").cuda()
    pool = KVPool(spec_for_model(model, num_blocks=128, block_size=16), device="cuda:0")
    for budget in (2048, 16):
        got = score(model, pool, PROMPTS, STARTS, tokens_per_pass=budget)
        for g, p, s in zip(got, PROMPTS, STARTS):
            np.testing.assert_allclose(g, reference(model, p, s), rtol=0, atol=2e-3)
    ps = prompts(13, 5, 22, seed=2)
    found = beam_search(model, pool, ps, 6, num_beams=3, num_return_sequences=3, eos_token_id=None)
    for p, b in zip(ps, found):
        with torch.no_grad():  # (transformers' beams on the same card)
            out = model.generate(torch.tensor([p], device="cuda"), attention_mask=torch.ones(1, len(p), device="cuda",
                                 dtype=torch.long), max_new_tokens=6, do_sample=False, num_beams=3,
                                 num_return_sequences=3, eos_token_id=None, pad_token_id=0, output_scores=True,
                                 return_dict_in_generate=True)
        assert b.tokens == out.sequences[:, len(p) :].tolist()
        assert b.scores == pytest.approx(out.sequences_scores.tolist(), abs=2e-3)
    # captured steps (15 beams in a bucket of 16 rows, their states gathered in place before each
    # replay), compiled for one family: the eager search's hypotheses
    for compile in (False, True) if family == "qwen3_5" and importlib.util.find_spec("triton") else (False,):
        captured = beam_search(model, pool, ps, 6, num_beams=3, num_return_sequences=3, eos_token_id=None,
                               cuda_graphs=True, compile=compile)
        for c, b in zip(captured, found):
            assert c.tokens == b.tokens
            assert c.scores == pytest.approx(b.scores, abs=1e-4)
    assert pool.stats().num_sequences == 0
    pool.check_integrity()
    pool.close()
