"""`kvpager.hf.PagedCache`: transformers' own ``generate`` with its cache in a
kvpager pool gives the tokens (and beams, and scores) of transformers' default
cache, for every family kvpager serves, left-padded and on prefix-cache hits;
its sequences are freed when it closes, a failed pass leaves them as they were,
and a careless call is refused by name."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.cache_utils", reason="no transformers cache module")

from hf_versions import served_by_this_transformers  # noqa: E402
from test_hf_models import FAMILIES, make_model, one_thread  # noqa: E402, F401

from kvpager import KVPool  # noqa: E402
from kvpager.hf import PagedCache, spec_for_model  # noqa: E402
from kvpager.hf.recurrent_states import cache_argument  # noqa: E402

if not hasattr(transformers.cache_utils, "CacheLayerMixin"):
    pytest.skip(f"transformers {transformers.__version__} has no caches of layers", allow_module_level=True)

PROMPT = 20  # longer than the families' windows (6) and than two blocks of 8


def cache_kw(model, cache) -> dict:
    """``generate``'s cache keyword: ``cache`` where transformers names it so (5.x), else ``past_key_values``."""
    return {cache_argument(model): cache}


def padded_batch(rows: int = 3, pads: tuple[int, ...] = (0, 5, 11), seed: int = 1):
    """input_ids [rows, PROMPT] left-padded by ``pads`` (pad id 0), and their mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (rows, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    for r, p in enumerate(pads[:rows]):
        mask[r, :p] = 0
    ids[mask == 0] = 0
    return ids, mask


#: prompt-lookup decoding (transformers before 5.15 need an end-of-sequence id for it: one no model here emits)
PROMPT_LOOKUP = dict(prompt_lookup_num_tokens=3, eos_token_id=10**6)


@contextlib.contextmanager
def rolled_back_by_transformers():
    """Where transformers' own sliding-window cache cannot roll drafts back (before 5.15,
    past a window) the reference fails first (`both` runs it first): the test skips."""
    try:
        yield
    except ValueError as e:
        if "Cannot `crop`" not in str(e):
            raise
        pytest.skip(f"transformers {transformers.__version__}'s own sliding-window cache cannot roll back: {e}")


def pool_for(model, blocks: int = 256) -> KVPool:
    return KVPool(spec_for_model(model, num_blocks=blocks, block_size=8))


def both(model, pool, ids, mask, seed: int = 7, **kw):
    """(transformers' generate on its own cache, the same on a PagedCache of ``pool``), each
    from the same torch seed; the cache closed after."""
    torch.manual_seed(seed)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    with PagedCache(model, pool) as cache:
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, **cache_kw(model, cache), **kw)
    return ref, out


def assert_released(pool) -> None:
    assert pool.stats().num_sequences == 0
    pool.check_integrity()



@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_gives_transformers_tokens_padded_and_on_prefix_hits(family):
    """Left-padded prompts longer than the windows: the tokens of transformers' default cache;
    a second cache over the same pool matches the first one's committed blocks (prefix hits:
    their K/V read, not written) and gives the same tokens."""
    model = make_model(family)
    pool = pool_for(model)
    ids, mask = padded_batch()
    with served_by_this_transformers(model):
        ref, out = both(model, pool, ids, mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(ref, out)
    assert_released(pool)
    hits = pool.counters().prefix_hit_tokens
    widths = []  # the token columns of each pass the model runs
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: widths.append(i[0].shape[-1]))
    try:
        with PagedCache(model, pool) as cache:
            again = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                   **cache_kw(model, cache))
    finally:
        hook.remove()
    assert pool.counters().prefix_hit_tokens > hits
    assert torch.equal(ref, again)
    # the prompt pass ran the rows' uncached tails alone: 4, 7 and 1 of their 20, 15 and 9 tokens
    # (blocks of 8 cached), left-padded to 7
    assert widths[0] == 7, widths
    assert_released(pool)


@pytest.fixture(scope="module")
def model():
    return make_model("qwen2-sliding")  # full layers and sliding ones (window 6)


GENERATE_CASES = {
    "greedy": dict(do_sample=False),
    "sampled": dict(do_sample=True, top_k=20, temperature=0.8),
    "num_return_sequences": dict(do_sample=True, num_return_sequences=3),
    "beams": dict(num_beams=4, do_sample=False),
    "beams_returned": dict(num_beams=4, num_return_sequences=2, do_sample=False),
    "beams_sampled": dict(num_beams=3, do_sample=True),
    "processors": dict(do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=2),
    "prefill_chunked": dict(do_sample=False, prefill_chunk_size=8),  # a later chunk's pass: several tokens a row
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_features_give_transformers_tokens(model, case):
    pool = pool_for(model, 512)
    ids, mask = padded_batch(2)
    ref, out = both(model, pool, ids, mask, max_new_tokens=12, **GENERATE_CASES[case])
    assert torch.equal(ref, out)
    assert_released(pool)


def test_beam_scores_are_transformers(model):
    """Beam search's returned scores (the beams' and each step's) as transformers computes them."""
    pool = pool_for(model, 512)
    ids, mask = padded_batch(2)
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=3, do_sample=False,
              return_dict_in_generate=True, output_scores=True)
    ref, out = both(model, pool, ids, mask, **kw)
    assert torch.equal(ref.sequences, out.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=1e-4, atol=1e-5)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_beams_share_their_blocks(model):
    """Mid-search, the beams of one prompt hold its prompt's blocks once: forks, not copies."""
    pool = pool_for(model, 512)
    ids, mask = padded_batch(1, (0,))
    seen = []

    class Watch(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            seen.append(pool.stats().used_blocks)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with PagedCache(model, pool) as cache:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=4, do_sample=False,
                       stopping_criteria=transformers.StoppingCriteriaList([Watch()]), **cache_kw(model, cache))
    # 20 + 6 tokens: 4 blocks a beam; alone, 4 beams would hold 16; shared, the two full prompt
    # blocks once and a few of each beam's own
    assert max(seen) <= 2 + 4 * 2
    assert_released(pool)


@pytest.mark.parametrize("how", ["assistant_model", "prompt_lookup"])
def test_assisted_decoding_rolls_back_through_crop(model, how):
    """Assisted and prompt-lookup decoding verify drafted tokens and crop the rejected ones off
    the cache: the tokens are transformers'."""
    pool = pool_for(model, 512)
    ids, mask = padded_batch(1, (0,))
    extra = (dict(assistant_model=make_model("qwen2-sliding", seed=1)) if how == "assistant_model"
             else PROMPT_LOOKUP)
    crops = []
    crop = PagedCache.crop

    def counted(self, n):
        before = self.get_seq_length()
        crop(self, n)
        crops.append(before - self.get_seq_length())

    PagedCache.crop = counted
    try:
        with rolled_back_by_transformers():
            ref, out = both(model, pool, ids, mask, max_new_tokens=24, do_sample=False, **extra)
    finally:
        PagedCache.crop = crop
    assert torch.equal(ref, out)
    assert any(crops)  # drafts were rejected and cut off (negative counts; lengths before transformers 5.15)
    assert_released(pool)


def test_a_streamer_sees_transformers_tokens(model):
    pool = pool_for(model)
    ids, mask = padded_batch(1, (0,))
    got: list[list] = [[], []]

    class Streamer:
        def __init__(self, into):
            self.into = into

        def put(self, value):
            self.into.append(value.tolist())

        def end(self):
            self.into.append("end")

    torch.manual_seed(0)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, streamer=Streamer(got[0]))
    with PagedCache(model, pool) as cache:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                       streamer=Streamer(got[1]), **cache_kw(model, cache))
    assert got[0] == got[1] and got[0][-1] == "end"


def test_a_conversation_continues_on_its_cache(model):
    """generate again on the same cache with the first answer and a new turn appended: only the
    new columns run (a pass of several tokens a row after the first), as on transformers' cache."""
    pool = pool_for(model, 512)
    ids, mask = padded_batch(2)
    turn = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(9))
    dyn = transformers.DynamicCache()
    first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           **cache_kw(model, dyn))
    ids2 = torch.cat([first, turn], 1)
    mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    ref = model.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=6, do_sample=False,
                         **cache_kw(model, dyn))
    with PagedCache(model, pool) as cache:
        out1 = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              **cache_kw(model, cache))
        assert torch.equal(out1, first)
        out = model.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=6, do_sample=False,
                             **cache_kw(model, cache))
        assert cache.get_seq_length() == ids2.shape[1] + 5
    assert torch.equal(out, ref)
    assert_released(pool)


def test_reorder_and_select_fork_and_free(model):
    pool = pool_for(model)
    ids, mask = padded_batch(3, (0, 0, 0))
    with PagedCache(model, pool) as cache:
        model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kw(model, cache))
        first = list(cache.seq_ids)
        cache.reorder_cache(torch.tensor([2, 2, 0]))
        assert cache.seq_ids[0] == first[2] and cache.seq_ids[2] == first[0]
        assert pool.stats().num_sequences == 3 and first[1] not in pool.sequence_ids()
        tables = pool.tables(cache.seq_ids)[0]
        assert np.array_equal(tables[0][:2], tables[1][:2])  # the fork shares its full blocks
        cache.batch_repeat_interleave(2)
        assert len(cache.seq_ids) == 6 and cache.batch_size == 6
        cache.batch_select_indices(torch.tensor([1, 4]))
        assert pool.stats().num_sequences == 2
        pool.check_integrity()
    assert_released(pool)


def test_through_a_daemon_client(model):
    """A daemon `Client` as the pool: transformers' tokens (beams; a batch sharing 256
    tokens not yet cached, written first, one row given twice), nothing left held after close."""
    pytest.importorskip("zmq")
    from daemon_helpers import running_server
    from test_hf_paged_cache_tails import batch, widths_of

    from kvpager.client import Client

    spec = spec_for_model(model, num_blocks=256, block_size=8)
    ids, mask = padded_batch(2)
    shared, shared_mask = batch((3, 13, 9), system=256)
    shared, shared_mask = torch.cat([shared, shared[:1]]), torch.cat([shared_mask, shared_mask[:1]])
    with running_server(spec, heartbeat_timeout=60) as server, Client(server.endpoint) as c:
        ref, out = both(model, c, ids, mask, max_new_tokens=10, num_beams=2, do_sample=False)
        assert torch.equal(ref, out)
        (ref, out), widths = widths_of(model, lambda: both(model, c, shared, shared_mask, max_new_tokens=6,
                                                           do_sample=False))
        assert torch.equal(ref, out)
        assert widths[6:8] == [256, 13], widths  # (after transformers' own 6 passes)
        assert c.stats().num_sequences == 0
        c.check_integrity()


@pytest.mark.parametrize("family, releases", [("mistral", True), ("qwen2-sliding", False)])
def test_blocks_behind_every_window_are_given_back(family, releases, monkeypatch):
    """A model whose every layer has a sliding window (Mistral's 6 here) holds about a window and
    the margin a row however long it generates; one with a full layer keeps every block. Tokens
    are transformers' either way, prompt-lookup's crops within the margin included."""
    monkeypatch.setattr(PagedCache, "release_margin", 8)
    model = make_model(family)
    pool = pool_for(model, 512)
    ids, mask = padded_batch(2, (0, 3))
    seen = []

    class Watch(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            seen.append(pool.stats().used_blocks)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    kw = dict(max_new_tokens=40, do_sample=False, stopping_criteria=transformers.StoppingCriteriaList([Watch()]))
    ref, out = both(model, pool, ids, mask, **kw)
    assert torch.equal(ref, out)
    # rows of 20 and 17 + 40 tokens: 8 and 7 blocks of 8 held whole at the end; a window of 6 and a
    # margin of 8 behind each row's end: at most 4 blocks a row, whenever
    assert (max(seen) <= 2 * 4) if releases else seen[-1] >= 15
    kw.pop("stopping_criteria")
    with rolled_back_by_transformers():
        ref, out = both(model, pool, ids[:1], mask[:1], **PROMPT_LOOKUP, **kw)
    assert torch.equal(ref, out)
    assert_released(pool)


def test_a_row_whose_first_chunk_is_all_padding_joins_with_its_first_tokens(model):
    """Chunked prefill of a batch padded past a chunk: the third row has no tokens in the first
    pass, its sequence is allocated by the pass that brings them; beams after it fork it."""
    pool = pool_for(model, 512)
    ids, mask = padded_batch(3, (0, 5, 11))
    for kw in (dict(do_sample=False), dict(num_beams=2, do_sample=False)):
        ref, out = both(model, pool, ids, mask, max_new_tokens=8, prefill_chunk_size=8, **kw)
        assert torch.equal(ref, out)
        assert_released(pool)


def test_a_model_that_looks_into_its_cache_layers_sees_nothing_held_there():
    """Mllama asks each cross-attention layer of its cache whether it holds image states: a
    PagedCache's layers hold none (text only), and its tokens are transformers'."""
    import pathlib
    import sys

    tools = str(pathlib.Path(__file__).resolve().parent.parent / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    from family_configs import COMMON, LEAVE, OVERRIDES, tiny_config

    if not hasattr(transformers, "MllamaConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Mllama")
    fields = {k: v for k, v in {**COMMON, **OVERRIDES.get("mllama", {})}.items() if v is not LEAVE}
    torch.manual_seed(0)
    config = tiny_config("mllama", fields)
    if getattr(config.text_config, "rope_scaling", "") is None:  # (4.x's default, which its model cannot take)
        config.text_config.rope_scaling = {"rope_type": "default"}
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    pool = pool_for(model, 64)
    ids = torch.randint(3, 100, (1, 21), generator=torch.Generator().manual_seed(3))
    ref, out = both(model, pool, ids, torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(ref, out)
    assert_released(pool)
