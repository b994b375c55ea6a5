"""`kvpager.hf.PagedCache` called carelessly or failing: a pass that raises leaves
the sequences and the model as they were; crops and resets in the pool, and
the crops it cannot make refused; the model's forward taken only while a cache
is open; careless calls and models it cannot serve refused by name."""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.cache_utils", reason="no transformers cache module")

from test_hf_models import make_model, one_thread  # noqa: E402, F401
from test_hf_paged_cache import PROMPT, assert_released, both, cache_kw, padded_batch, pool_for  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.errors import InvalidArgument, UnsupportedModel  # noqa: E402
from kvpager.hf import PagedCache, spec_for_model  # noqa: E402
from kvpager.hf.paged_cache import open_caches  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return make_model("qwen2-sliding")


def test_crop_and_reset_change_the_pool_sequences(model):
    pool = pool_for(model)
    ids, mask = padded_batch(2, (0, 0))
    with PagedCache(model, pool) as cache:
        model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kw(model, cache))
        assert [pool.sequence(s).num_tokens for s in cache.seq_ids] == [PROMPT, PROMPT]
        cache.crop(-3)
        assert cache.get_seq_length() == PROMPT - 3
        assert [pool.sequence(s).num_tokens for s in cache.seq_ids] == [PROMPT - 3, PROMPT - 3]
        cache.crop(PROMPT - 5)  # a positive count: the length to keep (transformers before 5.15)
        cache.crop(PROMPT)  # rows hold fewer: nothing cut
        cache.crop(0)
        assert [pool.sequence(s).num_tokens for s in cache.seq_ids] == [PROMPT - 5, PROMPT - 5]
        assert cache.get_seq_length() == PROMPT - 5
        with pytest.raises(InvalidArgument, match="an int"):
            cache.crop(1.5)
        with pytest.raises(InvalidArgument, match="cannot remove"):
            cache.crop(-PROMPT)
        cache.reset()
        assert cache.seq_ids == [] and cache.get_seq_length() == 0
        assert pool.stats().num_sequences == 0
    assert_released(pool)


def test_a_pass_at_other_positions_keeps_its_blocks_to_itself(model):
    """A pass that feeds a row's tokens at positions other than their indices in the row (left
    padding and no position_ids: the model counts cache columns, pads included) gets no prefix hit
    and commits nothing: a later generate of the same prompts matches no block of it, and its
    tokens are transformers'."""
    pool = pool_for(model)
    ids, mask = padded_batch(2, (0, 4))
    with PagedCache(model, pool) as cache:
        model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kw(model, cache))
        model(input_ids=ids[:, :3], attention_mask=torch.cat([mask, mask[:, :3] * 0 + 1], 1),
              use_cache=True, **cache_kw(model, cache))
    ref, out = both(model, pool, ids, mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(ref, out)
    assert pool.stats().prefix_hit_tokens > 0  # the first row's tokens were at their indices: shared
    assert_released(pool)


@torch.no_grad()
def test_crop_into_padding_is_refused(model):
    """A crop removes the last columns where each row's last tokens fill them: into a
    left-padded prompt's last tokens too (each row loses as many; they were refused
    wherever the cut reached a padded first pass, where a DynamicCache crops), those
    tokens fed again then giving the first pass's logits; a cut reaching a row's
    padding is refused, nothing changed."""
    pool = pool_for(model)
    ids, mask = padded_batch(2, (0, 4))
    with PagedCache(model, pool) as cache:
        first = model(ids, mask, use_cache=True, **cache_kw(model, cache)).logits  # (positional: the mask is read)
        model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1] * 0 + 1], 1), use_cache=True,
              **cache_kw(model, cache))
        cache.crop(-1)  # the second pass's column: every row's
        cache.crop(-3)  # the prompt's last three columns: every row's too (left padding)
        assert [pool.sequence(s).num_tokens for s in cache.seq_ids] == [PROMPT - 3, PROMPT - 4 - 3]
        with pytest.raises(InvalidArgument, match="padding"):
            cache.crop(-(PROMPT - 4 - 3 + 1))  # one column into the second row's padding
        assert [pool.sequence(s).num_tokens for s in cache.seq_ids] == [PROMPT - 3, PROMPT - 4 - 3]
        assert cache.get_seq_length() == PROMPT - 3
        again = model(input_ids=ids[:, -3:], attention_mask=mask, use_cache=True, **cache_kw(model, cache)).logits
        torch.testing.assert_close(again, first[:, -3:], rtol=1e-4, atol=1e-4)
    assert_released(pool)


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("at_pass", [0, 2])
def test_a_pass_that_raises_leaves_the_sequences_as_they_were(model, error, at_pass):
    """A layer raising mid-pass (an error, or Ctrl-C): the first pass's sequences freed, a later
    pass's tokens cut off again; the model attends as before (its own attention, its forward)."""
    pool = pool_for(model)
    ids, mask = padded_batch(2)
    layer = model.model.layers[2].mlp
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == at_pass + 1:
            raise error("boom")

    handle = layer.register_forward_pre_hook(hook)
    impl = model.config._attn_implementation
    try:
        with PagedCache(model, pool) as cache:
            with pytest.raises(error):
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                               **cache_kw(model, cache))
            assert model.config._attn_implementation == impl
            held = [pool.sequence(s).num_tokens for s in cache.seq_ids]
            assert held == ([] if at_pass == 0 else [PROMPT - mask[r].eq(0).sum().item() + at_pass - 1
                                                     for r in range(2)])
            assert cache.get_seq_length() == (0 if at_pass == 0 else PROMPT + at_pass - 1)
            pool.check_integrity()
    finally:
        handle.remove()
    assert "forward" not in model.__dict__ and open_caches(model) == 0
    assert_released(pool)


def test_the_model_forward_is_taken_while_a_cache_is_open(model):
    """Two caches open: the model's forward stays taken until both close; a deep copy of the
    model made meanwhile runs its own weights, and a copy's pass refuses the original's cache."""
    pool = pool_for(model)
    ids, mask = padded_batch(1, (0,))
    own = inspect.signature(model.forward)
    a, b = PagedCache(model, pool), PagedCache(model, pool)
    assert open_caches(model) == 2
    assert inspect.signature(model.forward) == own  # what generate reads (logits_to_keep, the cache's name)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1)
    with pytest.raises(InvalidArgument, match="another model"):
        twin(input_ids=ids, use_cache=True, **cache_kw(twin, a))
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert not torch.equal(twin.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False),
                           plain)
    a.close()
    assert "forward" in model.__dict__
    b.close()
    b.close()  # idempotent
    assert "forward" not in model.__dict__ and open_caches(model) == 0
    assert_released(pool)


def test_careless_calls_are_refused_by_name(model):
    pool = pool_for(model)
    ids, mask = padded_batch(2, (0, 4))
    for graphs, match in (("yes", "must be a bool"), (True, "CUDA device")):  # (replayed steps: a GPU's)
        with pytest.raises(InvalidArgument, match=match):
            PagedCache(model, pool, cuda_graphs=graphs)
        assert "forward" not in model.__dict__ and open_caches(model) == 0
    cache = PagedCache(model, pool)
    with pytest.raises(InvalidArgument, match="input_ids"):
        model(inputs_embeds=model.model.embed_tokens(ids), use_cache=True, **cache_kw(model, cache))
    with pytest.raises(InvalidArgument, match="2-D attention_mask"):
        model(input_ids=ids, attention_mask=mask[:, None, None, :].bool(), use_cache=True, **cache_kw(model, cache))
    with pytest.raises(InvalidArgument, match="0s and 1s"):
        model(input_ids=ids, attention_mask=mask * 2, use_cache=True, **cache_kw(model, cache))
    with pytest.raises(InvalidArgument, match="every token is padding"):
        model(input_ids=ids, attention_mask=mask * 0, use_cache=True, **cache_kw(model, cache))
    with pytest.raises(InvalidArgument, match="outside a forward pass"):
        model.model(input_ids=ids, use_cache=True, **cache_kw(model, cache))  # a submodule: no switch
    assert pool.stats().num_sequences == 0
    model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kw(model, cache))
    with pytest.raises(InvalidArgument, match="holds 2 rows"):
        model(input_ids=ids[:1, :1], use_cache=True, **cache_kw(model, cache))
    with pytest.raises(InvalidArgument, match="rows must be"):
        cache.reorder_cache(torch.tensor([0, 2]))
    with pytest.raises(InvalidArgument, match="repeats"):
        cache.batch_repeat_interleave(0)
    cache.close()
    with pytest.raises(InvalidArgument, match="closed"):
        cache.reset()
    # (its model's forward given back: the pass reaches the closed cache's layers straight)
    with pytest.raises(InvalidArgument, match="a forward pass: this PagedCache is closed"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                       **cache_kw(model, cache))
    assert_released(pool)


def test_a_model_with_recurrent_layers_is_refused_before_anything_is_taken():
    """Its states live in transformers' own cache classes: kvpager.hf.generate serves it."""
    from test_hf_recurrent import make

    model = make("qwen3_next")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    with pytest.raises(UnsupportedModel, match="recurrent layers"):
        PagedCache(model, pool)
    assert "forward" not in model.__dict__ and open_caches(model) == 0


def test_a_pool_of_another_geometry_is_refused(model):
    other = make_model("llama")
    with pytest.raises(InvalidArgument, match="geometry"):
        PagedCache(model, KVPool(spec_for_model(other, num_blocks=64, block_size=8).replace(head_dim=32)))
    assert "forward" not in model.__dict__


def test_a_crop_past_the_blocks_given_back_is_refused(monkeypatch):
    monkeypatch.setattr(PagedCache, "release_margin", 0)
    model = make_model("mistral")
    pool = pool_for(model)
    ids, mask = padded_batch(1, (0,))
    with PagedCache(model, pool) as cache:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                       **cache_kw(model, cache))
        seq = cache.seq_ids[0]
        assert pool.sequence(seq).block_table[:2] == (0, 0)  # positions 0-15 given back (22 held, window 6)
        with pytest.raises(InvalidArgument, match="past the blocks given back"):
            cache.crop(-10)
        assert pool.sequence(seq).num_tokens == PROMPT + 2
        cache.crop(-1)
        assert pool.sequence(seq).num_tokens == PROMPT + 1
    assert_released(pool)


def test_a_failed_pass_that_allocated_a_row_frees_it_again(model):
    """Chunked prefill, the third row's first tokens in the second chunk's pass, which raises: that
    row has no sequence again, the others hold their first chunk's tokens, nothing leaks."""
    pool = pool_for(model)
    ids, mask = padded_batch(3, (0, 5, 11))
    layer = model.model.layers[1].mlp
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Boom("boom")

    handle = layer.register_forward_pre_hook(hook)
    try:
        with PagedCache(model, pool) as cache:
            with pytest.raises(Boom):
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                               prefill_chunk_size=8, **cache_kw(model, cache))
            assert cache.seq_ids[2] is None and cache.get_seq_length() == 8
            assert [pool.sequence(s).num_tokens for s in cache.seq_ids[:2]] == [8, 3]
            pool.check_integrity()
    finally:
        handle.remove()
    assert_released(pool)


def test_decode_passes_append_every_row_in_one_packed_call(model, monkeypatch):
    """A pass after the first whose every row gets every column (``generate``'s decode
    passes) appends all its rows in one call, their ids packed [rows, 1] (the allocator's
    decode step), not a list a row; the tokens stay transformers'."""
    pool = pool_for(model)
    ids, mask = padded_batch(3)
    calls = []

    def counted(name):
        orig = getattr(pool, name)

        def call(*args, **kw):
            calls.append((name, args))
            return orig(*args, **kw)
        return call

    for name in ("append", "append_flat"):
        monkeypatch.setattr(pool, name, counted(name))
    ref, out = both(model, pool, ids, mask, max_new_tokens=6, do_sample=False)
    assert out.tolist() == ref.tolist()
    assert len(calls) == 5  # (the first pass allocates)
    for name, args in calls:
        seq_ids, count, tokens = args
        assert name == "append_flat" and count == 1 and len(seq_ids) == 3
        assert isinstance(tokens, np.ndarray) and tokens.shape == (3, 1)
    assert [c[1][2][:, 0].tolist() for c in calls] == out[:, PROMPT:PROMPT + 5].T.tolist()
    assert_released(pool)
