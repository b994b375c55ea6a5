"""A careless user of kvpager.hf against transformers: a `PagedGeneration` made
directly (as a scheduler makes its batches) ends where transformers' ``generate``
ends, at the model's end tokens; another thread's call of a model that a kvpager
pass has switched to kvpager attention is a typed kvpager error, or, where only
its mask was built during the pass, transformers' logits. Float32 on the CPU
backend, the tiny models of test_hf_models.py."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_hf_models import make_model, one_thread, prompt, reference  # noqa: E402, F401

from kvpager import KVPool  # noqa: E402
from kvpager.errors import KVPagerError  # noqa: E402
from kvpager.hf import OutsidePagedPass, PagedCache, PagedGeneration, generate, spec_for_model  # noqa: E402


def _empty(pool) -> None:
    assert pool.stats().num_sequences == 0 and pool.stats().used_blocks == 0
    pool.check_integrity()


def _stepped(gen: PagedGeneration) -> list[list[int]]:
    with gen:
        while not gen.done:
            gen.step()
        return gen.outputs


@pytest.mark.parametrize("pipeline", [True, False])
def test_paged_generation_stops_at_the_models_end_tokens_by_default(pipeline):
    """``PagedGeneration``'s ``eos_token_id`` defaulted to None while `generate`, beam
    search and transformers' ``generate`` take the model's generation config: made
    directly, it ran past the model's end token to ``max_new_tokens`` without a word.
    Now "model" by default, as theirs: transformers' tokens, one end id or a list;
    None still never stops early."""
    model = make_model("llama")
    prompts = [prompt(7, seed=1), prompt(12, seed=2)]
    free = [reference(model, p, 12) for p in prompts]
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    for eos in (free[0][3], [free[0][5], free[1][2]]):
        model.generation_config.eos_token_id = eos
        want = [reference(model, p, 12) for p in prompts]
        assert want != free  # (the end tokens cut the answers)
        assert _stepped(PagedGeneration(model, pool, prompts, 12, pipeline=pipeline)) == want
        assert generate(model, pool, prompts, 12, pipeline=pipeline) == want
        _empty(pool)
    assert _stepped(PagedGeneration(model, pool, prompts, 12, eos_token_id=None, pipeline=pipeline)) == free
    _empty(pool)


def test_another_threads_call_during_a_paged_cache_pass_is_a_typed_error():
    """A call of the model from another thread, with no cache of kvpager's, while a
    `PagedCache` pass runs: the switch to kvpager attention is the model's shared
    config's, so that call reaches kvpager attention with no batch. It raised an
    untyped RuntimeError; now `OutsidePagedPass` (a `KVPagerError`, still a
    RuntimeError), naming the layer. The cache's generation is transformers' all the
    same, the other call after the pass gives transformers' logits, nothing is held."""
    model = make_model("llama")
    tokens = prompt(9, seed=3)
    with torch.no_grad():
        plain = model(torch.tensor([tokens])).logits
    want = reference(model, tokens, 6)
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with torch.no_grad():
                model(torch.tensor([tokens]))
        except BaseException as e:  # (kept for the main thread to look at)
            errors.append(e)

    def inside_the_first_pass(module, args):
        if not errors:
            t = threading.Thread(target=other)
            t.start()
            t.join()

    handle = model.model.layers[1].mlp.register_forward_pre_hook(inside_the_first_pass)
    try:
        with PagedCache(model, pool) as cache, torch.no_grad():
            out = model.generate(torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                                 max_new_tokens=6, do_sample=False, cache=cache)
    finally:
        handle.remove()
    assert len(errors) == 1
    assert isinstance(errors[0], OutsidePagedPass) and isinstance(errors[0], KVPagerError)
    assert isinstance(errors[0], RuntimeError)  # (what a caller caught before it had a type)
    assert "LlamaAttention" in str(errors[0])
    assert out[0, len(tokens):].tolist() == want
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([tokens])).logits, plain)
    _empty(pool)


def test_the_compiled_op_outside_a_pass_is_the_same_typed_error():
    """The compiled region's op run with no current batch: the same `OutsidePagedPass`."""
    from kvpager.hf.compiled import write_attend

    q = torch.zeros(1, 4, 1, 16)
    with pytest.raises(OutsidePagedPass, match="running"):
        write_attend(q, q[:, :2], q[:, :2], 0, None, None, None)


def test_another_threads_call_whose_mask_was_built_during_a_pass_gets_its_own_mask():
    """Another thread's call of the model (a padded batch, its own attention) that builds
    its mask while a `PagedCache` pass has the model switched, and reaches its layers
    once that pass has ended: its mask came from kvpager's mask function, None, and its
    layers then attended under SDPA with its padding unmasked: other logits without a
    word (by 4.8). Now it gets the mask of the attention the model had before: the
    logits of the same call made alone."""
    model = make_model("llama")
    short, long = prompt(7, seed=1), prompt(12, seed=2)
    ids = torch.tensor([[0] * 5 + short, long])
    mask = torch.tensor([[0] * 5 + [1] * 7, [1] * 12])
    with torch.no_grad():
        alone = model(ids, attention_mask=mask).logits
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    mask_built, pass_done = threading.Event(), threading.Event()
    got: dict = {}

    def other() -> None:
        try:
            with torch.no_grad():
                got["logits"] = model(ids, attention_mask=mask).logits
        except BaseException as e:  # (kept for the main thread to look at)
            got["error"] = e

    def in_the_other_thread(module, args):  # (its mask is built by now, its layers not run)
        if threading.current_thread() is not threading.main_thread() and not mask_built.is_set():
            mask_built.set()
            pass_done.wait(30)

    def inside_the_pass(module, args):
        if threading.current_thread() is threading.main_thread() and "thread" not in got:
            got["thread"] = threading.Thread(target=other)
            got["thread"].start()
            mask_built.wait(30)

    handles = [model.model.layers[0].register_forward_pre_hook(in_the_other_thread),
               model.model.layers[1].mlp.register_forward_pre_hook(inside_the_pass)]
    try:
        with PagedCache(model, pool) as cache, torch.no_grad():  # (one pass: one new token)
            model.generate(torch.tensor([short]), max_new_tokens=1, do_sample=False, cache=cache)
    finally:
        pass_done.set()
        for h in handles:
            h.remove()
        if "thread" in got:
            got["thread"].join()
    assert "error" not in got, got.get("error")
    torch.testing.assert_close(got["logits"], alone)
    _empty(pool)
