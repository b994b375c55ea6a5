"""A `PagedCache`'s next decode pass taken ahead (`kvpager.hf.cache_ahead`): its
slots appended and its plan made while the pass before runs, its token ids
recorded when it comes. Done for caches that replay captured steps (a GPU's,
`test_hf_paged_cache_gpu`); here switched on for CPU caches, whose eager
passes run the same code but for the captured step: the tokens stay
transformers' under every ``generate`` feature, anything but the decode pass
they were taken for gives the slots back, and the pool never holds more than
one slot a row past what the cache counts, nor anything after it closes."""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.cache_utils", reason="no transformers cache module")

from test_hf_models import make_model, one_thread  # noqa: E402, F401
from test_hf_paged_cache import (  # noqa: E402
    GENERATE_CASES,
    PROMPT,
    assert_released,
    both,
    cache_kw,
    padded_batch,
    pool_for,
)
from test_hf_paged_cache import test_a_conversation_continues_on_its_cache as conversation  # noqa: E402
from test_hf_paged_cache import test_assisted_decoding_rolls_back_through_crop as assisted  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.errors import OutOfBlocks  # noqa: E402
from kvpager.hf import (  # noqa: E402
    PagedCache,
    cache_pass,  # noqa: E402
    spec_for_model,
)
from kvpager.hf.cache_ahead import PassAhead  # noqa: E402
from kvpager.hf.cache_pass import ahead_pass  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return make_model("qwen2-sliding")  # full layers and sliding ones (window 6)


@pytest.fixture
def taken(monkeypatch):
    """Every cache takes its decode passes ahead; the list of passes that took slots."""
    got = []
    init, take = PassAhead.__init__, PassAhead.take

    def on(self, cache):
        init(self, cache)
        self.enabled = hasattr(cache.pool, "record_tokens")

    def counted(self, width, mask):
        a = take(self, width, mask)
        got.append(a is not None)
        return a

    def begun(cache, named, keep):
        step = ahead_pass(cache, named, keep)
        if step is not None:
            got.append(True)
        return step

    monkeypatch.setattr(PassAhead, "__init__", on)
    monkeypatch.setattr(PassAhead, "take", counted)
    monkeypatch.setattr(cache_pass, "ahead_pass", begun)
    return got


def held(pool, cache) -> list[int]:
    return [pool.sequence(s).num_tokens for s in cache.seq_ids]


def test_only_captured_steps_take_passes_ahead(model):
    """Off for an eager cache (its host would do the same work at another time), on for one that
    replays captured steps where its pool records token ids."""
    pool = pool_for(model)
    with PagedCache(model, pool) as cache:
        assert not cache._ahead.enabled


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_features_give_transformers_tokens(model, taken, case):
    pool = pool_for(model, 512)
    ids, mask = padded_batch(2)
    ref, out = both(model, pool, ids, mask, max_new_tokens=12, **GENERATE_CASES[case])
    assert torch.equal(ref, out)
    if case in ("greedy", "sampled", "num_return_sequences", "processors", "prefill_chunked"):
        assert sum(taken) >= 8  # (12 new tokens: the 3rd to the 11th decode passes taken ahead)
    else:  # beams reorder the rows after every pass: each ahead given back, none taken again
        assert not any(taken)
    assert_released(pool)


def test_the_pool_holds_one_slot_a_row_ahead_between_passes(model, taken):
    """Between decode passes each row's sequence holds the cache's count and the next slot; the
    cache counts what it was fed; closing frees the slots with the rest."""
    pool = pool_for(model, 512)
    ids, mask = padded_batch(3, (0, 0, 0))
    seen = []

    class Watch(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            seen.append((cache.get_seq_length(), held(pool, cache)))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with PagedCache(model, pool) as cache:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             stopping_criteria=transformers.StoppingCriteriaList([Watch()]), **cache_kw(model, cache))
        assert torch.equal(out, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False))
        # (after the prompt pass and the first decode pass: nothing ahead; from the second on, a slot a row)
        assert [h for _, h in seen] == [[n] * 3 for n, _ in seen[:2]] + [[n + 1] * 3 for n, _ in seen[2:]]
        assert [n for n, _ in seen] == list(range(PROMPT, PROMPT + 8))
        pool.check_integrity()
    assert_released(pool)


def test_a_call_on_the_cache_gives_the_slots_back(model, taken):
    """crop, reorder and reset between passes leave each row's sequence at what the cache counts
    (after the call's own change); a pass of several tokens a row does too, and then runs as
    transformers' cache does."""
    pool = pool_for(model, 512)
    ids, mask = padded_batch(2, (0, 0))
    dyn = transformers.DynamicCache()

    def step(cache, tokens, m):
        return model(input_ids=tokens, attention_mask=m, use_cache=True, **cache_kw(model, cache)).logits[:, -1]

    with PagedCache(model, pool) as cache:
        m = mask
        for c in (dyn, cache):
            step(c, ids, m)
        tok = ids[:, -1:]
        for _ in range(4):  # decode passes: the 3rd leaves a slot ahead
            m = torch.cat([m, torch.ones_like(tok)], 1)
            ref, got = step(dyn, tok, m), step(cache, tok, m)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            tok = ref.argmax(-1, keepdim=True)
        assert held(pool, cache) == [cache.get_seq_length() + 1] * 2
        more = torch.cat([tok, tok + 1, tok + 2], 1)  # three tokens a row: not the pass taken ahead
        m = torch.cat([m, torch.ones_like(more)], 1)
        torch.testing.assert_close(step(cache, more, m), step(dyn, more, m), rtol=1e-4, atol=1e-4)
        assert held(pool, cache) == [cache.get_seq_length()] * 2
        for _ in range(3):  # two decode passes, then one ahead again
            m = torch.cat([m, torch.ones_like(tok)], 1)
            step(dyn, tok, m), step(cache, tok, m)
        assert held(pool, cache) == [cache.get_seq_length() + 1] * 2
        cache.crop(-2)
        assert held(pool, cache) == [cache.get_seq_length()] * 2
        for i in range(3):
            m2 = torch.cat([m[:, :-2], torch.ones(2, i + 1, dtype=m.dtype)], 1)
            step(cache, tok, m2)
        assert held(pool, cache) == [cache.get_seq_length() + 1] * 2
        cache.reorder_cache(torch.tensor([1, 1]))
        assert held(pool, cache) == [cache.get_seq_length()] * 2
        pool.check_integrity()
        cache.reset()
        assert pool.stats().num_sequences == 0
    assert True in taken
    assert_released(pool)


def test_a_conversation_continues_on_its_cache(model, taken):
    """A later generate call on the same cache (the answer and a new turn appended: a pass of
    several tokens a row) gives the slot taken after the last call back first: the test of
    `test_hf_paged_cache` with passes taken ahead."""
    conversation(model)
    assert True in taken


@pytest.mark.parametrize("how", ["assistant_model", "prompt_lookup"])
def test_assisted_decoding_crops_past_the_slots(model, taken, how):
    """Drafts verified and the rejected ones cropped off, with passes taken ahead between: the
    test of `test_hf_paged_cache`."""
    assisted(model, how)


def test_a_full_pool_refuses_the_pass_as_without(model, taken):
    """Where the pool has no block for the slots ahead, none is taken: the pass that needs it
    raises `OutOfBlocks` itself, as it does without taking ahead, and leaves the rows as they were."""
    ids, mask = padded_batch(2, (0, 0))
    spec = spec_for_model(model, num_blocks=8, block_size=8)
    errors = []
    for enabled in (True, False):
        pool = KVPool(spec)
        with PagedCache(model, pool) as cache:
            cache._ahead.enabled = enabled
            with pytest.raises(OutOfBlocks):
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                               **cache_kw(model, cache))
            errors.append((cache.get_seq_length(), held(pool, cache)))
            assert held(pool, cache) == [cache.get_seq_length()] * 2
            pool.check_integrity()
        assert_released(pool)
    assert errors[0] == errors[1] and errors[0][0] > PROMPT + 2  # (decode passes ran first)


def test_a_pass_that_fails_gives_its_slots_back(model, taken, monkeypatch):
    """A decode pass taken ahead whose forward raises leaves each row at the cache's count;
    the next generate on the cache runs as transformers' does from there."""
    pool = pool_for(model, 512)
    ids, mask = padded_batch(2, (0, 0))
    calls = []
    real = type(model.model).forward

    def failing(self, *a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return real(self, *a, **kw)

    with PagedCache(model, pool) as cache:
        monkeypatch.setattr(type(model.model), "forward", failing)
        with pytest.raises(RuntimeError, match="boom"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                           **cache_kw(model, cache))
        monkeypatch.setattr(type(model.model), "forward", real)
        assert taken[-1] is True  # (the failed pass had its slots taken ahead)
        assert held(pool, cache) == [cache.get_seq_length()] * 2 == [PROMPT + 3] * 2
        pool.check_integrity()
    assert_released(pool)


def last_logits(model, cache, tokens, m):
    """One pass of ``model`` over ``cache`` (a PagedCache or transformers' own): its last logits."""
    return model(input_ids=tokens, attention_mask=m, use_cache=True, **cache_kw(model, cache)).logits[:, -1]


def three_decode_passes(model, caches, ids, mask):
    """The prompt pass and three decode passes on each of ``caches`` (the third a
    PagedCache's first taken ahead); the mask and the token fed."""
    for c in caches:
        last_logits(model, c, ids, mask)
    tok = ids[:, -1:]
    for _ in range(3):
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        for c in caches:
            last_logits(model, c, tok, mask)
    return mask, tok


def test_a_pass_its_inputs_refute_runs_again_read_first(taken, monkeypatch):
    """A pass of one token a row, begun on the slots taken ahead before its inputs were read,
    whose mask then says otherwise (a row's token is padding) is undone and runs again as any
    pass: transformers' logits, each row at its count (a model of full attention: padding
    between a row's tokens is refused under windows)."""
    model = make_model("llama")
    pool = pool_for(model, 512)
    confirmed = []
    confirm = cache_pass.confirm
    monkeypatch.setattr(cache_pass, "confirm", lambda *a: confirmed.append(confirm(*a)) or confirmed[-1])
    ids, mask = padded_batch(2, (0, 0))
    dyn = transformers.DynamicCache()
    step = functools.partial(last_logits, model)

    with torch.no_grad(), PagedCache(model, pool) as cache:
        m, tok = three_decode_passes(model, (dyn, cache), ids, mask)
        assert held(pool, cache) == [cache.get_seq_length() + 1] * 2  # (a slot a row ahead)
        m = torch.cat([m, torch.tensor([[1], [0]])], 1)  # row 1's token: padding
        ref, got = step(dyn, tok, m), step(cache, tok, m)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
        assert held(pool, cache) == [PROMPT + 4, PROMPT + 3]
        for _ in range(3):
            m = torch.cat([m, torch.ones_like(tok)], 1)
            torch.testing.assert_close(step(cache, tok, m), step(dyn, tok, m), rtol=1e-4, atol=1e-4)
        assert held(pool, cache) == [PROMPT + 8, PROMPT + 7]  # (the third took its slots ahead)
        pool.check_integrity()
    assert confirmed == [True, False, True]  # (the 3rd decode pass, the padded one, the 7th)
    assert_released(pool)


@pytest.mark.parametrize("ahead", [True, False])
def test_a_pass_that_fails_before_its_launch_gives_its_slots_back(taken, monkeypatch, ahead):
    """A failure making the pass's batch (a device allocation: out of memory, an
    interrupt), in the pass taken ahead or in any pass begun, left its rows a slot past
    the cache's count, for good: the next pass appended after it (other logits than
    transformers'). Each row is at its count now, and the next pass transformers'."""
    model = make_model("llama")
    pool = pool_for(model, 512)
    ids, mask = padded_batch(2, (0, 0))
    dyn = transformers.DynamicCache()
    real = cache_pass.pass_batch
    step = functools.partial(last_logits, model)

    def failing(*args):
        raise RuntimeError("out of memory")

    with torch.no_grad(), PagedCache(model, pool) as cache:
        if not ahead:
            cache._ahead.enabled = False
        m, tok = three_decode_passes(model, (dyn, cache), ids, mask)
        monkeypatch.setattr(cache_pass, "pass_batch", failing)
        m = torch.cat([m, torch.ones_like(tok)], 1)
        with pytest.raises(RuntimeError, match="out of memory"):
            step(cache, tok, m)
        monkeypatch.setattr(cache_pass, "pass_batch", real)
        assert held(pool, cache) == [cache.get_seq_length()] * 2 == [PROMPT + 3] * 2
        torch.testing.assert_close(step(cache, tok, m), step(dyn, tok, m), rtol=1e-4, atol=1e-4)
        pool.check_integrity()
    assert_released(pool)


def test_a_launched_pass_is_undone_once_the_device_ran_it(monkeypatch):
    """A pass taken ahead is launched before its inputs are read; one they refute (or
    that raises) gives its slots back. On a GPU that waits for the device first: a block
    freed while a kernel may still write it could go to a worker of another process
    mapping the pool, its K/V overwritten late."""
    from kvpager.hf.cache_rows import CacheRows, Step

    order = []

    class Pool:
        def truncate(self, ids, lens):
            order.append(("truncate", list(ids), list(lens)))

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: order.append(("synchronize", str(device))))
    rows = CacheRows(Pool(), None)
    rows.start(2)
    rows.seq_ids[:] = [7, 8]
    step = Step(None, np.arange(2), np.ones(2, dtype=np.int64), 1, False, [], np.ones(2, dtype=bool),
                appended=True)
    rows.undo(step, launched_on=torch.device("cuda", 1))
    assert order == [("synchronize", "cuda:1"), ("truncate", [7, 8], [0, 0])]
    order.clear()
    rows.undo(step, launched_on=torch.device("cpu"))  # (nothing queued on a device to wait for)
    assert order == [("truncate", [7, 8], [0, 0])]
