"""The recurrent states of models with recurrent layers (`kvpager.hf.recurrent_states`):
where they live during decode (`States`: rows kept in place as sequences end, a
captured step's warm-up putting them back) and the prefix reuse they allow
(`StateCache`: states held at block boundaries; a prompt resumes from the
longest held one within its cached tokens, a prompt whose cached blocks reach
past it holds one there; the tokens each pass runs counted). Tiny random models
in float32 on the CPU backend, tokens against transformers' own generate."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not hasattr(__import__("transformers.cache_utils").cache_utils, "LinearAttentionCacheLayerMixin"):
    pytest.skip("transformers without linear-attention cache layers", allow_module_level=True)

from test_hf_recurrent import assert_nothing_held, make, prompts, reference  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import generate, spec_for_model  # noqa: E402


def _computed(monkeypatch) -> list[int]:
    """The tokens each forward pass of `Recurrent` runs (rows x tokens), as they come."""
    from kvpager.hf.recurrent import Recurrent

    seen: list[int] = []
    real = Recurrent._pass

    def spy(self, plan, *args):
        seen.append(plan.num_tokens)  # (tokens, not the padding of left-padded rows)
        return real(self, plan, *args)

    monkeypatch.setattr(Recurrent, "_pass", spy)
    return seen


@pytest.mark.parametrize("family", ["qwen3_5", "jamba", "lfm2", "falcon_h1"])
def test_a_prompt_seen_before_resumes_from_its_held_state(family, monkeypatch):
    """The same prompts three times over one pool. The first run publishes their
    blocks; the second finds them cached but no state there: it runs each prompt up
    to its cached tokens, holds the state at that block boundary, then the rest;
    the third resumes from the held states and runs only the tokens after them.
    Every run gives transformers' tokens, nothing is left held."""
    from kvpager.hf.recurrent_states import StateCache

    model = make(family)
    pool = KVPool(spec_for_model(model, num_blocks=96, block_size=8))
    ps = prompts(24, 17, 5)
    with torch.inference_mode():
        want = reference(model, ps, 3)
    store = StateCache.of(model)
    store.clear()
    seen = _computed(monkeypatch)
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
    from kvpager.hf.recurrent_states import StateCache

    model = make("qwen3_next")
    pool = KVPool(spec_for_model(model, num_blocks=128, block_size=8))
    StateCache.of(model).clear()
    [system] = prompts(40, seed=21)
    users = [system + u for u in prompts(6, 11, 3, 9, seed=22)]
    seen = _computed(monkeypatch)
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


def test_no_states_held_with_a_state_cache_of_no_bytes():
    """``max_bytes`` 0: nothing held, no prompt split; blocks still shared, tokens
    still transformers'."""
    from kvpager.hf.recurrent_states import StateCache

    model = make("qwen3_5")
    store = StateCache.of(model)
    store.clear()
    store.max_bytes = 0
    try:
        pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
        ps = prompts(24, 17)
        with torch.inference_mode():
            want = reference(model, ps, 3)
        for _ in range(3):
            assert generate(model, pool, ps, max_new_tokens=3, eos_token_id=None) == want
        assert store.stores == 0 and not store.entries and pool.stats().prefix_hit_tokens > 0
    finally:
        store.max_bytes = 1 << 30


def test_the_state_cache_drops_the_least_recently_used_past_its_bytes():
    from kvpager.hf.recurrent_states import StateCache

    store = StateCache(max_bytes=3 * 64)
    row = (torch.zeros(1, 4), torch.zeros(1, 12))  # 64 bytes
    for key in (b"a", b"b", b"c"):
        store.put(key, (), row)
    assert store.best([b"a"], 8, 8)[0] == 8  # "a" served: "b" is now the oldest on probation
    store.put(b"d", (), row)
    assert list(store.entries) == [b"c", b"d", b"a"] and store.nbytes == 3 * 64
    store.put(b"big", (), (torch.zeros(1, 100),))  # more than the whole budget alone: not held
    assert b"big" not in store.entries
    held = store.entries[b"d"][1][0]
    row[0][0, 0] = 5.0
    assert held[0, 0] == 0  # a copy, not the caller's tensor


def test_states_prompts_resume_from_outlast_a_flood_of_new_ones():
    """A segmented LRU: a state a prompt resumed from (a shared system prompt's)
    stays while many states come in and are never asked for (a large batch's end
    states), which push out each other instead; states served keep at most
    `USED_SHARE` of the budget, the least recently served going back on probation."""
    from kvpager.hf.recurrent_states import StateCache

    row = (torch.zeros(1, 16),)  # 64 bytes
    store = StateCache(max_bytes=10 * 64)
    store.put(b"system", (), row)
    assert store.best([b"system"], 8, 8)[0] == 8
    for k in range(40):
        store.put(b"end%d" % k, (), row)
    held = store.entries
    assert b"system" in held and store.nbytes == 10 * 64
    assert [k for k in held if k != b"system"] == [b"end%d" % k for k in range(31, 40)]  # the newest 9
    for k in range(31, 40):  # all served: 7 of 64 bytes fit in 75% of 640, the others back on probation
        assert store.best([b"end%d" % k], 8, 8)[0] == 8
    assert len(store.used) == 7 and store.nbytes == 10 * 64
    assert list(store.used) == [b"end%d" % k for k in range(33, 40)]
    assert list(store.fresh) == [b"system", b"end31", b"end32"]
    store.max_bytes = 4 * 64  # 3 served fit in 75%: the rest go, probation first
    assert list(store.entries) == [b"end36", b"end37", b"end38", b"end39"]


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


def test_blocks_evicted_between_the_probe_and_the_allocation(monkeypatch):
    """The probe said more was cached than the allocation then found (another
    worker's allocations evicted the blocks between the two calls; simulated:
    the probe counts 16 tokens of a prompt nothing of which is cached). The
    prompt is allocated up to where the probe said, runs from its first token,
    holds the state there and runs the rest: transformers' tokens, nothing left."""
    from kvpager.hf.recurrent_states import StateCache

    model = make("qwen3_5")
    StateCache.of(model).clear()
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    ps = prompts(21, 9, seed=31)
    with torch.inference_mode():
        want = reference(model, ps, 3)
    monkeypatch.setattr(pool, "cached_tokens", lambda prompts, salt=None: [16, 8])
    seen = _computed(monkeypatch)
    assert generate(model, pool, ps, max_new_tokens=3, eos_token_id=None) == want
    assert sum(seen[:-2]) == 21 + 9 and StateCache.of(model).stores == 2
    assert_nothing_held(pool)


def test_held_states_serve_only_weights_of_their_dtype():
    """States held for a float32 model, under a salt given by the caller (which does
    not change with the dtype): after the model moves to bfloat16 they are not
    taken (they were, and the pass failed on the mixed dtypes, reported as a model
    kvpager cannot serve); the bfloat16 model's tokens are transformers'."""
    from kvpager.hf.recurrent_states import StateCache

    model = make("qwen3_5")
    StateCache.of(model).clear()
    [p] = prompts(43, seed=3)
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    for _ in range(2):
        generate(model, pool, [p], max_new_tokens=3, eos_token_id=None, salt="s")
    assert StateCache.of(model).stores == 1
    model.to(torch.bfloat16)
    with torch.inference_mode():
        [want] = reference(model, [p], 3)
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    for _ in range(3):
        assert generate(model, pool, [p], max_new_tokens=3, eos_token_id=None, salt="s") == [want]
    assert pool.stats().num_sequences == 0


def test_a_lower_budget_drops_held_states_at_once():
    """`max_bytes` lowered (to 0 included) drops the least recently used states past
    it at once, so none of them is served afterwards; a negative or non-int budget
    is refused."""
    from kvpager.hf.recurrent_states import StateCache

    model = make("qwen3_5")
    store = StateCache.of(model)
    store.clear()
    try:
        pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
        [p] = prompts(41, seed=3)
        for _ in range(2):
            generate(model, pool, [p], max_new_tokens=2, eos_token_id=None)
        assert len(store.entries) == 1 and store.nbytes > 0
        store.max_bytes = store.nbytes - 1
        assert not store.entries and store.nbytes == 0
        store.max_bytes = 0
        generate(model, pool, [p], max_new_tokens=2, eos_token_id=None)
        assert store.hits == 0 and not store.entries
        for bad in (-1, 1.5, True, "1"):
            with pytest.raises(ValueError, match="max_bytes"):
                store.max_bytes = bad
    finally:
        store.max_bytes = 1 << 30


@pytest.mark.parametrize("family,pipeline", [("qwen3_5", True), ("qwen3_5", False), ("jamba", True),
                                             ("falcon_h1", True)])
def test_a_conversations_next_turn_resumes_after_the_answer(family, pipeline, monkeypatch):
    """Three prompts answered in one batch, two of them ending on end tokens at
    different steps (their rows leave the batch while the third goes on). Each
    sequence's states at the last block boundary its prompt and answer ran are
    held when it ends, so each one's next turn (prompt, answer, 7 new tokens)
    runs only what follows that boundary: the answer is not run again. Tokens are
    transformers' for the batch and for every turn; nothing is left held."""
    from kvpager.hf.recurrent_states import StateCache

    model = make(family)
    store = StateCache.of(model)
    store.clear()
    bs = 8
    pool = KVPool(spec_for_model(model, num_blocks=128, block_size=bs))
    ps = prompts(21, 13, 30, seed=41)
    with torch.inference_mode():
        free = reference(model, ps, 24)
    eos = [free[0][15], free[2][10]]
    with torch.inference_mode():
        want = reference(model, ps, 24, eos=eos)
    assert len({len(w) for w in want}) > 1 and max(map(len, want)) == 24
    assert generate(model, pool, ps, max_new_tokens=24, eos_token_id=eos, pipeline=pipeline) == want
    assert_nothing_held(pool)
    seen = _computed(monkeypatch)
    resumed = 0
    for p, answer, more in zip(ps, want, prompts(7, 7, 7, seed=43)):
        turn = p + answer + more
        ran = len(p) + len(answer) - 1  # the answer's last token was never fed
        # held where it ended: its last block boundary, where it had one at or past its prompt's end
        # (none else: the turn then runs from its first token, holding a state on its way)
        held = ran - ran % bs if ran - ran % bs >= len(p) else 0
        resumed += held > len(p)
        with torch.inference_mode():
            [want2] = reference(model, [turn], 3)
        seen.clear()
        assert generate(model, pool, [turn], max_new_tokens=3, eos_token_id=None, pipeline=pipeline) == [want2]
        assert sum(seen[:-2]) == len(turn) - held, (held, seen)
    assert resumed >= 2  # (past their answers' first tokens)
    assert_nothing_held(pool)


def test_no_states_held_where_generations_end_with_hold_ends_off(monkeypatch):
    """``hold_ends=False``: a generation keeps no second copy of its states and holds
    none where its sequences end; the next turn finds none past its first block
    boundaries, so it runs its cached tokens again (and holds the state there). Tokens
    still transformers'."""
    from kvpager.hf.recurrent_states import StateCache

    model = make("qwen3_5")
    store = StateCache.of(model)
    store.clear()
    store.hold_ends = False
    try:
        pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
        [p] = prompts(21, seed=43)
        with torch.inference_mode():
            [answer] = reference(model, [p], 12)
        assert generate(model, pool, [p], max_new_tokens=12, eos_token_id=None) == [answer]
        assert store.stores == 0 and not store.entries
        turn = p + answer + prompts(5, seed=44)[0]
        with torch.inference_mode():
            [want] = reference(model, [turn], 3)
        seen = _computed(monkeypatch)
        assert generate(model, pool, [turn], max_new_tokens=3, eos_token_id=None) == [want]
        assert sum(seen[:-2]) == len(turn) and store.stores == 1
    finally:
        store.hold_ends = True


def test_marks_follow_their_rows_as_the_states_keep_them():
    """`States.mark` copies rows' states as they are (later steps leave the marks as
    they were), and `keep` moves each row's mark, and the tokens it was taken at,
    with the row."""
    from kvpager.hf import PagedGeneration
    from kvpager.hf.recurrent import States
    from kvpager.hf.recurrent_states import rows_of

    model = make("qwen3_5")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    with PagedGeneration(model, pool, prompts(5, 12, 3, 20, seed=7), 3, eos_token_id=None, pipeline=False) as gen:
        held = gen._recurrent.states
        states = States(model, held.layout, rows_of(held.cache(held.n), held.layout), held.rows, 6)
        before = [t.clone() for t in states.tensors]
        states.mark([1, 3], [16, 24])
        for t in states.tensors:
            t.add_(1.0)  # a step
        assert states.marked == [0, 16, 0, 24]
        for k in (1, 3):
            assert all(torch.equal(m[0], b[k]) for m, b in zip(states.marked_rows(k), before))
        order = list(states.rows)
        states.keep([order[3], order[2], order[1]])
        assert states.marked == [24, 0, 16]
        assert all(torch.equal(m[0], b[3]) for m, b in zip(states.marked_rows(0), before))
        assert all(torch.equal(m[0], b[1]) for m, b in zip(states.marked_rows(2), before))


def test_an_end_token_that_fills_a_block_leaves_the_mark_before_it(monkeypatch):
    """Pipelined, a sequence's end token is run by the pass after it all the same; where
    that token fills a block (never published: its id is not recorded), the states
    held are those of the boundary before it, whose block is cached, so the next
    turn still resumes after most of the answer (before, the mark moved onto the
    unpublished block and the next turn ran everything again)."""
    from kvpager.hf.recurrent_states import StateCache

    model = make("qwen3_5")
    StateCache.of(model).clear()
    bs = 8
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=bs))
    [p] = prompts(21, seed=51)
    with torch.inference_mode():
        [free] = reference(model, [p], 30)
    # an end token first met where it fills a block: at position len(p) + j, (len(p) + j + 1) % bs == 0
    j = next(j for j in range(bs, 30) if (len(p) + j + 1) % bs == 0 and free[j] not in free[:j])
    answer = free[: j + 1]
    assert generate(model, pool, [p], max_new_tokens=30, eos_token_id=free[j], pipeline=True) == [answer]
    turn = p + answer + prompts(5, seed=52)[0]
    held = len(p) + j + 1 - bs  # the boundary before the end token's block
    assert held > len(p)
    with torch.inference_mode():
        [want] = reference(model, [turn], 3)
    seen = _computed(monkeypatch)
    assert generate(model, pool, [turn], max_new_tokens=3, eos_token_id=None) == [want]
    assert sum(seen[:-2]) == len(turn) - held, seen
    assert_nothing_held(pool)


def test_a_prefix_key_is_the_last_of_the_prefix_keys():
    """`prefix_key` (one pass, the key an ended sequence's states are held under) is
    the key `prefix_keys` chains a block at a time (what prompts look up)."""
    from kvpager.hf.recurrent_states import prefix_key, prefix_keys

    ids = list(range(100, 200))
    for salt in ("s|torch.float32", b"raw"):
        keys = prefix_keys(salt, ids, 8, 99)
        assert len(keys) == 12 and len(set(keys)) == 12
        for n in (8, 48, 96):
            assert prefix_key(salt, ids, n) == keys[n // 8 - 1]
    assert prefix_key("a", ids, 8) != prefix_key("b", ids, 8)


def test_no_memory_for_the_marks_leaves_the_generation_going(monkeypatch):
    """Where the second copy of the batch's states cannot be allocated (the device
    full), the generation warns and goes on with transformers' tokens, holding no
    end states; nothing is left held in the pool."""
    from kvpager.hf.recurrent_states import StateCache

    model = make("qwen3_5")
    store = StateCache.of(model)
    store.clear()
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    ps = prompts(21, 13, seed=61)
    with torch.inference_mode():
        want = reference(model, ps, 12)
    import kvpager.hf.recurrent_states as rs

    def full(tensors):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(rs, "zeros_like_each", full)
    with pytest.warns(ResourceWarning, match="not held"):
        assert generate(model, pool, ps, max_new_tokens=12, eos_token_id=None) == want
    assert store.stores == 0 and not store.entries
    assert_nothing_held(pool)
