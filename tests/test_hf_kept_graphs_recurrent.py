"""`kvpager.hf.CapturedSteps` for models with recurrent layers: the captured steps
read and write the states of the bucket's rows at fixed addresses, kept with
the graphs; each call's rows are loaded into them. Every call gives
transformers' tokens on the same GPU (sequences ending at different steps, so
the rows move up in place mid-call), nothing is captured again where nothing
changed, a batch of more rows than the states hold makes larger states and
captures again, the states each sequence held where it ended are the call's
own (a next turn resumes from them), and beam searches keep theirs apart. Skips
without CUDA."""

from __future__ import annotations

import importlib.util

import pytest
from gpu_helpers import cupy_torch_or_skip

pytest.importorskip("transformers")
_, torch = cupy_torch_or_skip()

from test_hf_recurrent import make, prompts, reference  # noqa: E402
from test_hf_recurrent_gpu import _ending_early  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import CapturedSteps, beam_search, generate, spec_for_model  # noqa: E402
from kvpager.hf.state_cache import StateCache  # noqa: E402

pytestmark = pytest.mark.gpu


def model_and_pool(family: str = "qwen3_5", blocks: int = 256):
    model = make(family, head_dim=32, hidden_size=128, experts_implementation="batched_mm").cuda()
    StateCache.of(model).clear()
    return model, KVPool(spec_for_model(model, num_blocks=blocks, block_size=16), device="cuda:0")


def calls_and_tokens(model, lengths: list[tuple[int, ...]], n: int, seed: int):
    """Prompts of each call's lengths, end tokens that end some of the first call's
    sequences early, and transformers' greedy tokens of every call with them."""
    calls = [prompts(*ls, seed=seed + c) for c, ls in enumerate(lengths)]
    with torch.inference_mode():
        eos, _ = _ending_early(reference(model, calls[0], n), n)
        want = [reference(model, ps, n, eos=eos) for ps in calls]
    return calls, eos, want


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next", "jamba"])
def test_kept_steps_give_transformers_tokens_every_call(family):
    model, pool = model_and_pool(family)
    n = 8
    calls, eos, want = calls_and_tokens(model, [(9, 40, 1, 17, 5, 23, 3, 11, 30), (12, 4, 33, 8, 19, 2, 27, 6, 15),
                                                (7, 3), (21, 5, 9, 14, 2, 30, 11, 4, 17, 25, 6, 13, 8, 19, 3, 28, 10,
                                                         22, 1, 16), (6, 29, 12)], n, seed=40)
    with CapturedSteps(model, pool) as steps:
        assert generate(model, pool, calls[0], n, eos_token_id=eos, cuda_graphs=steps) == want[0]
        first = steps.captures
        graphs = next(iter(steps._sets.values()))
        states = graphs.states
        assert first >= 1 and states is not None and states.capacity == 16
        # the same bucket, and a smaller batch replaying it: its states loaded into the kept ones
        for k in (1, 2):
            assert generate(model, pool, calls[k], n, eos_token_id=eos, cuda_graphs=steps) == want[k]
            assert steps.captures == first and graphs.states is states
        # 20 rows, past the 16 the states hold: larger states, the graphs captured again over them
        assert generate(model, pool, calls[3], n, eos_token_id=eos, cuda_graphs=steps) == want[3]
        assert graphs.states is not states and graphs.states.capacity == 32 and steps.captures > first
        again = steps.captures
        assert generate(model, pool, calls[4], n, eos_token_id=eos, cuda_graphs=steps) == want[4]
        assert steps.captures == again
    assert not steps._sets
    assert pool.stats().num_sequences == 0
    pool.check_integrity()
    pool.close()


def test_a_next_turn_resumes_from_the_states_its_own_call_held():
    """Two calls over the kept states, the second's sequences of other prompts: the
    states each of them held where it ended (marked in the kept states' second copy,
    which the first call had marked too) are its own: every next turn gives
    transformers' tokens, and some resume past their prompt."""
    model, pool = model_and_pool()
    n = 24
    calls, eos, want = calls_and_tokens(model, [(9, 40, 1, 17, 5, 23, 3, 11, 30), (20, 35, 6, 18, 2, 27, 13, 9, 31)],
                                        n, seed=60)
    with CapturedSteps(model, pool) as steps:
        for ps, w in zip(calls, want):
            assert generate(model, pool, ps, n, eos_token_id=eos, cuda_graphs=steps) == w
        store = StateCache.of(model)
        hits = store.hits
        for p, answer, more in zip(calls[1], want[1], prompts(*[5] * len(calls[1]), seed=61)):
            turn = p + answer + more
            with torch.inference_mode():
                [want2] = reference(model, [turn], 3)
            assert generate(model, pool, [turn], 3, eos_token_id=None, cuda_graphs=steps) == [want2]
        assert store.hits - hits >= 2
    assert pool.stats().num_sequences == 0
    pool.check_integrity()
    pool.close()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="compile needs triton")
def test_compiled_kept_steps(monkeypatch):
    import kvpager.hf.compiled as compiled
    from kvpager.hf.recurrent import forward_rows

    torch._dynamo.reset()
    monkeypatch.setattr(compiled, "_compiled", {})
    model, pool = model_and_pool()
    n = 8
    calls, eos, want = calls_and_tokens(model, [(9, 40, 1, 17, 5), (12, 4, 33, 8, 19, 2)], n, seed=80)
    with CapturedSteps(model, pool, compile=True) as steps:
        assert generate(model, pool, calls[0], n, eos_token_id=eos, cuda_graphs=steps) == want[0]
        first = steps.captures
        assert generate(model, pool, calls[1], n, eos_token_id=eos, cuda_graphs=steps) == want[1]
        assert steps.captures == first
    assert list(compiled._compiled) == [(forward_rows, "inductor", False)]
    pool.check_integrity()
    pool.close()


def test_beam_searches_keep_theirs_apart():
    """Beam searches over kept steps: the eager search's hypotheses each time (each
    beam's states gathered from its parent's in the kept states), captured once, apart
    from a generation's."""
    model, pool = model_and_pool()
    searches = [prompts(13, 5, 22, seed=90 + c) for c in range(3)]
    eager = [beam_search(model, pool, ps, 6, num_beams=3, num_return_sequences=3, eos_token_id=None)
             for ps in searches]
    with CapturedSteps(model, pool) as steps:
        generate(model, pool, searches[0], 4, eos_token_id=None, cuda_graphs=steps)
        greedy = steps.captures
        for ps, want in zip(searches, eager):
            got = beam_search(model, pool, ps, 6, num_beams=3, num_return_sequences=3, eos_token_id=None,
                              cuda_graphs=steps)
            assert [b.tokens for b in got] == [b.tokens for b in want]
            assert [s for b in got for s in b.scores] == pytest.approx([s for b in want for s in b.scores], abs=1e-4)
        assert steps.captures == greedy + 1 and len(steps._sets) == 2  # (9 rows: a bucket of 16, once)
        with torch.inference_mode():
            want = reference(model, searches[1], 4)
        assert generate(model, pool, searches[1], 4, eos_token_id=None, cuda_graphs=steps) == want
        assert steps.captures == greedy + 1
    assert pool.stats().num_sequences == 0
    pool.check_integrity()
    pool.close()
