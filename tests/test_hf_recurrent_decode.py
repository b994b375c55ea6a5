"""A model with recurrent layers' decode passes (`kvpager.hf.recurrent`): rows of one token
each over the batch's states, the rows left keeping their own states as sequences end
(prefilled in parts, or in one pass whose states the batch keeps as they are), compiled
by ``torch.compile``, pipelined or not, and a pass that fails part-way ending the
generation by name. Tiny random models in float32 on the CPU backend, tokens against
transformers' own generate (their GPU steps: test_hf_recurrent_gpu.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not hasattr(__import__("transformers.cache_utils").cache_utils, "LinearAttentionCacheLayerMixin"):
    pytest.skip("transformers without linear-attention cache layers", allow_module_level=True)

from test_hf_recurrent import (  # noqa: E402
    assert_nothing_held,
    compiled_decode_passes,
    ending_early,
    make,
    prompts,
    reference,
)

from kvpager import KVPool  # noqa: E402
from kvpager.hf import generate, spec_for_model  # noqa: E402


@pytest.mark.parametrize("lens", [(5, 12, 3, 20), (9, 9, 9, 9)], ids=["parts", "one-pass"])
def test_sequences_that_end_early_leave_the_others_states_in_place(lens):
    """An end token that one sequence meets at its second step and another at its
    fourth: the rows left keep their own recurrent states (gathered as the batch
    shrinks), so every sequence's tokens stay transformers'. Prompts of one length
    prefill in one pass, whose states (made in inference mode) the batch keeps as
    they are: moved up in place all the same (they were refused as inference
    tensors updated outside inference mode)."""
    model = make("qwen3_5")
    ps = prompts(*lens, seed=7)
    eos, want = ending_early(model, ps, 6, [(0, 1), (2, 3)])
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    assert generate(model, pool, ps, max_new_tokens=6, eos_token_id=eos) == want
    assert pool.stats().num_sequences == 0


@pytest.mark.parametrize("family", ["qwen3_5", "bamba", "lfm2"])
def test_compiled_decode_passes_give_transformers_tokens(family, monkeypatch):
    """The decode passes compiled by ``torch.compile`` (`Recurrent.compile`: what
    ``compile=True`` sets for captured steps on a GPU; here ``aot_eager`` with
    ``fullgraph``, so a graph break fails the pass) through linear attention, a
    Mamba-2 mixer and a short convolution, sequences ending at different steps (the
    rows left, fewer, compile again): transformers' tokens, and the passes did run
    compiled; nothing left held. (Each family compiles for tens of seconds on a
    small CPU: the GPU test takes the other families, with inductor.)"""
    from kvpager.hf.recurrent import forward_rows

    model = make(family)
    ps = prompts(6, 17, 2, 9, seed=13)
    eos, want = ending_early(model, ps, 6, [(1, 1), (3, 3)])
    made = compiled_decode_passes(monkeypatch)
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    assert generate(model, pool, ps, max_new_tokens=6, eos_token_id=eos) == want
    assert list(made) == [(forward_rows, "aot_eager", True)]
    assert_nothing_held(pool)


@pytest.mark.parametrize("pipeline", [True, False])
def test_decode_steps_pipeline_as_other_models_do(pipeline):
    """Pipelined (each pass launched before the last one's tokens reach the host)
    or not, the same tokens as transformers', with sequences ending at different
    steps; nothing left held."""
    from kvpager.hf import PagedGeneration

    model = make("qwen3_next")
    ps = prompts(6, 17, 2, 9, seed=11)
    with torch.inference_mode():
        free = reference(model, ps, 7)
    eos = [free[1][1], free[3][4]]
    with torch.inference_mode():
        want = reference(model, ps, 7, eos=eos)
    assert any(len(w) < 7 for w in want)
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    with PagedGeneration(model, pool, ps, 7, eos_token_id=eos, pipeline=pipeline) as gen:
        assert gen._pipelined == pipeline
        while not gen.done:
            gen.step()
        assert gen.outputs == want
    assert_nothing_held(pool)


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_failed_decode_pass_ends_the_generation_instead_of_giving_other_tokens(pipeline):
    """A decode pass that fails part-way (the LM head raising, as a device out of
    memory would) has already advanced the recurrent states in place: fed the same
    tokens again they would advance twice, and gave other tokens. The next step is
    refused by name; `close` frees everything; a new generation is right."""
    from kvpager.hf import PagedGeneration

    model = make("qwen3_5")
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8))
    ps = prompts(9, 14, seed=3)
    with torch.inference_mode():
        want = reference(model, ps, 6)
    gen = PagedGeneration(model, pool, ps, 6, eos_token_id=None, pipeline=pipeline)

    def fail(*args, **kwargs):
        raise RuntimeError("out of device memory")

    model.lm_head.forward = fail
    try:
        with pytest.raises(RuntimeError, match="out of device memory"):
            gen.step()
    finally:
        del model.lm_head.forward
    with pytest.raises(ValueError, match="cannot go on"):
        gen.step()
    gen.close()
    assert_nothing_held(pool)
    assert generate(model, pool, ps, max_new_tokens=6, eos_token_id=None) == want
