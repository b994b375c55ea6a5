"""Scoring prompts on a GPU pool (`kvpager.hf.score`): against the model's plain
forward pass on the GPU and the CPU backend's scores, in one pass and in parts,
a shared context; a bf16 model within its logits' rounding. Skips without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import cupy_torch_or_skip

pytest.importorskip("transformers")
_, torch = cupy_torch_or_skip()

from test_hf_models import make_model, prompt  # noqa: E402
from test_hf_scoring import PROMPTS  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import score, spec_for_model  # noqa: E402

pytestmark = pytest.mark.gpu

GPU_SIZES = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)  # head dim 32


def reference(model, p: list[int], start: int = 1) -> np.ndarray:
    ids = torch.tensor([p], device=next(model.parameters()).device)
    with torch.no_grad():
        lp = torch.log_softmax(model(ids, attention_mask=torch.ones_like(ids)).logits[0].double(), dim=-1).cpu()
    j = torch.arange(start, len(p), dtype=torch.long)
    return lp[j - 1, torch.tensor(p, dtype=torch.long)[j]].numpy()


@pytest.mark.parametrize("budget", [5, 4096])
def test_gpu_scores_against_the_plain_forward_pass_and_the_cpu(budget):
    model = make_model("llama", **GPU_SIZES)
    spec = spec_for_model(model, num_blocks=160, block_size=16)
    cpu = score(model, KVPool(spec), PROMPTS, tokens_per_pass=budget)
    model = model.cuda()
    pool = KVPool(spec, device="cuda:0")
    got = score(model, pool, PROMPTS, tokens_per_pass=budget)
    for p, g, c in zip(PROMPTS, got, cpu):
        np.testing.assert_allclose(g, reference(model, p), rtol=0, atol=1e-3)
        np.testing.assert_allclose(g, c, rtol=0, atol=1e-3)
    context = prompt(40, seed=9)
    ps = [context + prompt(n, seed=30 + n) for n in (3, 5, 4)]
    for g, p in zip(score(model, pool, ps, len(context)), ps):
        np.testing.assert_allclose(g, reference(model, p, len(context)), rtol=0, atol=1e-3)
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


def test_bf16_scores_within_rounding():
    model = make_model("llama", **GPU_SIZES).to("cuda", torch.bfloat16)
    pool = KVPool(spec_for_model(model, num_blocks=160, block_size=16), device="cuda:0")
    got = score(model, pool, PROMPTS)
    for p, g in zip(PROMPTS, got):
        assert np.isfinite(g).all() and (g <= 0).all()
        np.testing.assert_allclose(g, reference(model, p), rtol=0, atol=0.1)
    pool.check_integrity()
