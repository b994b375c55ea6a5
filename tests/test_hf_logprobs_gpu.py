"""Log-probabilities of generated tokens on a GPU pool: eager, pipelined, in
captured CUDA graphs and compiled, against the model's own plain forward pass on
the GPU and against the CPU backend's (the same tokens, the same values within
float32 rounding). Skips without CUDA."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from gpu_helpers import cupy_torch_or_skip

pytest.importorskip("transformers")
_, torch = cupy_torch_or_skip()

from test_hf_logprobs import check, full_forward  # noqa: E402
from test_hf_models import make_model, prompt  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import Sampling, generate, spec_for_model  # noqa: E402

pytestmark = pytest.mark.gpu

GPU_SIZES = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)  # head dim 32


def _pool(model, device):
    return KVPool(spec_for_model(model, num_blocks=160, block_size=16), device=device)


def test_every_path_gives_the_models_logprobs():
    model = make_model("llama", **GPU_SIZES)
    ps = [prompt(n, seed=80 + n) for n in (5, 17, 30, 9, 44)]  # 5 rows: a graph bucket of 8
    ss = [Sampling(temperature=1.2, top_k=40, seed=300 + i, repetition_penalty=1.2 if i % 2 else 1.0)
          for i in range(4)] + [None]
    cpu = generate(model, _pool(model, "cpu"), ps, 12, sampling=ss, eos_token_id=None, logprobs=5)
    model = model.cuda()
    paths = dict(eager=dict(pipeline=False), pipelined={}, graphs=dict(cuda_graphs=True))
    if importlib.util.find_spec("triton") is not None:
        paths["compiled"] = dict(cuda_graphs=True, compile=True)
    for name, options in paths.items():
        got = generate(model, _pool(model, "cuda:0"), ps, 12, sampling=ss, eos_token_id=None, logprobs=5,
                       **options)
        assert [c.tokens for c in got] == [c.tokens for c in cpu], name
        check(model, ps, got, 5, tol=1e-3)
        for g, c in zip(got, cpu):
            np.testing.assert_allclose(g.logprobs, c.logprobs, rtol=0, atol=1e-3, err_msg=name)


def test_bf16_greedy_logprobs_in_captured_graphs():
    """A bf16 model in captured graphs: each greedy token is the first of its top,
    and its log-probability is the plain forward pass's within bf16 logits' rounding."""
    model = make_model("llama", **GPU_SIZES).to("cuda", torch.bfloat16)
    ps = [prompt(n, seed=90 + n) for n in (12, 33, 7)]
    pool = KVPool(spec_for_model(model, num_blocks=160, block_size=16), device="cuda:0")
    got = generate(model, pool, ps, 10, eos_token_id=None, logprobs=3, cuda_graphs=True)
    for c in got:
        assert [next(iter(top)) for top in c.top_logprobs] == c.tokens
        assert all(np.isfinite(c.logprobs)) and max(c.logprobs) <= 0
    # the first token's position is the prompt's last: the same computation as the reference's
    for p, c in zip(ps, got):
        ref = full_forward(model, p, c.tokens[:1])
        assert abs(c.logprobs[0] - float(ref[0, c.tokens[0]])) < 0.05
    pool.check_integrity()
