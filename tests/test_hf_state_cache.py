"""The state cache of models with recurrent layers (`kvpager.hf.state_cache`):
no states held at no bytes, its least recently used dropped past its bytes
(segmented: states prompts resume from outlast a flood of new ones), states held
together as copies each under its key, conversations resumed once a turn
keeping their next turns' states, held states serving only weights of their
dtype, a lower budget dropping states at once. Tiny random models in float32
on the CPU backend, tokens against transformers' own generate."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not hasattr(__import__("transformers.cache_utils").cache_utils, "LinearAttentionCacheLayerMixin"):
    pytest.skip("transformers without linear-attention cache layers", allow_module_level=True)

from test_hf_recurrent import (  # noqa: E402
    make,
    prompts,
    reference,
)

from kvpager import KVPool  # noqa: E402
from kvpager.hf import generate, spec_for_model  # noqa: E402


def test_no_states_held_with_a_state_cache_of_no_bytes():
    """``max_bytes`` 0: nothing held, no prompt split; blocks still shared, tokens
    still transformers'."""
    from kvpager.hf.state_cache import StateCache

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
    from kvpager.hf.state_cache import StateCache

    store = StateCache(max_bytes=3 * 64)
    row = (torch.zeros(1, 4), torch.zeros(1, 12))  # 64 bytes
    for key in (b"a", b"b", b"c"):
        store.put(key, (), row)
    assert store.best([b"a"], 8, 8)[0] == 8  # "a" served: "b" is now the oldest on probation
    store.put(b"d", (), row)
    assert list(store.entries) == [b"c", b"a", b"d"] and store.nbytes == 3 * 64 and not store.used
    store.put(b"big", (), (torch.zeros(1, 100),))  # more than the whole budget alone: not held
    assert b"big" not in store.entries
    held = store.entries[b"d"][1][0]
    row[0][0, 0] = 5.0
    assert held[0, 0] == 0  # a copy, not the caller's tensor


def test_states_held_together_are_copies_each_under_its_key():
    """`StateCache.put_many` (a generation's ended sequences at once): states of
    mixed dtypes copied, each entry under its own key, a key given twice or held
    already kept once, an entry past the whole budget left out, the budget kept."""
    from kvpager.hf.state_cache import StateCache

    store = StateCache(max_bytes=3 * 96)
    rows = [(torch.full((1, 4), float(i)), torch.full((1, 8), i, dtype=torch.float64)) for i in range(5)]  # 80 bytes
    store.put(b"old", (), rows[4])
    store.put_many([(b"a", (), rows[0]), (b"b", (), rows[1]), (b"a", (), rows[2]), (b"old", (), rows[3]),
                    (b"big", (), (torch.zeros(1, 100),))])
    assert list(store.entries) == [b"old", b"a", b"b"] and store.nbytes == 3 * 80 and store.stores == 3
    for r in rows:
        r[0].add_(10.0)
        r[1].add_(10.0)
    for key, i in ((b"old", 4), (b"a", 0), (b"b", 1)):
        first, second = store.entries[key][1]
        assert torch.equal(first, torch.full((1, 4), float(i))) and second.dtype == torch.float64
        assert torch.equal(second, torch.full((1, 8), i, dtype=torch.float64))
    store.put_many([(b"c", (), rows[0]), (b"d", (), rows[1])])  # past the budget: the oldest go
    assert list(store.entries) == [b"b", b"c", b"d"]


def test_states_prompts_resume_from_outlast_a_flood_of_new_ones():
    """A segmented LRU: a state a prompt resumed from (a shared system prompt's)
    stays while many states come in and are never asked for (a large batch's end
    states), which push out each other instead; states served keep at most
    `USED_SHARE` of the budget, the least recently served going back on probation.
    A state is kept apart from the flood from its second serve on."""
    from kvpager.hf.state_cache import StateCache

    row = (torch.zeros(1, 16),)  # 64 bytes
    store = StateCache(max_bytes=10 * 64)
    store.put(b"system", (), row)
    for _ in range(2):
        assert store.best([b"system"], 8, 8)[0] == 8
    for k in range(40):
        store.put(b"end%d" % k, (), row)
    held = store.entries
    assert b"system" in held and store.nbytes == 10 * 64
    assert [k for k in held if k != b"system"] == [b"end%d" % k for k in range(31, 40)]  # the newest 9
    for _ in range(2):
        for k in range(31, 40):  # all served twice: 7 of 64 bytes fit in 75% of 640, the others back on probation
            assert store.best([b"end%d" % k], 8, 8)[0] == 8
    assert len(store.used) == 7 and store.nbytes == 10 * 64
    assert list(store.used) == [b"end%d" % k for k in range(33, 40)]
    assert list(store.fresh) == [b"system", b"end31", b"end32"]
    store.max_bytes = 4 * 64  # 3 served fit in 75%: the rest go, probation first
    assert list(store.entries) == [b"end36", b"end37", b"end38", b"end39"]
    assert store.best([b"end36"], 8, 8)[0] == 8  # served before: back at once, end37 out in its place
    assert list(store.used) == [b"end38", b"end39", b"end36"] and list(store.fresh) == [b"end37"]


def test_conversations_resumed_once_a_turn_keep_their_next_turns_states():
    """A batch of conversations, turn after turn: each turn holds its end states and
    the next turn resumes from them once. States served once stay on probation (as
    its most recent), so they do not fill the served segment and leave probation
    too small for one batch's new end states. Before, with room for 28 states, the
    served segment held 21 and, from the fourth turn on, one conversation of 8 found
    its state gone every turn (its answer run again)."""
    from kvpager.hf.state_cache import StateCache

    row = (torch.zeros(1, 16),)  # 64 bytes
    store = StateCache(max_bytes=28 * 64)
    for turn in range(12):
        ends = [b"turn %d conversation %d" % (turn, c) for c in range(8)]
        store.put_many([(key, (), row) for key in ends])  # where the last turn's answers ended
        assert [store.best([key], 8, 8)[0] for key in ends] == [8] * 8, turn  # the next turn resumes
        store.put_many([(b"turn %d other %d" % (turn, c), (), row) for c in range(8)])  # states never asked for
    assert not store.used and store.nbytes == 28 * 64


def test_held_states_serve_only_weights_of_their_dtype():
    """States held for a float32 model, under a salt given by the caller (which does
    not change with the dtype): after the model moves to bfloat16 they are not
    taken (they were, and the pass failed on the mixed dtypes, reported as a model
    kvpager cannot serve); the bfloat16 model's tokens are transformers'."""
    from kvpager.hf.state_cache import StateCache

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
    from kvpager.hf.state_cache import StateCache

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


def test_a_served_model_can_still_be_copied_and_saved():
    """Its state cache (a lock inside) lives in the model's ``__dict__``: after one
    generation ``copy.deepcopy(model)`` and ``torch.save(model)`` raised "cannot
    pickle '_thread.lock' object". A copy gets an empty cache of the same budget."""
    import copy
    import io

    from kvpager.hf.state_cache import StateCache

    model = make("qwen3_5")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    ps = prompts(20, 9)
    want = generate(model, pool, ps, max_new_tokens=3, eos_token_id=None)
    store = StateCache.of(model)
    store.max_bytes = 1 << 22
    twin = copy.deepcopy(model)
    kept = StateCache.of(twin)
    assert kept is not store and kept.max_bytes == 1 << 22 and not kept.entries and kept.hold_ends == store.hold_ends
    torch.save(model, io.BytesIO())
    assert generate(twin, KVPool(spec_for_model(twin, num_blocks=64, block_size=8)), ps, max_new_tokens=3,
                    eos_token_id=None) == want
