"""transformers on an FP8 pool: scales calibrated from a sample prompt fit
what the pool stores, and the logits of a prefill and of decode steps stay
within 2% (e4m3; 4% for e5m2's two mantissa bits) of the logit spread of the
same run on a bfloat16 pool.

The model is a small random-weight Llama with transformers' default
initializer range (0.02). Livelier random models (initializer range 0.1,
whose logits spread little and attention is flat) move further: 4-10% of the
spread for e4m3 measured while writing this, see docs/fp8.md."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvpager import InvalidArgument, KVPool  # noqa: E402
from kvpager.hf import (  # noqa: E402
    PagedBatch,
    calibrate_kv_scales,
    generate,
    layer_windows,
    paged_attention,
    spec_for_model,
)
from kvpager.spec import FP8_DTYPES  # noqa: E402

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, initializer_range=0.02,
        bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def run(model, pool, prompt: list[int], feed: list[int], dtype=None) -> list[np.ndarray]:
    """Logits of the prefill's last position, then of each decode step fed ``feed``
    (the model on the pool's device; ``dtype``: the pool's, default bfloat16)."""
    device = torch.device(str(getattr(pool, "device", "cpu")))
    dtype = dtype or torch.bfloat16
    a = pool.allocate([prompt])[0]
    windows = layer_windows(model)
    out = []

    def forward(ids: list[int], start: int, slots) -> np.ndarray:
        plan = pool.plan([a.seq_id], [len(ids)], slots, num_q_heads=model.config.num_attention_heads)
        batch = PagedBatch(plan, dtype, device, windows)
        with torch.inference_mode(), paged_attention(model):
            res = model(input_ids=torch.tensor([ids], device=device),
                        position_ids=torch.arange(start, start + len(ids), device=device)[None],
                        attention_mask=torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device), use_cache=False,
                        kvpager=batch)
        return res.logits[0, -1].float().cpu().numpy()

    out.append(forward(prompt, 0, a.slots))
    pos = len(prompt)
    for t in feed:
        slots = pool.append_flat([a.seq_id], 1, [[t]])
        out.append(forward([t], pos, slots))
        pos += 1
    return out


@pytest.mark.parametrize("kv_dtype,budget", [("float8_e4m3", 0.02), ("float8_e5m2", 0.04)])
@pytest.mark.parametrize("calibrated", [True, False])
def test_fp8_logits_within_budget_of_the_spread(model, kv_dtype, budget, calibrated):
    prompt = tokens(40, 1)
    scales = calibrate_kv_scales(model, tokens(64, 2), kv_dtype) if calibrated else None
    if calibrated:
        assert np.asarray(scales).shape == (2, 2, 2) and (np.asarray(scales) > 0).all()
    fp8 = KVPool(spec_for_model(model, 64, 8, dtype=torch.bfloat16, kv_dtype=kv_dtype, kv_scales=scales))
    ref = KVPool(spec_for_model(model, 64, 8, dtype=torch.bfloat16))
    assert fp8.spec.bytes_per_block * 2 == ref.spec.bytes_per_block
    feed = tokens(6, 3)
    want = run(model, ref, prompt, feed)
    got = run(model, fp8, prompt, feed)
    for w, g in zip(want, got):
        spread = float(w.max() - w.min())
        assert np.abs(g - w).max() <= budget * spread, (np.abs(g - w).max(), spread)
    assert max(np.abs(g - w).max() for g, w in zip(got, want)) > 0  # FP8 did round something


def latent_model():
    """A small random-weight model of multi-head latent attention (DeepSeek-V3's code):
    transformers' cache holds its compressed latent, the pool its K/V per head."""
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=16, first_k_dense_replace=2, vocab_size=VOCAB, max_position_embeddings=512,
        initializer_range=0.02, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return transformers.DeepseekV3ForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["llama", "latent"])
def test_calibration_fits_what_the_pool_stores(model, family):
    """The prompt calibrated on, written through kvpager, peaks at fmax / margin per
    (layer, K|V, head): nothing saturates and the range is used (latent attention
    too, whose K/V exist only as the attention function receives them)."""
    if family == "latent":
        model = latent_model()
    prompt = tokens(48, 4)
    margin = 1.25
    scales = calibrate_kv_scales(model, prompt, "float8_e4m3", margin=margin)
    spec = spec_for_model(model, 64, 8)
    assert np.asarray(scales).shape == (spec.num_layers, 2, spec.num_kv_heads)
    pool = KVPool(spec_for_model(model, 64, 8, dtype=torch.bfloat16,
                                 kv_dtype="float8_e4m3", kv_scales=scales))
    run(model, pool, prompt, [])
    blocks = list(pool.sequences()[0].block_table)
    stored = pool.backend.kv[blocks].astype(np.float32)  # [nb, L, 2, H, bs, D]
    peak = np.abs(stored).max(axis=(0, 4, 5))  # [L, 2, H]
    top = FP8_DTYPES["float8_e4m3"][1]
    # K/V reach the pool in bfloat16 (the calibration saw the model's float32): a few ulps apart
    assert (peak <= top / margin * 1.07).all() and (peak >= top / margin * 0.93).all(), peak


def test_calibration_takes_prompts_of_any_lengths(model):
    """Prompts of other lengths, as `generate` takes them (a TypeError or ValueError
    from torch before: only a flat list or a rectangular batch was taken): the
    largest of each prompt's own scales; an id past the vocabulary refused by name."""
    prompts = [tokens(20, 1), tokens(37, 2), tokens(5, 3)]
    own = np.max([np.asarray(calibrate_kv_scales(model, p)) for p in prompts], axis=0)
    np.testing.assert_allclose(np.asarray(calibrate_kv_scales(model, prompts)), own, rtol=1e-5)
    with pytest.raises(InvalidArgument, match="vocabulary"):
        calibrate_kv_scales(model, [tokens(5, 1), [1, VOCAB]])
    with pytest.raises(InvalidArgument, match="non-empty"):
        calibrate_kv_scales(model, [tokens(5, 1), []])


def test_bad_calibration_arguments(model):
    with pytest.raises(InvalidArgument):
        calibrate_kv_scales(model, [1, 2, 3], "bfloat16")
    with pytest.raises(InvalidArgument):
        calibrate_kv_scales(model, [1, 2, 3], margin=0.5)
    with pytest.raises(InvalidArgument):
        calibrate_kv_scales(model, [], "fp8")
    with pytest.raises(InvalidArgument):  # float32 compute with FP8 storage
        spec_for_model(model, 64, 8, dtype=torch.float32, kv_dtype="fp8")


def test_recurrent_states_are_not_shared_across_pool_formats():
    """A model's held recurrent states were keyed by its salt and dtype alone: a
    bfloat16 pool resumed from a state computed over an FP8 pool's K/V (the attention
    layer before the recurrent ones reads them back) and gave other log-probabilities."""
    if not hasattr(transformers, "Qwen3_5TextConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3_5TextConfig")
    config = transformers.Qwen3_5TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, pad_token_id=0, num_hidden_layers=4, layer_types=["full_attention"] + ["linear_attention"] * 3,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForCausalLM(config).eval().to(torch.bfloat16)
    prompt = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(1)).tolist()

    def logprobs(pool):
        return generate(model, pool, [prompt], max_new_tokens=6, eos_token_id=None, logprobs=0)[0].logprobs

    alone = logprobs(KVPool(spec_for_model(model, 64)))  # a bfloat16 pool, from no held state
    fp8 = KVPool(spec_for_model(model, 64, kv_dtype="float8_e5m2"))
    logprobs(fp8)
    logprobs(fp8)  # (its states held at the prompt's block boundaries)
    after = KVPool(spec_for_model(model, 64))
    logprobs(after)
    assert logprobs(after) == alone  # resumed from its own format's states, or none

