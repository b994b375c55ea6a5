"""The recurrent states of models with recurrent layers (`kvpager.hf.recurrent_states`, `kvpager.hf.state_cache`):
where they live during decode (`States`: rows kept in place as sequences end, a
captured step's warm-up putting them back) and the prefix reuse they allow
(`StateCache`: states held at block boundaries; a prompt resumes from the
longest held one within its cached tokens, a prompt whose cached blocks reach
past it holds one there; the tokens each pass runs counted). The state cache's
own bounds: test_hf_state_cache.py; the states held where generations end:
test_hf_recurrent_ends.py.
Tiny random models in float32 on the CPU backend, tokens against transformers'
own generate."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not hasattr(__import__("transformers.cache_utils").cache_utils, "LinearAttentionCacheLayerMixin"):
    pytest.skip("transformers without linear-attention cache layers", allow_module_level=True)

from test_hf_recurrent import (  # noqa: E402
    FAMILIES,
    assert_nothing_held,
    computed_tokens,
    make,
    prompts,
    reference,
)

from kvpager import KVPool  # noqa: E402
from kvpager.hf import generate, spec_for_model  # noqa: E402


@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if f not in ("zamba", "jamba", "zamba2")])
def test_a_prompt_seen_before_resumes_from_its_held_state(family, monkeypatch):
    """The same prompts three times over one pool. The first run publishes their
    blocks; the second finds them cached but no state there: it runs each prompt up
    to its cached tokens, holds the state at that block boundary, then the rest;
    the third resumes from the held states and runs only the tokens after them.
    Every run gives transformers' tokens, nothing is left held. Every family whose
    recurrent layers continue a pass from held states (`CONTINUING`: all tested but
    Zamba, Jamba and Zamba2, below)."""
    from kvpager.hf.state_cache import StateCache

    model = make(family)
    pool = KVPool(spec_for_model(model, num_blocks=96, block_size=8))
    ps = prompts(24, 17, 5)
    with torch.inference_mode():
        want = reference(model, ps, 3)
    store = StateCache.of(model)
    store.clear()
    seen = computed_tokens(monkeypatch)
    assert generate(model, pool, ps, max_new_tokens=3, eos_token_id=None) == want
    assert store.stores == 1
    first = list(seen)
    seen.clear()
    assert generate(model, pool, ps, max_new_tokens=3, eos_token_id=None) == want
    # the first run held the 24-token prompt's state where it ended (at 24: its prompt
    # filled 3 blocks, its answer none); the second 24 -> at 16, 17 -> at 16 (5: no whole block)
    assert store.stores == 1 + 2 and store.hits == 0
    second = list(seen)
    seen.clear()
    assert generate(model, pool, ps, max_new_tokens=3, eos_token_id=None) == want
    third = list(seen)
    assert store.hits == 2
    # the prefills: 24 + 17 + 5 tokens each time before; the third from the held states: 8 + 1 + 5
    assert sum(first[: len(first) - 2]) == 46 and sum(second[: len(second) - 2]) == 46
    assert sum(third[: len(third) - 2]) == 8 + 1 + 5
    assert pool.stats().prefix_hit_tokens > 0
    assert_nothing_held(pool)


def test_a_shared_system_prompt_is_run_once_for_the_requests_after_the_second(monkeypatch):
    """Requests that share a 40-token system prompt, one generation each: the first
    publishes its blocks, the second holds the state where they end (40 tokens), and
    every later one resumes there, running its own tokens only. A follow-up turn
    (the first request, its answer and more) resumes where the first request's
    generation ended (its state held there, past the answer's first tokens), and
    so does the same turn sent again. Each gives transformers' tokens."""
    from kvpager.hf.state_cache import StateCache

    model = make("qwen3_next")
    pool = KVPool(spec_for_model(model, num_blocks=128, block_size=8))
    StateCache.of(model).clear()
    [system] = prompts(40, seed=21)
    users = [system + u for u in prompts(6, 11, 3, 9, seed=22)]
    seen = computed_tokens(monkeypatch)
    for i, p in enumerate(users):
        seen.clear()
        with torch.inference_mode():
            [want] = reference(model, [p], 3)
        assert generate(model, pool, [p], max_new_tokens=3, eos_token_id=None) == [want]
        prefill = seen[0] if i != 1 else seen[0] + seen[1]
        assert prefill == (len(p) if i < 2 else len(p) - 40), (i, seen)
    first = users[0]
    with torch.inference_mode():
        [answer] = reference(model, [first], 3)
    # its blocks through the answer's second token (fed, so written and published): 48 tokens
    turn = first + answer[:2] + prompts(7, seed=23)[0]
    with torch.inference_mode():
        [want2] = reference(model, [turn], 3)
    for held in (48, 48):  # the state where the first request's generation ended
        seen.clear()
        assert generate(model, pool, [turn], max_new_tokens=3, eos_token_id=None) == [want2]
        assert sum(seen[: len(seen) - 2]) == len(turn) - held, seen
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


def test_states_keep_the_rows_left_in_place():
    """`States.keep`: the rows left, in their new order, in the first rows of the
    same tensors (their addresses unchanged, as a captured graph reads them); a
    cache of n rows sees the first n."""
    from kvpager.hf import PagedGeneration
    from kvpager.hf.recurrent import States
    from kvpager.hf.recurrent_states import rows_of

    model = make("qwen3_5")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    with PagedGeneration(model, pool, prompts(5, 12, 3, 20, seed=7), 3, eos_token_id=None, pipeline=False) as gen:
        held = gen._recurrent.states
        states = States(model, held.layout, rows_of(held.cache(held.n), held.layout), held.rows, 8)
        assert len(states.tensors) > 0 and all(t.shape[0] == 8 for t in states.tensors)
        before = [t.clone() for t in states.tensors]
        ptrs = [t.data_ptr() for t in states.tensors]
        order = list(states.rows)
        keep = [order[3], order[0], order[2]]
        states.keep(keep)
        assert states.rows == keep and states.n == 3
        assert [t.data_ptr() for t in states.tensors] == ptrs
        for t, b in zip(states.tensors, before):
            assert torch.equal(t[:3], b[[3, 0, 2]])
        cache = states.cache(4)
        for (i, kind, k, _), p in zip(states.layout, ptrs):
            t = getattr(cache.layers[i], f"{kind}_states")[k]
            assert t.shape[0] == 4 and t.data_ptr() == p
            assert getattr(cache.layers[i], f"is_{kind}_states_initialized")[k]
        assert states.cache(4) is cache


def test_a_captured_steps_warm_up_leaves_the_states_as_it_found_them():
    """`Recurrent.graph_pass` run outside a capture (the eager run before one; here
    over the states' first 3 of 4 rows: the CPU backend plans no padding rows,
    which the GPU tests cover) gives the eager decode pass's tokens and leaves
    every state as it was; the eager pass then advances them."""
    from kvpager.hf import PagedGeneration, paged_attention
    from kvpager.hf.recurrent import States
    from kvpager.hf.recurrent_states import rows_of

    model = make("qwen3_5")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    with PagedGeneration(model, pool, prompts(5, 12, 3, seed=5), 3, eos_token_id=None, pipeline=False) as gen:
        rec = gen._recurrent
        rows = [0, 1, 2]
        rec.keep(rows)
        held = rec.states
        rec.states = States(model, held.layout, rows_of(held.cache(3), held.layout), rows, 4)
        ids = [gen.seq_ids[i] for i in rows]
        slots = pool.append_flat(ids, 1, [[gen.outputs[i][-1]] for i in rows])
        heads = model.config.num_attention_heads
        tokens = torch.tensor([[gen.outputs[i][-1] for i in rows]])
        positions = torch.tensor([[gen.position(i) for i in rows]])
        plan = pool.plan(ids, [1, 1, 1], slots, num_q_heads=heads)
        before = rec.states.snapshot()
        with torch.inference_mode(), paged_attention(model):
            warm = rec.graph_pass(model, gen._batch(plan), tokens, positions)
        assert all(torch.equal(t, b) for t, b in zip(rec.states.tensors, before))
        eager = rec.decode(plan, tokens, positions)
        assert warm.tolist() == eager.tolist()
        assert not all(torch.equal(t[:3], b[:3]) for t, b in zip(rec.states.tensors, before))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_families_that_continue_from_held_states_are_known(family):
    """`kvpager.hf.recurrent.CONTINUING` names every tested family but Zamba and Jamba,
    whose Mamba layers scan a pass of several tokens from a zero state (below), and
    Zamba2, whose decode steps leave other states than its scan, taken so without a word; a model of a type neither list names is taken as one that does
    not continue, with a warning, once a process."""
    import warnings

    from kvpager.hf import recurrent

    model = make(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert recurrent.continues(model) == (family not in ("zamba", "jamba", "zamba2"))
    model.config.model_type = f"a_new_hybrid_{family}"
    with pytest.warns(UserWarning, match="not among the types whose recurrent layers are known to continue"):
        assert not recurrent.continues(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not recurrent.continues(model)  # (once)


@pytest.mark.parametrize("pad", [None, False], ids=["default", "in-parts"])
def test_a_model_whose_recurrent_layers_do_not_continue_runs_each_prompt_whole(pad, monkeypatch):
    """Zamba's Mamba layers scan every pass of more than one token from a zero state,
    whatever its cache holds: its prompts of distinct lengths run in parts, and its
    prompts resumed from held states, gave other tokens than transformers' (without
    an error). Its prompts now run whole from their first tokens, in one left-padded
    pass even where parts are asked for, and no state is held or looked up for them:
    transformers' tokens, run after run over one pool (whose K/V blocks are found
    cached all the same)."""
    from kvpager.hf.recurrent import Recurrent
    from kvpager.hf.state_cache import StateCache

    monkeypatch.setattr(Recurrent, "pad_prompts", pad)
    model = make("zamba")
    store = StateCache.of(model)
    store.clear()
    pool = KVPool(spec_for_model(model, num_blocks=128, block_size=8))
    ps = prompts(9, 7, 40, 1, 16, 24)
    with torch.inference_mode():
        want = reference(model, ps, 5)
    seen = computed_tokens(monkeypatch)
    for _ in range(3):
        seen.clear()
        assert generate(model, pool, ps, max_new_tokens=5, eos_token_id=None) == want
        assert seen[0] == sum(len(p) for p in ps) and len(seen) == 1 + 4  # (one prefill pass, 4 decode passes)
    assert store.stores == store.hits == 0
    assert pool.stats().prefix_hit_tokens > 0
    assert_nothing_held(pool)


def test_layers_that_neither_attend_nor_recur_may_hold_any_cache_layer(monkeypatch):
    """transformers 5.17 gives NemotronH's mixture-of-experts and MLP layers linear-attention
    cache layers (later releases: placeholders); those layers touch no cache, so kvpager
    takes them as they come and gives transformers' tokens. A recurrent layer without a
    linear-attention cache layer, or an attention layer without a K/V layer, is still
    refused by name."""
    from transformers import cache_utils

    from kvpager.errors import UnsupportedModel
    from kvpager.hf import recurrent_states

    model = make("nemotron_h")
    kinds = model.config.layer_types
    assert "moe" in kinds and "mlp" in kinds
    real = recurrent_states.cache_classes()

    def as_517(swap):
        class Cache(real[0]):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                for i, kind in enumerate(kinds):
                    if kind in swap:
                        self.layers[i] = cache_utils.LinearAttentionLayer()
        return Cache

    monkeypatch.setattr(recurrent_states, "cache_classes", lambda: (as_517({"moe", "mlp"}), *real[1:]))
    cache = recurrent_states.new_cache(model)
    assert [type(x).__name__ for x in cache.layers].count("LinearAttentionLayer") == 3
    ps = prompts(21, 9)
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    assert generate(model, pool, ps, max_new_tokens=6) == reference(model, ps, 6)
    pool.close()
    monkeypatch.setattr(recurrent_states, "cache_classes", lambda: (as_517({"full_attention"}), *real[1:]))
    with pytest.raises(UnsupportedModel, match="cannot tell where its state lives"):
        recurrent_states.new_cache(model)


def test_kept_states_take_a_later_batchs_rows_in_place():
    """`fixed_states` (`kvpager.hf.CapturedSteps` for recurrent models): a later batch's
    rows are loaded into the states kept with the captured steps (the same tensors,
    rows past them zeroed, none marked), where they fit; a batch of more rows, or of
    states shaped otherwise, gets new states (at least as many rows as the kept) and
    the captured steps over the old ones are dropped. The GPU tests replay graphs over
    them: test_hf_kept_graphs_recurrent.py."""
    from types import SimpleNamespace

    from kvpager.hf import PagedGeneration
    from kvpager.hf.recurrent import States
    from kvpager.hf.recurrent_states import fixed_states, rows_of

    model = make("qwen3_5")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))

    def rows_after(*lengths, seed):
        with PagedGeneration(model, pool, prompts(*lengths, seed=seed), 2, eos_token_id=None,
                             pipeline=False) as gen:
            held = gen._recurrent.states
            return held.layout, [tuple(t.clone() for t in r) for r in rows_of(held.cache(held.n), held.layout)]

    layout, first = rows_after(5, 12, 3, seed=11)
    _, later = rows_after(9, 4, seed=12)
    kept = States(model, layout, first, [0, 1, 2], 8)
    kept.mark([0, 2], [8, 8])
    ptrs = [t.data_ptr() for t in kept.tensors]
    dropped = []
    graphs = SimpleNamespace(states=kept, drop=lambda: dropped.append(1))
    assert fixed_states(graphs, model, layout, later, 2, 2) is kept and not dropped
    assert [t.data_ptr() for t in kept.tensors] == ptrs and kept.rows == [0, 1] and kept.n == 2
    assert kept.marked == [0, 0]
    for j, t in enumerate(kept.tensors):
        assert torch.equal(t[0], later[0][j][0]) and torch.equal(t[1], later[1][j][0])
        assert not t[2:].any()
    # more rows than the kept states hold: new ones (the requested 16 rows), the old steps dropped
    many = later * 5
    grown = fixed_states(graphs, model, layout, many, 10, 16)
    assert grown is not kept and graphs.states is grown and dropped == [1] and grown.capacity == 16
    assert all(torch.equal(t[9], later[1][j][0]) for j, t in enumerate(grown.tensors))
    # a batch that fits asks for fewer rows: the kept 16 serve it; states of another dtype do not
    assert fixed_states(graphs, model, layout, later, 2, 2) is grown and dropped == [1]
    other = [tuple(t.double() for t in r) for r in later]
    assert fixed_states(graphs, model, layout, other, 2, 2).capacity == 16 and dropped == [1, 1]
    # without captured steps, states of their own
    assert fixed_states(None, model, layout, later, 2, 4).capacity == 4
    pool.check_integrity()
