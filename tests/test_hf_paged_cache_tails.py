"""`kvpager.hf.PagedCache`'s prompt pass runs less than transformers feeds it.
On prefix-cache hits it runs only the rows' uncached tails: the prompt pass of
``generate`` (which keeps the last position's logits) feeds each row's tokens
after its cached blocks, left-padded to the longest such tail. Rows that repeat
others (beams, returned sequences) run once, their repeats forks. The tokens are
transformers'; a pass that asks for more than the kept logits runs whole."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.cache_utils", reason="no transformers cache module")

from hf_versions import served_by_this_transformers  # noqa: E402
from test_hf_models import FAMILIES, make_model, one_thread  # noqa: E402, F401
from test_hf_paged_cache import assert_released, cache_kw, pool_for  # noqa: E402

from kvpager.hf import PagedCache  # noqa: E402

SYSTEM = 24  # a shared system prompt: 3 blocks of 8


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


def batch(owns: tuple[int, ...], seed: int = 5, system: int = SYSTEM):
    """Rows of a shared system prompt (``system`` tokens) and ``owns[r]`` tokens of their own, left-padded."""
    g = torch.Generator().manual_seed(seed)
    width = system + max(owns)
    system = torch.randint(3, 128, (system,), generator=g)
    ids = torch.zeros((len(owns), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(owns):
        row = torch.cat([system, torch.randint(3, 128, (n,), generator=g)])
        ids[r, width - len(row):], mask[r, width - len(row):] = row, 1
    return ids, mask


def shapes_of(model, run):
    """(what ``run()`` returns, the (rows, token columns) of each pass the model ran in it)."""
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    try:
        return run(), shapes
    finally:
        hook.remove()


def widths_of(model, run):
    """(what ``run()`` returns, the token columns of each pass the model ran in it)."""
    out, shapes = shapes_of(model, run)
    return out, [w for _, w in shapes]


def seeded(model, ids, mask, kw, pool=None, new=10):
    """(``generate``'s tokens from torch seed 3, on transformers' own cache or on a
    PagedCache over ``pool``; the pool's blocks in use at its end, before the cache closes)."""
    torch.manual_seed(3)
    if pool is None:
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, **kw), None
    with PagedCache(model, pool) as cache:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, **cache_kw(model, cache), **kw)
        return out, pool.stats().used_blocks


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(do_sample=True, top_k=20), dict(num_beams=3, do_sample=False)],
                         ids=["greedy", "sampled", "beams"])
def test_prefix_hits_run_the_uncached_tails_alone(model, kw):
    """Rows of 24 shared tokens and 0, 3 and 13 of their own: once the system prompt is
    cached, the prompt pass feeds 8 (a row wholly cached: the pool never counts a prompt's
    last token as cached, so its last block is fed again), 3 and 13 tokens, 13 columns
    instead of 37; the tokens are transformers'."""
    pool = pool_for(model, 512)
    ids, mask = batch((0, 3, 13))
    with PagedCache(model, pool) as cache:  # caches the system prompt (whole passes: nothing cached yet)
        model.generate(input_ids=ids[:1, -SYSTEM - 1:], attention_mask=mask[:1, -SYSTEM - 1:], max_new_tokens=1,
                       do_sample=False, **cache_kw(model, cache))
    ref, _ = seeded(model, ids, mask, kw)
    (out, _), widths = widths_of(model, lambda: seeded(model, ids, mask, kw, pool))
    assert torch.equal(ref, out)
    assert widths[0] == 13, widths
    assert_released(pool)


def test_a_pass_that_asks_for_more_than_the_kept_logits_runs_whole(model):
    """Forward passes of the cache's model on hits: every position's logits (the default),
    or hidden states asked for, need every token's pass: the pass runs whole, and its
    logits are those of transformers' own cache; one keeping the last position's logits is
    cut to the rows' tails, with the same last logits. Without position_ids the padded row
    is fed at cache columns (not its tokens' indices), which a model may count its own way
    (OPT: its tokens alone, from the mask): the pass runs whole."""
    pool = pool_for(model, 512)
    ids, mask = batch((2, 9))
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        plain = model(input_ids=ids, attention_mask=mask).logits  # (positions: cache columns)
        with PagedCache(model, pool) as cache:  # nothing cached yet: the prompts' blocks committed
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                  **cache_kw(model, cache))
        for extra, width in ((dict(position_ids=positions), 33),
                             (dict(position_ids=positions, logits_to_keep=1, output_hidden_states=True), 33),
                             (dict(position_ids=positions, logits_to_keep=1), 2),  # 26, 33 tokens: 24, 32 cached
                             (dict(logits_to_keep=1), 33)):
            def one(extra=extra):
                with PagedCache(model, pool) as cache:
                    return model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kw(model, cache),
                                 **extra).logits

            got, widths = widths_of(model, one)
            assert widths == [width], (extra, widths)
            real = mask[:, -got.shape[1]:].bool()
            ref = want if "position_ids" in extra else plain
            torch.testing.assert_close(got[real], ref[:, -got.shape[1]:][real], rtol=1e-4, atol=1e-4)
    assert_released(pool)


def test_a_cut_pass_of_padded_rows_counts_as_padded(model):
    """Rows of 27 and 19 tokens (24 and 16 cached): both feed their last 3, so the cut
    pass has no padding; the whole pass had, and a crop into its columns is taken
    as for a whole padded pass: where every row's last tokens fill the columns cut
    (each row losing as many), refused where the cut reaches a row's padding."""
    from kvpager.errors import InvalidArgument

    pool = pool_for(model, 512)
    ids, mask = batch((3, 11))  # 35 columns: the first row 8 pads, 24 system tokens, 3 own
    ids[1, :16], mask[1, :16] = 0, 0  # the second: 16 pads, the system's first 16 tokens, 3 own
    ids[1, 16:32] = ids[0, 8:24]
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        with PagedCache(model, pool) as cache:  # caches both prompts' blocks
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kw(model, cache))
        with PagedCache(model, pool) as cache:
            _, widths = widths_of(model, lambda: model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                                       use_cache=True, logits_to_keep=1, **cache_kw(model, cache)))
            assert widths == [3]
            with pytest.raises(InvalidArgument, match="padding"):
                cache.crop(-20)  # one column into the second row's padding
            cache.crop(-1)
            assert [pool.sequence(s).num_tokens for s in cache.seq_ids] == [26, 18]
    assert_released(pool)


@pytest.mark.parametrize("kw,again", [
    (dict(num_beams=3, do_sample=False), False),
    (dict(do_sample=True, top_k=20, num_return_sequences=3), False),
    (dict(num_beams=4, num_return_sequences=2, do_sample=False), False),
    (dict(do_sample=False), True),
], ids=["beams", "returned", "beams_returned", "rows_given_twice"])
def test_repeated_rows_run_once(model, kw, again):
    """generate repeats each of 2 prompts (27 and 37 tokens) a beam or returned
    sequence (or the caller gives the first one twice): the prompt pass runs the 2
    distinct rows, the repeats fork their sequences (sharing even the partly filled
    last blocks: 6 blocks of 8 held after it, not one more a repeat), and the tokens
    are transformers'."""
    pool = pool_for(model, 512)
    ids, mask = batch((3, 13))
    if again:
        ids, mask = torch.cat([ids, ids[:1]]), torch.cat([mask, mask[:1]])
    ref, _ = seeded(model, ids, mask, kw)
    (out, _), shapes = shapes_of(model, lambda: seeded(model, ids, mask, kw, pool))
    rows = [r for r, _ in shapes]
    assert torch.equal(ref, out)
    assert rows[0] == 2 and set(rows[1:]) == {len(ref) if "num_beams" not in kw
                                                    else len(ids) * kw["num_beams"]}, rows
    assert_released(pool)
    _, held = seeded(model, ids, mask, kw, pool_for(model, 512), new=1)  # the prompt's pass alone, nothing cached
    assert held == 6


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(do_sample=True, top_k=20), dict(num_beams=3, do_sample=False)],
                         ids=["greedy", "sampled", "beams"])
def test_a_batch_sharing_a_prompt_not_yet_cached_writes_it_once_first(model, kw):
    """Nothing cached: rows of 256 shared tokens and 3, 13 and 9 of their own. The shared
    blocks are written by a pass of their own (the first row's 256 tokens), then each row
    runs its tail (13 columns, 3 rows; beams: each distinct row once), not 259 columns a
    row (the first row's whole prompt, which the others' tails would read); the tokens are
    transformers'. Every block is written once: the blocks held are one system prompt's."""
    pool = pool_for(model, 512)
    ids, mask = batch((3, 13, 9), system=256)
    ref, _ = seeded(model, ids, mask, kw)
    (out, _), shapes = shapes_of(model, lambda: seeded(model, ids, mask, kw, pool))
    assert torch.equal(ref, out)
    assert shapes[:2] == [(1, 256), (3, 13)], shapes
    assert_released(pool)
    _, held = seeded(model, ids, mask, dict(do_sample=False), pool_for(model, 512), new=1)  # the prompt's pass alone
    assert held == 32 + 1 + 2 + 2  # the system's 32 blocks; the rows' own


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gives_transformers_tokens_with_a_shared_prompt_written_first(family):
    """Each family of test_hf_models (windows, soft caps, sinks, latent attention, shared
    K/V layers, ...): rows of 256 shared tokens not yet cached and 3, 13 and 9 of their
    own give transformers' tokens, the shared blocks written by a pass of their own
    first where the model's positions allow it (not where rotary frequencies follow a
    pass's length, nor where the forward takes no position ids: one pass, whole)."""
    model = make_model(family)
    pool = pool_for(model, 512)
    ids, mask = batch((3, 13, 9), system=256)
    with served_by_this_transformers(model):
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)

        def paged():
            with PagedCache(model, pool) as cache:
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                      **cache_kw(model, cache)), cache._splits and cache._takes_positions

        (out, splits), widths = widths_of(model, paged)
    assert torch.equal(ref, out)
    assert widths[:2] == ([256, 13] if splits else [269, 1]), widths
    assert_released(pool)
