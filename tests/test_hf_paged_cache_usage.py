"""`kvpager.hf.PagedCache` used as transformers' users use a cache: passed
positionally, rows selected by a bool mask, copied for each continuation of a
prompt (``copy.deepcopy``), a forward run with gradients on, and a model that
counts positions from its mask called without ``position_ids`` on prefix hits.
Each gives transformers' own cache's values, or is refused by name; none gives
other numbers silently."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.cache_utils", reason="no transformers cache module")

from test_hf_models import make_model, one_thread  # noqa: E402, F401
from test_hf_paged_cache import assert_released, cache_kw, padded_batch, pool_for  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.errors import InvalidArgument, UnsupportedConfiguration  # noqa: E402
from kvpager.hf import PagedCache, spec_for_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


def dynamic(model):
    return transformers.DynamicCache(config=model.config)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def opt_model():
    torch.manual_seed(0)
    config = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=128, max_position_embeddings=512, word_embed_proj_dim=64,
                                    pad_token_id=0, init_std=0.2)
    config._attn_implementation = "eager"
    return transformers.OPTForCausalLM(config).eval()


@torch.no_grad()
def test_a_model_counting_positions_from_its_mask_on_prefix_hits():
    """OPT given no position_ids counts a row's positions from its mask (padding skipped),
    not in cache columns: a left-padded pass keeping its last logits, whose rows hit the prefix
    cache (a cut pass: its rows' tails alone) or share a prompt not yet cached (written by a
    pass of its own first), gives transformers' logits on every run, not only the first."""
    model = opt_model()
    pool = KVPool(spec_for_model(model, num_blocks=128, block_size=8))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :6], ids[0, :6] = 0, 0
    shared = torch.randint(3, 128, (1, 48), generator=g).expand(4, 48)  # a prompt every row shares
    own = torch.randint(3, 128, (4, 8), generator=g)
    ids2 = torch.cat([shared, own], 1)
    mask2 = torch.ones_like(ids2)
    for r, pad in enumerate((0, 3, 5, 9)):
        mask2[r, :pad], ids2[r, :pad] = 0, 0
    for batch, m in ((ids, mask), (ids2, mask2)):
        ref = model(input_ids=batch, attention_mask=m, logits_to_keep=1, **cache_kw(model, dynamic(model))).logits
        for _ in range(3):  # the second and third on prefix hits
            with PagedCache(model, pool) as cache:
                close(model(input_ids=batch, attention_mask=m, logits_to_keep=1, **cache_kw(model, cache)).logits, ref)
    assert pool.counters().prefix_hit_tokens > 0
    assert_released(pool)


def test_a_backward_through_kvpager_attention_is_refused(model):
    """With gradients on, a pass gives transformers' loss, and a backward through it raises
    `UnsupportedConfiguration` (the pool's kernels compute no gradients) rather than leaving
    attention out of the gradients; under no_grad nothing is recorded."""
    pool = pool_for(model)
    ids, _ = padded_batch(2, (0, 0))
    ref = model(input_ids=ids, labels=ids, **cache_kw(model, dynamic(model))).loss
    with PagedCache(model, pool) as cache:
        loss = model(input_ids=ids, labels=ids, **cache_kw(model, cache)).loss
    close(loss, ref)
    model.zero_grad(set_to_none=True)
    with pytest.raises(UnsupportedConfiguration, match="no gradients"):
        loss.backward()
    with torch.no_grad(), PagedCache(model, pool) as cache:
        assert not model(input_ids=ids, **cache_kw(model, cache)).logits.requires_grad
    model.zero_grad(set_to_none=True)
    assert_released(pool)


@torch.no_grad()
@pytest.mark.parametrize("how", ["tensor", "list", "array"])
def test_batch_select_indices_takes_a_bool_mask(model, how):
    """A bool mask keeps its True rows, as indexing a DynamicCache's tensors does (not rows 0
    and 1 read as ints); a mask of another length, or a bool mask to reorder_cache, is refused."""
    pool = pool_for(model)
    ids, _ = padded_batch(3, (0, 0, 0))
    nxt = torch.randint(3, 128, (2, 2), generator=torch.Generator().manual_seed(4))
    keep = [True, False, True]
    keep = {"tensor": torch.tensor(keep), "list": keep, "array": np.array(keep)}[how]
    ref_cache = dynamic(model)
    model(input_ids=ids, **cache_kw(model, ref_cache))
    ref_cache.batch_select_indices(torch.as_tensor(keep))
    ref = model(input_ids=nxt, **cache_kw(model, ref_cache)).logits
    with PagedCache(model, pool) as cache:
        model(input_ids=ids, **cache_kw(model, cache))
        rows = list(cache.seq_ids)
        with pytest.raises(InvalidArgument, match="one entry a row"):
            cache.batch_select_indices(torch.tensor([True, False]))
        with pytest.raises(InvalidArgument, match="bool mask"):
            cache.reorder_cache(torch.tensor([True, True, True]))
        assert cache.seq_ids == rows
        cache.batch_select_indices(keep)
        assert cache.seq_ids == [rows[0], rows[2]]
        close(model(input_ids=nxt, **cache_kw(model, cache)).logits, ref)
    assert_released(pool)


@torch.no_grad()
def test_a_cache_passed_positionally(model):
    """``model(ids, mask, None, cache)``, as a DynamicCache is taken: the same logits, the
    rows in the pool."""
    pool = pool_for(model)
    ids, mask = padded_batch(2, (0, 0))
    ref_cache = dynamic(model)
    args = (ids, mask, None, ref_cache)
    ref = model(*args).logits
    assert ref_cache.get_seq_length() == ids.shape[1]  # (the fourth parameter is the cache)
    with PagedCache(model, pool) as cache:
        close(model(ids, mask, None, cache).logits, ref)
        assert cache.get_seq_length() == ids.shape[1] and None not in cache.seq_ids
    assert_released(pool)


@torch.no_grad()
def test_deepcopy_forks_a_prompt_cache_for_each_continuation(model):
    """transformers' prompt-reuse recipe: a prompt's cache run once, then ``copy.deepcopy`` of it
    for each continuation's generate. The copies fork the prompt's sequence (its blocks shared,
    none written again), each gives transformers' tokens, and the prompt's cache is unchanged."""
    pool = pool_for(model, 512)
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(3, 128, (1, 24), generator=g)
    prompts = [torch.cat([prefix, torch.randint(3, 128, (1, 5), generator=g)], 1) for _ in range(3)]
    ref_cache = dynamic(model)
    model(input_ids=prefix, **cache_kw(model, ref_cache))
    refs = [model.generate(input_ids=p, max_new_tokens=6, do_sample=False,
                           **cache_kw(model, copy.deepcopy(ref_cache))) for p in prompts]
    with PagedCache(model, pool) as cache:
        model(input_ids=prefix, **cache_kw(model, cache))
        used = pool.stats().used_blocks
        for p, ref in zip(prompts, refs):
            with copy.deepcopy(cache) as mine:
                assert mine is not cache and mine.get_seq_length() == 24 and mine.seq_ids != cache.seq_ids
                assert pool.stats().used_blocks == used  # (the fork shares every block)
                assert torch.equal(model.generate(input_ids=p, max_new_tokens=6, do_sample=False,
                                                  **cache_kw(model, mine)), ref)
        assert cache.get_seq_length() == 24 and pool.sequence(cache.seq_ids[0]).num_tokens == 24
        pool.check_integrity()
    assert_released(pool)
    with pytest.raises(InvalidArgument, match="closed"):
        copy.deepcopy(cache)


@torch.no_grad()
def test_crop_takes_an_integer_tensor(model):
    """Prompt-lookup decoding on a GPU passes `crop` a 0-d device tensor (refused as no int
    before): an integer 0-d tensor or NumPy integer counts as its int; a float, bool or 1-d
    one is refused."""
    pool = pool_for(model)
    ids, _ = padded_batch(2, (0, 0))
    with PagedCache(model, pool) as cache:
        model(input_ids=ids, **cache_kw(model, cache))
        cache.crop(torch.tensor(-3))
        cache.crop(np.int64(-2))
        assert cache.get_seq_length() == ids.shape[1] - 5
        assert [pool.sequence(s).num_tokens for s in cache.seq_ids] == [ids.shape[1] - 5] * 2
        for bad in (torch.tensor(-1.0), torch.tensor(True), torch.tensor([-1]), True, -1.0):
            with pytest.raises(InvalidArgument, match="an int"):
                cache.crop(bad)
        assert cache.get_seq_length() == ids.shape[1] - 5
    assert_released(pool)


@torch.no_grad()
def test_a_compiled_model_called_with_the_cache_runs_its_passes_eagerly(model):
    """``torch.compile(model)`` called with a PagedCache: the compiler traced the pass's
    bookkeeping (NumPy mask checks: a bool ``cumsum`` it could not run) and handed the
    pass the taken-over forward again. The pass now runs as an eager call, a prompt pass
    and a decode pass with DynamicCache's logits."""
    compiled = torch.compile(model, backend="eager")  # (what the compiler traces: no code generated)
    pool = pool_for(model)
    ids, mask = padded_batch(2, (0, 3))
    nxt = torch.randint(3, 128, (2, 1), generator=torch.Generator().manual_seed(5))
    ref_cache = dynamic(model)
    ref = [model(input_ids=ids, attention_mask=mask, **cache_kw(model, ref_cache)).logits[:, -1]]
    mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    ref.append(model(input_ids=nxt, attention_mask=mask, **cache_kw(model, ref_cache)).logits[:, -1])
    with PagedCache(model, pool) as cache:
        got = [compiled(input_ids=ids, attention_mask=mask[:, :-1], **cache_kw(model, cache)).logits[:, -1]]
        got.append(compiled(input_ids=nxt, attention_mask=mask, **cache_kw(model, cache)).logits[:, -1])
    for g, r in zip(got, ref):
        close(g, r)
    assert_released(pool)


@torch.no_grad()
@pytest.mark.parametrize("window, length", [(64, 21), (64, 60), (6, 5)])
def test_crop_on_a_windowed_model_shorter_than_its_window(window, length):
    """A crop on a model whose every layer has a window was refused where the row was
    shorter than the window (nothing given back: the check's first position went
    negative), so prompt-lookup and assisted decoding failed through a PagedCache for
    any context shorter than a real checkpoint's window (4,096 for Mistral)."""
    windowed = make_model("mistral", sliding_window=window)
    torch.manual_seed(3)
    ids = torch.randint(1, 128, (1, length))
    ref = transformers.DynamicCache(config=windowed.config)
    windowed(ids, past_key_values=ref)
    ref.crop(-3)
    want = windowed(ids[:, -3:], past_key_values=ref).logits
    pool = pool_for(windowed)
    cache = PagedCache(windowed, pool)
    try:
        windowed(ids, past_key_values=cache)
        cache.crop(-3)
        close(windowed(ids[:, -3:], past_key_values=cache).logits, want)
    finally:
        cache.close()
    assert pool.stats().used_blocks == 0
    pool.check_integrity()


@torch.no_grad()
def test_prompt_lookup_through_a_paged_cache_on_a_windowed_model():
    windowed = make_model("mistral", sliding_window=64)
    prompt = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])
    kw = dict(max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3)
    want = windowed.generate(input_ids=prompt, **kw)
    pool = pool_for(windowed)
    cache = PagedCache(windowed, pool)
    try:
        got = windowed.generate(input_ids=prompt, past_key_values=cache, **kw)
    finally:
        cache.close()
    assert got.tolist() == want.tolist()
    assert pool.stats().used_blocks == 0
