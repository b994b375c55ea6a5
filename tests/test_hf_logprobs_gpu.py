"""Log-probabilities of generated tokens on a GPU: the kernel
(`cuda/token_logprobs.cu`) against its reference (torch's float32 log-softmax,
its top by lowest id among ties) over dtypes, vocabularies, k, ties, -inf and
NaN rows and a row stride; generations eager, pipelined, in captured CUDA graphs
and compiled, against the model's own plain forward pass on the GPU and the CPU
backend's (the same tokens, the same values within float32 rounding). Skips
without CUDA."""

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
from kvpager.hf import Sampling, generate, logprob_kernel, spec_for_model  # noqa: E402
from kvpager.hf.logprobs import TokenLogprobs, torch_logprobs  # noqa: E402

pytestmark = pytest.mark.gpu

GPU_SIZES = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)  # head dim 32


def reference(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> np.ndarray:
    """The kernel's output by torch's log-softmax, its top ordered by logit, then
    lowest id (a stable sort: the kernel's tie rule)."""
    lp = torch.log_softmax(logits.float(), dim=-1).cpu().double().numpy()
    n = len(tokens)
    chosen = lp[np.arange(n), tokens.cpu().numpy()]
    order = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(lp, order, axis=1)
    return np.concatenate([chosen[:, None], best, order.astype(np.float64)], axis=1)


def check_kernel(logits: torch.Tensor, tokens: torch.Tensor, k: int, tol: float = 2e-5) -> None:
    assert logprob_kernel.usable(logits, k)
    got = TokenLogprobs(k, len(tokens)).of(logits, tokens).cpu().numpy()
    want = reference(logits[: len(tokens)], tokens, k)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got[:, 1 + k :], want[:, 1 + k :])  # the ids
    np.testing.assert_allclose(got[:, : 1 + k], want[:, : 1 + k], rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [1, 5, 1000, 32001, 128256, 262144])
def test_kernel_against_its_reference(dtype, vocab):
    g = torch.Generator(device="cuda").manual_seed(vocab)
    for n, k in ((1, 0), (7, 1), (64, 5), (3, 20), (9, 32)):
        k = min(k, vocab)
        # 16-bit logits of a narrow range: many ties, the top's order among them by lowest id
        logits = (torch.randn((n + 2, vocab), generator=g, device="cuda") * 3).to(dtype)
        tokens = torch.randint(0, vocab, (n,), generator=g, device="cuda")
        check_kernel(logits, tokens, k)
        tokens[:] = logits[:n].float().argmax(dim=1)
        check_kernel(logits, tokens, k)


def test_kernel_ties_masks_and_strides():
    g = torch.Generator(device="cuda").manual_seed(7)
    vocab = 50000
    wide = torch.randn((6, vocab + 40), generator=g, device="cuda").to(torch.bfloat16)
    logits = wide[:, 7 : 7 + vocab]  # a row stride of vocab + 40, rows not 16-byte aligned
    logits[0] = 1.0  # every token tied: the top is ids 0, 1, 2, ...
    logits[1, ::2] = float("-inf")  # half masked
    logits[2, :] = float("-inf")
    logits[2, 12345] = 0.5  # one token left: probability 1
    logits[3, 100:140] = 9.0  # 40 tied at the top
    tokens = torch.tensor([3, 2, 12345, 139, 0, 5], device="cuda")
    for k in (0, 1, 4, 16, 32):
        check_kernel(logits, tokens, k)
    got = TokenLogprobs(4, 6).of(logits, tokens).cpu().numpy()
    np.testing.assert_array_equal(got[0, 5:], [0, 1, 2, 3])
    assert got[2, 0] == 0.0 and got[2, 5] == 12345
    assert got[1, 0] == float("-inf")  # a masked token
    np.testing.assert_array_equal(got[3, 5:], [100, 101, 102, 103])


def test_kernel_nan_and_all_masked_rows_and_no_rows():
    logits = torch.randn((3, 1000), device="cuda")
    logits[0, 17] = float("nan")
    logits[1] = float("-inf")
    got = TokenLogprobs(3, 3).of(logits, torch.tensor([1, 2, 3], device="cuda")).cpu().numpy()
    assert np.isnan(got[0, :4]).all() and np.isnan(got[1, :4]).all()
    assert np.isfinite(got[2]).all() and 17 not in got[0, 4:]
    empty = TokenLogprobs(2, 0).of(logits, torch.empty(0, dtype=torch.int64, device="cuda"))
    assert empty.shape == (0, 5)


def test_a_k_past_the_kernels_goes_through_torch():
    logits = torch.randn((4, 3000), device="cuda").to(torch.bfloat16)
    tokens = logits.float().argmax(dim=1)
    assert not logprob_kernel.usable(logits, 40)
    got = TokenLogprobs(40, 4).of(logits, tokens)
    torch.testing.assert_close(got, torch_logprobs(logits, tokens, 40))


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
