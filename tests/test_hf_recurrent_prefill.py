"""How a model with recurrent layers prefills its prompts in passes (`kvpager.hf.recurrent`):
prompts from no state left-padded in one pass or in parts of shared lengths; prompts
allocated once, whole, each pass's plan over their first tokens (``context_lens``); next
turns of distinct lengths resumed together in parts (`kvpager.hf.pass_schedule`); one
pass over every row leaving its states in place. Tiny random models in float32 on the
CPU backend, tokens against transformers' own generate."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not hasattr(__import__("transformers.cache_utils").cache_utils, "LinearAttentionCacheLayerMixin"):
    pytest.skip("transformers without linear-attention cache layers", allow_module_level=True)

from test_hf_recurrent import assert_nothing_held, computed_tokens, make, prompts, reference  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import generate, spec_for_model  # noqa: E402
from kvpager.hf.recurrent import Recurrent  # noqa: E402


@pytest.mark.parametrize("pad", [True, False], ids=["padded", "by-length"])
def test_prompts_from_no_state_prefill_in_one_pass(pad, monkeypatch):
    """Prompts that start from no state prefill in one pass, left-padded to the
    longest (`Recurrent.pad_prompts`: the recurrent layers zero the padding's inputs,
    the attention layers' plan holds the tokens alone): here one pass for six
    prompts of three lengths, 42 tokens in rows of 9. With it off, in parts of
    lengths the rows share (`kvpager.hf.pass_schedule`): the first token of all six,
    the next 6 of the five longer, the last 2 of the three longest. transformers'
    tokens either way, the rows' states put back in the prompts' order for the
    decode steps."""
    from kvpager.hf.recurrent import Recurrent

    model = make("qwen3_next")
    ps = prompts(9, 9, 7, 9, 7, 1, seed=11)
    with torch.inference_mode():
        want = reference(model, ps, 4)
    passes = []
    run = Recurrent._pass

    def counted(self, plan, input_ids, *args, **kwargs):
        passes.append((tuple(input_ids.shape), plan.num_tokens))
        return run(self, plan, input_ids, *args, **kwargs)

    monkeypatch.setattr(Recurrent, "_pass", counted)
    monkeypatch.setattr(Recurrent, "pad_prompts", pad)
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    assert generate(model, pool, ps, max_new_tokens=4, eos_token_id=None) == want
    if pad:
        assert passes[:1] == [((6, 9), 42)] and passes[1:] == [((6, 1), 6)] * 3
    else:
        assert passes[:3] == [((6, 1), 6), ((5, 6), 30), ((3, 2), 6)] and passes[3:] == [((6, 1), 6)] * 3
    assert_nothing_held(pool)


def test_a_prompt_cached_past_its_held_state_runs_in_parts_of_one_allocation(monkeypatch):
    """Prompts are allocated once, whole, with no probe of the cache before. One
    whose state is held as far as its blocks are cached resumes there; one whose
    cached blocks reach past its held state runs to them first (its plans over that
    much of it: ``context_lens``), its state is held there, then the rest runs:
    transformers' tokens, the next prompt of those blocks resuming there."""
    from kvpager.hf.state_cache import StateCache

    model = make("qwen3_5")
    StateCache.of(model).clear()
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    system = prompts(16, seed=41)[0]
    generate(model, pool, [system + [5, 6]], max_new_tokens=2, eos_token_id=None)  # blocks cached, no state
    generate(model, pool, [system + [7, 8]], max_new_tokens=2, eos_token_id=None)  # the state held at 16
    other = prompts(16, seed=43)[0]
    generate(model, pool, [other + [5]], max_new_tokens=1, eos_token_id=None)  # blocks cached, no state
    real, asked = pool.allocate, []
    monkeypatch.setattr(pool, "allocate", lambda ps, salt=None, **kw: asked.append(len(ps)) or real(ps, salt, **kw))
    monkeypatch.setattr(pool, "cached_tokens", lambda *a, **k: pytest.fail("probed"))
    real_plan, contexts = pool.plan, []
    def plan(ids, *args, context_lens=None, **kw):
        if context_lens is not None:  # (a prefill pass's: its sequences' tokens, the context it runs over)
            contexts.append(([pool.sequence(i).num_tokens for i in ids], list(context_lens)))
        return real_plan(ids, *args, context_lens=context_lens, **kw)

    monkeypatch.setattr(pool, "plan", plan)
    seen = computed_tokens(monkeypatch)
    batch = [other + [6, 7], system + [9, 10, 11]]
    with torch.inference_mode():
        want = reference(model, batch, 2)
    stores = StateCache.of(model).stores
    assert generate(model, pool, batch, max_new_tokens=2, eos_token_id=None) == want
    assert asked == [2]  # one allocation, whole
    # other: its 16 cached tokens from no state, then its 2 after; system: its 3 from the state at 16
    assert seen[:3] == [16, 3, 2] and contexts == [([18], [16]), ([19], [19]), ([18], [18])]
    assert StateCache.of(model).stores >= stores + 1
    assert_nothing_held(pool)
    with torch.inference_mode():
        want = reference(model, [other + [8, 9]], 2)
    seen.clear()
    assert generate(model, pool, [other + [8, 9]], max_new_tokens=2, eos_token_id=None) == want
    assert seen[0] == 2  # resumed at 16
    assert_nothing_held(pool)


@pytest.mark.parametrize("lens", [(9, 9, 9), (9, 5, 9)], ids=["one-pass", "parts"])
def test_one_prefill_pass_over_every_row_leaves_its_states_in_place(lens, monkeypatch):
    """Where the prefill is one pass over every row (in order, as many rows as the
    states keep), the batch's states are that pass's cache's tensors, not a copy;
    after several passes they are stacked from the rows. Tokens are transformers'
    either way."""
    from kvpager.hf import PagedGeneration
    from kvpager.hf.recurrent import Recurrent
    from kvpager.hf.recurrent_states import layout_of, tensors_of

    model = make("qwen3_5")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    ps = prompts(*lens, seed=71)
    with torch.inference_mode():
        want = reference(model, ps, 3)
    caches = []
    real = Recurrent._collect

    def collect(self, rows, tokens, cache, out, final):
        caches.append(tensors_of(cache, layout_of(cache)))
        return real(self, rows, tokens, cache, out, final)

    monkeypatch.setattr(Recurrent, "_collect", collect)
    with PagedGeneration(model, pool, ps, 3, eos_token_id=None, pipeline=False) as gen:
        ptrs = [t.data_ptr() for t in gen._recurrent.states.tensors]
        assert len(caches) == (1 if len(set(lens)) == 1 else 2)
        adopted = [t.data_ptr() for t in caches[0]] == ptrs
        assert adopted == (len(caches) == 1)
        while not gen.done:
            gen.step()
        outputs = [list(o) for o in gen.outputs]
    assert outputs == want
    assert_nothing_held(pool)


@pytest.mark.parametrize("family", ["qwen3_5", "bamba", "lfm2"])
def test_next_turns_of_distinct_lengths_resume_together_in_parts(family, monkeypatch):
    """Seven conversations answered in one batch, then their next turns in one batch,
    a new message of 7 to 22 tokens each: each resumes from the
    state held where its answer ended, and the batch runs in parts of lengths its rows
    share (`kvpager.hf.pass_schedule`): 4 passes for 7 distinct lengths, every new token
    run once. Tokens are transformers' for each turn."""
    from kvpager.hf.pass_schedule import schedule
    from kvpager.hf.state_cache import StateCache

    model = make(family)
    StateCache.of(model).clear()
    bs = 8
    pool = KVPool(spec_for_model(model, num_blocks=256, block_size=bs))
    ps = prompts(12, 21, 29, 14, 22, 30, 13, seed=61)  # a block boundary in each answer
    answers = generate(model, pool, ps, max_new_tokens=5, eos_token_id=None)
    news = [7, 7, 8, 8, 13, 14, 22]
    turns = [p + a + m for p, a, m in zip(ps, answers, prompts(*news, seed=65))]
    held = [(len(p) + 4) // bs * bs for p in ps]  # (the answers' last tokens never fed)
    assert all(h >= len(p) for h, p in zip(held, ps))
    with torch.inference_mode():
        want = reference(model, turns, 3)
    passes = []
    real = Recurrent._pass

    def counted(self, plan, input_ids, *args, **kwargs):
        passes.append(tuple(input_ids.shape))
        return real(self, plan, input_ids, *args, **kwargs)

    monkeypatch.setattr(Recurrent, "_pass", counted)
    assert generate(model, pool, turns, max_new_tokens=3, eos_token_id=None) == want
    own = [len(t) - h for t, h in zip(turns, held)]
    assert len(set(own)) == 7
    prefill = passes[:-2]
    assert prefill == [(len(members), n) for n, members in schedule(own)] and len(prefill) == 4
    assert sum(r * n for r, n in prefill) == sum(own)
    assert_nothing_held(pool)
