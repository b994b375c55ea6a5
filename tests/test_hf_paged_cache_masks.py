"""`PagedCache` passes whose ``attention_mask`` is not plain left padding
(`kvpager.hf.cache_mask`): a later turn masking a row's last tokens (the
padding a finished row was fed) gives transformers' tokens, the row cut; padding
between a row's tokens gives transformers' tokens under full attention and is
refused under sliding windows (transformers counts them in cache columns); a
mask that drops other held tokens, or marks padding as tokens, or spans fewer
columns than the cache holds and the pass, a pass with no mask after padded
rows, and kept logits at right padding are refused, each before anything
changes."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.cache_utils", reason="no transformers cache module")

from test_hf_models import one_thread  # noqa: E402, F401
from test_hf_paged_cache import assert_released, cache_kw  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.errors import InvalidArgument  # noqa: E402
from kvpager.hf import PagedCache, spec_for_model  # noqa: E402

if not hasattr(transformers.cache_utils, "CacheLayerMixin"):
    pytest.skip(f"transformers {transformers.__version__} has no caches of layers", allow_module_level=True)

VOCAB, PROMPT = 128, 20


def make(kind: str, seed: int = 0, hidden: int = 64):
    """A small model whose logits spread widely (so a changed attention changes tokens);
    ``hidden`` 128 for a GPU pool (head dim 32: the kernels' least)."""
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, initializer_range=0.2,
                  bos_token_id=1, eos_token_id=None, pad_token_id=0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=6, **common))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def prompts(rows: int, seed: int, pads: tuple[int, ...] = ()):
    """input_ids [rows, PROMPT] left-padded by ``pads`` (id 0), and their mask."""
    ids = torch.randint(3, VOCAB, (rows, PROMPT), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
    return ids.masked_fill(mask == 0, 0), mask


def padded(like: torch.Tensor, pads: dict) -> torch.Tensor:
    """A mask of ``like``'s shape: 1s, but 0s at ``pads`` (row -> columns)."""
    mask = torch.ones_like(like)
    for row, columns in pads.items():
        mask[row, columns] = 0
    return mask


def pool_for(model, device: str = "cpu") -> KVPool:
    return KVPool(spec_for_model(model, num_blocks=512, block_size=8), device=device if device == "cpu" else "cuda:0")


def turns(model, cache, ids, mask, *more, eos):
    """Turns of a batched conversation on one cache (``more``: the turns after the
    first, token ids [rows, n] each): each turn's mask drops the padding each row was
    fed after its end token in the turn before. (the last turn's output, its mask)."""
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=eos, return_dict_in_generate=True,
              output_logits=True)
    out = model.generate(input_ids=ids, attention_mask=mask, **cache_kw(model, cache), **kw)
    for turn in more:
        new = out.sequences[:, ids.shape[1]:]
        ids = torch.cat([out.sequences, turn], 1)
        mask = torch.cat([mask, (new != 0).long(), torch.ones_like(turn)], 1)
        out = model.generate(input_ids=ids, attention_mask=mask, **cache_kw(model, cache), **kw)
    return out, mask


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_later_turn_masking_a_rows_last_tokens_gives_transformers_tokens(device):
    """(On a GPU pool the mask's earlier columns are summed on the device, read with its last.)"""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = make("llama", hidden=64 if device == "cpu" else 128).to(device)
    ids, mask = (t.to(device) for t in prompts(2, 2, (0, 5)))
    eos = int(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)[1, PROMPT + 1])
    turn = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(9)).to(device)
    ref, mask2 = turns(model, transformers.DynamicCache(config=model.config), ids, mask, turn, eos=eos)
    pool = pool_for(model, device)
    with PagedCache(model, pool) as cache:
        out, _ = turns(model, cache, ids, mask, turn, eos=eos)
        assert mask2[1, PROMPT:PROMPT + 8].tolist().count(0) > 0  # (the case: row 1 ended in turn 1)
        held = [pool.sequence(s).num_tokens for s in cache.seq_ids]
        assert held == [int(m.sum()) - 1 + 8 for m in mask2]  # (turn 2's last token not fed)
    assert torch.equal(out.sequences, ref.sequences)
    assert float((out.logits[0] - ref.logits[0]).abs().max()) < 1e-4
    assert_released(pool)
    pool.close()


def test_turns_after_a_rows_dropped_tokens_give_transformers_tokens(monkeypatch):
    """Three more turns: a row cut after its end token holds its tokens in columns
    apart; a later turn's mask drops its padding again (its last tokens, found through
    those columns)."""
    from kvpager.hf.cache_rows import CacheRows

    model = make("llama")
    ids, mask = prompts(2, 1, (0, 5))
    eos = int(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)[1, PROMPT + 1])
    more = [torch.randint(3, VOCAB, (2, n), generator=torch.Generator().manual_seed(n)) for n in (7, 1, 12)]
    ref, _ = turns(model, transformers.DynamicCache(config=model.config), ids, mask, *more, eos=eos)
    cuts, drop_tails = [], CacheRows.drop_tails
    monkeypatch.setattr(CacheRows, "drop_tails",
                        lambda rows, drop: cuts.append(bool(rows.gapped[drop > 0].any())) or drop_tails(rows, drop))
    pool = pool_for(model)
    with PagedCache(model, pool) as cache:
        out, _ = turns(model, cache, ids, mask, *more, eos=eos)
    assert cuts == [False, True]  # (the case: row 1 cut again once its tokens sat in columns apart)
    assert torch.equal(out.sequences, ref.sequences)
    assert_released(pool)


@pytest.mark.parametrize("chunk", [None, 5])
def test_padding_between_a_rows_tokens_gives_transformers_tokens_under_full_attention(chunk):
    """A first pass with holes in its mask, then a turn left-padded after the history;
    in parts too (the first part ends at row 1's hole: no refusal, the part's logits unread)."""
    model = make("llama")
    ids, _ = prompts(3, 4)
    mask = padded(ids, {1: slice(3, 6), 2: 10})
    turn = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(9))
    tmask = padded(turn, {1: slice(0, 3)})
    kw = dict(max_new_tokens=6, do_sample=False, prefill_chunk_size=chunk)

    def run(cache):
        first = model.generate(input_ids=ids, attention_mask=mask, **cache_kw(model, cache), **kw)
        mask2 = torch.cat([mask, torch.ones_like(first[:, PROMPT:]), tmask], 1)
        return first, model.generate(input_ids=torch.cat([first, turn.masked_fill(tmask == 0, 0)], 1),
                                     attention_mask=mask2, **cache_kw(model, cache), **kw)

    ref = run(transformers.DynamicCache(config=model.config))
    pool = pool_for(model)
    with PagedCache(model, pool) as cache:
        out = run(cache)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert_released(pool)


def test_a_sliding_window_model_refuses_padding_between_a_rows_tokens():
    model = make("mistral")
    ids, _ = prompts(2, 4)
    holes = padded(ids, {1: slice(3, 6)})
    pool = pool_for(model)
    with PagedCache(model, pool) as cache:
        with pytest.raises(InvalidArgument, match="padding between row 1's tokens.*sliding windows"):
            model.generate(input_ids=ids, attention_mask=holes, max_new_tokens=2, do_sample=False,
                           **cache_kw(model, cache))
        assert cache.seq_ids == [] and pool.stats().num_sequences == 0
        left = padded(ids, {1: slice(0, 4)})  # left padding: served
        first = model.generate(input_ids=ids, attention_mask=left, max_new_tokens=3, do_sample=False,
                               **cache_kw(model, cache))
        held = [pool.sequence(s).num_tokens for s in cache.seq_ids]
        turn = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(9))
        tmask = padded(turn, {1: slice(0, 2)})  # a next turn left-padded after the history: padding between row 1's tokens
        with pytest.raises(InvalidArgument, match="padding between row 1's tokens"):
            model.generate(input_ids=torch.cat([first, turn], 1), max_new_tokens=2, do_sample=False,
                           attention_mask=torch.cat([left, torch.ones_like(first[:, PROMPT:]), tmask], 1),
                           **cache_kw(model, cache))
        assert [pool.sequence(s).num_tokens for s in cache.seq_ids] == held
        pool.check_integrity()
    assert_released(pool)


def test_a_mask_that_drops_other_held_tokens_or_keeps_padding_is_refused():
    model = make("llama")
    ids, mask = prompts(2, 3, (0, 4))
    pool = pool_for(model)
    with PagedCache(model, pool) as cache:
        first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                               **cache_kw(model, cache))
        held = [pool.sequence(s).num_tokens for s in cache.seq_ids]
        turn = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(9))
        ids2 = torch.cat([first, turn], 1)
        mask2 = torch.cat([mask, torch.ones(2, 3 + 4, dtype=mask.dtype)], 1)
        middle = mask2.clone()
        middle[0, 7] = 0  # a token in the middle of row 0's
        with pytest.raises(InvalidArgument, match="not its last ones"):
            model.generate(input_ids=ids2, attention_mask=middle, max_new_tokens=2, do_sample=False,
                           **cache_kw(model, cache))
        padding = mask2.clone()
        padding[1, 0] = 1  # a column row 1 was fed as padding
        with pytest.raises(InvalidArgument, match="columns the cache was fed as padding"):
            model.generate(input_ids=ids2, attention_mask=padding, max_new_tokens=2, do_sample=False,
                           **cache_kw(model, cache))
        assert [pool.sequence(s).num_tokens for s in cache.seq_ids] == held
        model.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=2, do_sample=False,
                       **cache_kw(model, cache))  # the mask as fed: served
    assert_released(pool)


def test_a_mask_narrower_than_the_cache_and_the_pass_is_refused():
    """A mask of fewer columns than the cache was fed plus the pass's went unchecked:
    a cache reused for other prompts attended the earlier call's K/V too, and a pass
    that feeds the held tokens again (``use_cache=False``) stored them again, each
    giving other tokens than transformers', silently. Refused, nothing changed."""
    model = make("llama")
    ids, mask = prompts(3, 3, (0, 8, 4))
    other, other_mask = prompts(3, 5, (6, 0, 10))
    pool = pool_for(model)
    with PagedCache(model, pool) as cache:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                       **cache_kw(model, cache))
        held = [pool.sequence(s).num_tokens for s in cache.seq_ids]
        before = pool.stats()
        with pytest.raises(InvalidArgument, match="give the mask of every column so far"):
            model.generate(input_ids=other[:, :12], attention_mask=other_mask[:, :12], max_new_tokens=2,
                           do_sample=False, **cache_kw(model, cache))
        assert [pool.sequence(s).num_tokens for s in cache.seq_ids] == held
        assert pool.stats() == before
    assert_released(pool)
    with PagedCache(model, pool) as cache, pytest.raises(InvalidArgument, match="give the mask of every column"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=False,
                       **cache_kw(model, cache))
    assert_released(pool)


def test_kept_logits_at_right_padding_are_warned_of():
    """kvpager runs no query for padding: ``generate`` on a right-padded batch (whose
    next token transformers takes at the padding) warns, by name; a forward keeping
    every position's logits gives transformers' at the tokens."""
    model = make("llama")
    ids, _ = prompts(2, 4)
    mask = padded(ids, {1: slice(15, None)})
    ids = ids.masked_fill(mask == 0, 0)
    pool = pool_for(model)
    with PagedCache(model, pool) as cache, pytest.warns(UserWarning, match="row 1's tokens .right padding"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                       **cache_kw(model, cache))
    with PagedCache(model, pool) as cache, torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kw(model, cache)).logits
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert float((out[real] - ref[real]).abs().max()) < 1e-4
    assert_released(pool)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_pass_reads_its_ids_positions_and_mask_as_given(device):
    """`cache_mask.read` (on a GPU one copy of ids, positions, the mask's last
    columns and its earlier columns' row sums) against the tensors themselves:
    decode and prompt passes, bool and int masks, a mask spanning more columns (one
    spanning fewer is refused),
    positions of another shape, a mask on the host beside ids on the device."""
    from kvpager.hf import cache_mask

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator().manual_seed(3)
    for rows, width, columns in ((5, 1, 30), (3, 9, 0), (4, 6, 12)):
        ids = torch.randint(0, VOCAB, (rows, width), generator=g)
        mask = torch.randint(0, 2, (rows, columns + width), generator=g)
        mask[:, -1] = 1
        if columns:  # a mask of fewer columns than the cache's and the pass's: refused
            with pytest.raises(InvalidArgument, match="give the mask of every column so far"):
                cache_mask.read(mask[:, 1:].to(device), ids.to(device), None, columns)
        for m in (mask, mask.bool(), torch.cat([torch.ones_like(mask[:, :1]), mask], 1), None):
            spans = m is not None and columns and m.shape[1] == columns + width
            for pos in (torch.arange(columns, columns + width).expand(rows, width), None,
                        torch.arange(columns, columns + width)[None]):
                for mask_device in {device, "cpu"}:
                    got = cache_mask.read(None if m is None else m.to(mask_device), ids.to(device),
                                          None if pos is None else pos.to(device), columns)
                    assert np.array_equal(got.tokens, ids.numpy())
                    assert np.array_equal(got.real, np.ones((rows, width), bool) if m is None
                                          else m[:, -width:].bool().numpy())
                    assert (got.held is None) == (not spans)
                    assert not spans or np.array_equal(got.held, m[:, :columns].long().sum(1).numpy())
                    assert (got.positions is None) == (pos is None or pos.shape != (rows, width))
                    assert got.positions is None or np.array_equal(got.positions, pos.numpy())


def test_a_pass_without_a_mask_after_padded_rows_is_refused():
    """A pass without ``attention_mask`` takes every column so far as a token:
    transformers attends the K/V its cache holds for a row's padding too, where a
    PagedCache holds tokens alone, so a padded row's logits were other ones, with no
    word; and `generate` drops a second turn's mask of all 1s, so a turn after a
    padded one given such a mask ran so. Refused, nothing changed; a batch fed no
    padding is served without a mask, with transformers' logits."""
    model = make("llama")
    ids, mask = prompts(2, 3, (0, 6))
    turn = torch.randint(3, VOCAB, (2, 3), generator=torch.Generator().manual_seed(4))
    pool = pool_for(model)
    with torch.no_grad(), PagedCache(model, pool) as cache:
        model(input_ids=ids, attention_mask=mask, **cache_kw(model, cache))
        held, before = [pool.sequence(s).num_tokens for s in cache.seq_ids], pool.stats()
        with pytest.raises(InvalidArgument, match="row 1 was fed 20 columns of which the cache holds 14"):
            model(input_ids=turn, **cache_kw(model, cache))
        assert [pool.sequence(s).num_tokens for s in cache.seq_ids] == held
        assert pool.stats() == before
        assert cache.get_seq_length() == PROMPT
        with pytest.raises(InvalidArgument, match="a pass without attention_mask"):
            model.generate(input_ids=torch.cat([ids, turn], 1), attention_mask=torch.ones(2, PROMPT + 3,
                           dtype=mask.dtype), max_new_tokens=2, do_sample=False, **cache_kw(model, cache))
        assert [pool.sequence(s).num_tokens for s in cache.seq_ids] == held
        model(input_ids=turn, attention_mask=torch.cat([mask, torch.ones_like(turn)], 1),
              **cache_kw(model, cache))  # the mask of every column: served
    assert_released(pool)
    full, _ = prompts(2, 5)
    with torch.no_grad(), PagedCache(model, pool) as cache:
        dyn = transformers.DynamicCache(config=model.config)
        model(input_ids=full, **cache_kw(model, dyn))
        model(input_ids=full, **cache_kw(model, cache))
        want = model(input_ids=turn, **cache_kw(model, dyn)).logits
        got = model(input_ids=turn, **cache_kw(model, cache)).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert_released(pool)

