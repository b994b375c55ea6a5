"""Careless users of kvpager.hf: what a real user plausibly gets wrong with
`generate` / `PagedGeneration` and the pool under them. Each but one was
answered wrongly before (see each test); each is now a typed error naming
what is wrong, raised before anything is allocated, or the right tokens. The
one guards what docs/hf.md says of a pool running out mid-generation.
Float32 on the CPU backend, the tiny models of test_hf_models.py; a GPU pool
where marked."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_hf_models import make_model, one_thread, prompt, reference  # noqa: E402, F401

from kvpager import KVPool, OutOfBlocks  # noqa: E402
from kvpager.errors import InvalidArgument, UnsupportedModel  # noqa: E402
from kvpager.hf import PagedGeneration, generate, spec_for_model  # noqa: E402


def _empty(pool) -> None:
    assert pool.stats().num_sequences == 0 and pool.stats().used_blocks == 0
    pool.check_integrity()


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(pipeline=True), dict(pipeline=False), dict(cuda_graphs=True)])
def test_max_new_tokens_past_the_pool_ends_in_out_of_blocks_on_a_gpu(options):
    """max_new_tokens=10**12 ("until the end token") on a GPU pool sized each decode
    plan's tables for that many tokens: a CUDA out-of-memory error at the first decode
    step (10**9: 477 MiB of tables for two sequences, 40 s instead of 2). The tables
    are at most the pool's blocks wide now: the pool runs out, OutOfBlocks, all freed."""
    pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    model = make_model("llama", hidden_size=128).cuda()  # head dim 32: the kernels' smallest
    pool = KVPool(spec_for_model(model, num_blocks=16, block_size=16), device="cuda:0")
    with pytest.raises(OutOfBlocks):
        generate(model, pool, [prompt(13, 1), prompt(20, 2)], 10**12, eos_token_id=None, **options)
    _empty(pool)


def _pool(model, num_blocks=32):
    return KVPool(spec_for_model(model, num_blocks=num_blocks, block_size=8))


def test_a_model_in_training_mode_with_dropout_is_refused():
    """A model left in training mode (dropout outside attention: Phi-3's resid_pdrop)
    generated random tokens, and the K/V it stored were published under the default
    salt of the same model in eval mode: a later eval-mode generation of that prompt
    started from them and gave other tokens than transformers'. Refused now, by name,
    before anything is allocated (functional dropout from the config too: Starcoder2);
    training mode without dropout still gives eval mode's tokens."""
    model = make_model("phi3", resid_pdrop=0.3).train()
    ids = prompt(20, 4)
    pool = _pool(model)
    with pytest.raises(UnsupportedModel, match=r"training mode with dropout \(.*p=0.3.*model.eval\(\)"):
        generate(model, pool, [ids], 6)
    _empty(pool)
    assert generate(model.eval(), pool, [ids], 6) == [reference(model, ids, 6)]
    model = make_model("starcoder2", residual_dropout=0.1).train()
    with pytest.raises(UnsupportedModel, match=r"config.residual_dropout=0.1"):
        generate(model, _pool(model), [ids], 2)
    model = make_model("llama").train()  # no dropout anywhere
    assert generate(model, _pool(model), [ids], 4) == [reference(model.eval(), ids, 4)]


def test_a_model_without_its_lm_head_is_refused():
    """``AutoModel`` for ``AutoModelForCausalLM`` (a bare LlamaModel: no logits) got
    as far as its first pass, after the prompts were allocated, and failed there with
    AttributeError: 'BaseModelOutputWithPast' object has no attribute 'logits'."""
    model = make_model("llama")
    pool = _pool(model)
    with pytest.raises(UnsupportedModel, match="LlamaModel has no language-model head.*AutoModelForCausalLM"):
        generate(model.model, pool, [prompt(5, 1)], 2)
    _empty(pool)


@pytest.mark.parametrize("pipeline", [True, False])
def test_step_after_close_is_refused_by_name(pipeline):
    """A generation closed before it was done and stepped again raised the pool's
    UnknownSequence ("unknown sequence 7"), which did not say why."""
    model = make_model("llama")
    pool = _pool(model)
    gen = PagedGeneration(model, pool, [prompt(5, 1)], 8, pipeline=pipeline)
    gen.step()
    gen.close()
    gen.close()  # twice: nothing more
    outputs = [list(o) for o in gen.outputs]
    with pytest.raises(InvalidArgument, match="closed"):
        gen.step()
    assert gen.outputs == outputs
    _empty(pool)


def test_a_spec_for_the_pool_or_swapped_arguments_are_refused_by_name():
    """A PoolSpec where KVPool(spec) was meant, or the model and pool swapped, raised
    AttributeError from inside ('PoolSpec' object has no attribute 'spec')."""
    model = make_model("llama")
    pool = _pool(model)
    with pytest.raises(TypeError, match="pool must be a kvpager pool .*PoolSpec: pass KVPool"):
        generate(model, pool.spec, [prompt(5, 1)], 2)
    with pytest.raises(TypeError, match="model must be a transformers causal LM .*got KVPool"):
        generate(pool, model, [prompt(5, 1)], 2)
    _empty(pool)


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_pool_that_runs_out_mid_generation_can_be_stepped_again(pipeline):
    """Documented (docs/hf.md): `generate` raises OutOfBlocks with everything freed;
    `PagedGeneration.step` raises it with nothing changed, so blocks freed elsewhere
    let it go on, to transformers' tokens."""
    model = make_model("llama")
    pool = _pool(model, num_blocks=10)  # 9 blocks of 8 to hold
    [hog] = pool.allocate([prompt(24, 9)], "hog")  # 3 of them
    prompts = [prompt(13, 1), prompt(15, 3)]  # 12 new tokens (11 stored): 3 and 4 blocks
    with pytest.raises(OutOfBlocks):
        generate(model, pool, prompts, 12, eos_token_id=None, pipeline=pipeline)
    assert [s.seq_id for s in pool.sequences()] == [hog.seq_id]
    gen = PagedGeneration(model, pool, prompts, 12, eos_token_id=None, pipeline=pipeline)
    with pytest.raises(OutOfBlocks):
        while not gen.done:
            gen.step()
    held = [(s.seq_id, s.num_tokens) for s in pool.sequences()]
    with pytest.raises(OutOfBlocks):
        gen.step()
    assert [(s.seq_id, s.num_tokens) for s in pool.sequences()] == held
    pool.free([hog.seq_id])
    while not gen.done:
        gen.step()
    assert gen.outputs == [reference(model, p, 12) for p in prompts]
    gen.close()
    _empty(pool)


def test_a_1d_tensor_of_end_tokens_is_taken_as_their_list():
    """eos_token_id as a 1-D torch tensor (as a tokenizer or a generation config
    may hold the ids) was refused ("must be None, a token id or a list of them"),
    where the same ids as a list or a NumPy array were taken: each id of the
    tensor was a 0-d tensor, no int. Now it ends the generation as the list does."""
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    p = prompt(11, 3)
    [full] = generate(model, pool, [p], 8, eos_token_id=None)
    stop = full[3]  # ends the generation at its first appearance, at most 4 tokens in
    [by_list] = generate(model, pool, [p], 8, eos_token_id=[stop, 10**6])
    assert by_list == full[: full.index(stop) + 1]
    for ids in (torch.tensor([stop, 10**6]), torch.tensor([stop], dtype=torch.int32)):
        assert generate(model, pool, [p], 8, eos_token_id=ids) == [by_list]
    with pytest.raises(InvalidArgument, match="eos_token_id must be"):  # float ids stay refused
        generate(model, pool, [p], 8, eos_token_id=torch.tensor([float(stop)]))
    _empty(pool)
