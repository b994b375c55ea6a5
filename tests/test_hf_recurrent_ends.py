"""The recurrent states held where a generation's sequences end (`kvpager.hf.recurrent`:
rows marked as their passes fill blocks, `States.mark`; held when they end), so a
conversation's next turn resumes after its answer: sequences ending at different
steps, pipelined or not; an end token that fills a block; `StateCache.hold_ends`
off; no memory for the marks; the keys they are held under. Tiny random models in
float32 on the CPU backend, the tokens each prefill pass runs counted, tokens
against transformers' own generate."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not hasattr(__import__("transformers.cache_utils").cache_utils, "LinearAttentionCacheLayerMixin"):
    pytest.skip("transformers without linear-attention cache layers", allow_module_level=True)

from test_hf_recurrent import assert_nothing_held, computed_tokens, make, prompts, reference  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import generate, spec_for_model  # noqa: E402


@pytest.mark.parametrize("family,pipeline", [("qwen3_5", True), ("qwen3_5", False), ("bamba", True),
                                             ("falcon_h1", True)])
def test_a_conversations_next_turn_resumes_after_the_answer(family, pipeline, monkeypatch):
    """Three prompts answered in one batch, two of them ending on end tokens at
    different steps (their rows leave the batch while the third goes on). Each
    sequence's states at the last block boundary its prompt and answer ran are
    held when it ends, so each one's next turn (prompt, answer, 7 new tokens)
    runs only what follows that boundary: the answer is not run again. Tokens are
    transformers' for the batch and for every turn; nothing is left held."""
    from kvpager.hf.state_cache import StateCache

    model = make(family)
    store = StateCache.of(model)
    store.clear()
    bs = 8
    pool = KVPool(spec_for_model(model, num_blocks=128, block_size=bs))
    ps = prompts(21, 13, 30, seed=41)
    with torch.inference_mode():
        free = reference(model, ps, 24)
    # end tokens from the first and third answers (at their 16th and 11th tokens, or the next
    # that the second answer never gives: it runs all 24, whatever model the seed draws)
    eos = [next(t for t in free[i][j:] if t not in free[1]) for i, j in ((0, 15), (2, 10))]
    with torch.inference_mode():
        want = reference(model, ps, 24, eos=eos)
    assert len({len(w) for w in want}) > 1 and max(map(len, want)) == 24
    assert generate(model, pool, ps, max_new_tokens=24, eos_token_id=eos, pipeline=pipeline) == want
    assert_nothing_held(pool)
    seen = computed_tokens(monkeypatch)
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
    from kvpager.hf.state_cache import StateCache

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
        seen = computed_tokens(monkeypatch)
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


def test_marks_take_no_more_than_the_state_cache_could_hold():
    """The marks' second copy of a batch's states holds as many rows as ``mark_bytes``
    (the state cache's budget) has room for: rows past them are not marked, a row
    that moves up into them from past them has no mark until its next, and the
    marks of rows within them move with their rows. A generation under a budget of
    two rows' states gives transformers' tokens and holds at most those."""
    from kvpager.hf import PagedGeneration
    from kvpager.hf.recurrent import States
    from kvpager.hf.recurrent_states import rows_of
    from kvpager.hf.state_cache import StateCache

    model = make("qwen3_5")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    ps = prompts(5, 12, 3, 20, 9, 14, seed=7)
    with PagedGeneration(model, pool, ps, 3, eos_token_id=None, pipeline=False) as gen:
        held = gen._recurrent.states
        row = sum(t[0].numel() * t.element_size() for t in held.tensors)
        states = States(model, held.layout, rows_of(held.cache(held.n), held.layout), held.rows, 8,
                        mark_bytes=3 * row - 1)
        assert states.mark_rows == 2
        before = [t.clone() for t in states.tensors]
        states.mark([0, 1, 4], [8, 16, 24])
        assert states.marked == [8, 16, 0, 0, 0, 0] and all(m.shape[0] == 2 for m in states.marks)
        order = list(states.rows)
        states.keep([order[4], order[1], order[2]])  # row 4 (unmarked) moves onto row 0's place
        assert states.marked == [0, 16, 0]
        assert all(torch.equal(m[0], b[1]) for m, b in zip(states.marked_rows(1), before))
        states.mark([0, 2], [32, 40])
        assert states.marked == [32, 16, 0]
        assert all(torch.equal(m[0], b[4]) for m, b in zip(states.marked_rows(0), before))

    store = StateCache.of(model)
    store.clear()
    budget = store.max_bytes
    store.max_bytes = 2 * row
    try:
        with torch.inference_mode():
            want = reference(model, ps, 12)
        with PagedGeneration(model, pool, ps, 12, eos_token_id=None) as gen:
            while not gen.done:
                gen.step()
            assert all(m.shape[0] == 2 for m in gen._recurrent.states.marks)
            outputs = gen.outputs
        assert outputs == want
        assert 0 < len(store.entries) <= 2 and store.nbytes <= 2 * row
        assert_nothing_held(pool)
    finally:
        store.max_bytes = budget


def test_marks_of_states_of_mixed_dtypes_copy_each_dtype_at_once(monkeypatch):
    """A model whose states differ in dtype (Qwen3.5's float32 recurrent states beside
    bf16 convolution states on a GPU): each multi-tensor copy of a mark holds tensors
    of one dtype (torch copies a mixed list tensor by tensor), a run of consecutive
    rows is one slice, and every row marked, and no other, holds its states."""
    from kvpager.hf import PagedGeneration
    from kvpager.hf.recurrent import States
    from kvpager.hf.recurrent_states import _runs, rows_of

    assert _runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 6), (7, 9)]
    assert _runs([4]) == [(4, 5)]
    model = make("qwen3_5")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    with PagedGeneration(model, pool, prompts(5, 12, 3, 20, 9, 14, seed=7), 3, eos_token_id=None,
                         pipeline=False) as gen:
        held = gen._recurrent.states
        states = States(model, held.layout, rows_of(held.cache(held.n), held.layout), held.rows, 8)
        states.tensors = [t.double() if i % 2 else t for i, t in enumerate(states.tensors)]
        assert len({t.dtype for t in states.tensors}) == 2
        before = [t.clone() for t in states.tensors]
        calls = []
        copy = torch._foreach_copy_

        def spy(dst, src):
            calls.append(({t.dtype for t in dst + src}, [t.shape[0] for t in dst]))
            return copy(dst, src)

        monkeypatch.setattr(torch, "_foreach_copy_", spy)
        states.mark([0, 1, 2, 4], [8, 16, 16, 24])
        assert [len(dtypes) for dtypes, _ in calls] == [1, 1]
        assert all(sizes == [3, 1] * (len(sizes) // 2) for _, sizes in calls)  # two runs a tensor
        for t in states.tensors:
            t.add_(1.0)
        assert states.marked == [8, 16, 16, 0, 24, 0]
        for k in (0, 1, 2, 4):
            assert all(torch.equal(m[0], b[k]) for m, b in zip(states.marked_rows(k), before))
        # (rows 3 and 5, unmarked, are never read: their marks' rows are left as allocated)


def test_an_end_token_that_fills_a_block_leaves_the_mark_before_it(monkeypatch):
    """Pipelined, a sequence's end token is run by the pass after it all the same; where
    that token fills a block (never published: its id is not recorded), the states
    held are those of the boundary before it, whose block is cached, so the next
    turn still resumes after most of the answer (before, the mark moved onto the
    unpublished block and the next turn ran everything again)."""
    from kvpager.hf.state_cache import StateCache

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
    seen = computed_tokens(monkeypatch)
    assert generate(model, pool, [turn], max_new_tokens=3, eos_token_id=None) == [want]
    assert sum(seen[:-2]) == len(turn) - held, seen
    assert_nothing_held(pool)


def test_a_prefix_key_is_the_last_of_the_prefix_keys():
    """`prefix_key` (one pass, the key an ended sequence's states are held under) is
    the key `prefix_keys` chains a block at a time (what prompts look up)."""
    from kvpager.hf.state_cache import prefix_key, prefix_keys

    ids = list(range(100, 200))
    for salt in ("s|torch.float32", b"raw"):
        keys = prefix_keys(salt, ids, 8, 99)
        assert len(keys) == 12 and len(set(keys)) == 12
        for n in (8, 48, 96):
            assert prefix_key(salt, ids, n) == keys[n // 8 - 1]
    assert prefix_key("a", ids, 8) != prefix_key("b", ids, 8)


def test_prefix_keys_made_when_asked_are_the_prefix_keys():
    """`PrefixKeys` (what a prompt's held states are looked up by): the longest
    prefix's key alone at first, then every key, each the one `prefix_keys` gives."""
    from kvpager.hf.state_cache import PrefixKeys, StateCache, prefix_keys

    ids = list(range(100, 200))
    want = prefix_keys("s", ids, 8, 99)
    keys = PrefixKeys("s", ids, 8, 99)
    assert len(keys) == 12 and keys[11] == keys[-1] == want[-1] and keys._all is None  # (one pass so far)
    assert [keys[i] for i in range(12)] == want and keys._all is not None
    with pytest.raises(IndexError):
        keys[12]
    assert len(PrefixKeys("s", ids, 8, 7)) == 0
    store = StateCache(max_bytes=1 << 20)
    row = (torch.zeros(1, 4),)
    store.put(want[5], (), row)
    assert store.longest(PrefixKeys("s", ids, 8, 99), 99, 8) == 48
    store.put(want[11], (), row)
    fresh = PrefixKeys("s", ids, 8, 99)
    assert store.best(fresh, 99, 8)[0] == 96 and fresh._all is None


def test_no_memory_for_the_marks_leaves_the_generation_going(monkeypatch):
    """Where the second copy of the batch's states cannot be allocated (the device
    full), the generation warns and goes on with transformers' tokens, holding no
    end states; nothing is left held in the pool."""
    from kvpager.hf.state_cache import StateCache

    model = make("qwen3_5")
    store = StateCache.of(model)
    store.clear()
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    ps = prompts(21, 13, seed=61)
    with torch.inference_mode():
        want = reference(model, ps, 12)
    import kvpager.hf.recurrent_states as rs

    def full(tensors, rows):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(rs, "empty_like_each", full)
    with pytest.warns(ResourceWarning, match="not held"):
        assert generate(model, pool, ps, max_new_tokens=12, eos_token_id=None) == want
    assert store.stores == 0 and not store.entries
    assert_nothing_held(pool)
