"""`kvpager.hf.CapturedSteps`: captured decode steps kept across generations give
the tokens of eager generation on every call (float32), capture nothing again
where nothing changed, and capture again where the weights moved elsewhere,
where a call's contexts are far longer than the capture's, or for passes of
another kind (logits for sampling). One generation at a time; refused where
they cannot serve. Skips without a GPU, CuPy, torch or transformers (the CPU
refusals are in test_hf_kept_graphs_cpu.py; models with recurrent layers in
test_hf_kept_graphs_recurrent.py)."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("cupy")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_hf_client import make_model, prompt  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.errors import InvalidArgument  # noqa: E402
from kvpager.hf import (  # noqa: E402
    CapturedSteps,
    PagedGeneration,
    Sampling,
    beam_search,
    generate,
    spec_for_model,
)

pytestmark = pytest.mark.gpu


def pool_for(model, blocks=512):
    return KVPool(spec_for_model(model, num_blocks=blocks, block_size=8), device="cuda:0")


def test_kept_steps_give_eager_tokens_and_capture_once():
    model = make_model(hidden=256).cuda()
    pool = pool_for(model)
    calls = [[prompt(n, seed=500 + n + 7 * c) for n in (5, 17, 40, 9, 33)] for c in range(3)]
    eager = [generate(model, pool, ps, max_new_tokens=12, eos_token_id=None) for ps in calls]
    with CapturedSteps(model, pool) as steps:
        assert generate(model, pool, calls[0], max_new_tokens=12, eos_token_id=None, cuda_graphs=steps) == eager[0]
        first = steps.captures
        assert first >= 1
        for ps, want in zip(calls[1:], eager[1:]):  # the same bucket, contexts of the same class
            assert generate(model, pool, ps, max_new_tokens=12, eos_token_id=None, cuda_graphs=steps) == want
        assert steps.captures == first
        # a smaller batch replays the kept bucket of 8 (`DecodeGraphs.reuse`); a larger one captures its own
        few = calls[0][:2]
        assert generate(model, pool, few, max_new_tokens=12, eos_token_id=None, cuda_graphs=steps) == eager[0][:2]
        assert steps.captures == first
        assert generate(model, pool, calls[0] + calls[1], max_new_tokens=12, eos_token_id=None,
                        cuda_graphs=steps) == eager[0] + eager[1]
        assert steps.captures == first + 1
        # passes that give logits (log-probabilities kept, sampling) are kept apart from greedy ones
        kept = generate(model, pool, calls[1], max_new_tokens=12, eos_token_id=None, cuda_graphs=steps,
                        logprobs=0)
        assert [c.tokens for c in kept] == eager[1] and len(steps._sets) == 2
        assert steps.captures == first + 2
        sampled = Sampling(temperature=0.8, seed=3)
        a = generate(model, pool, calls[2], max_new_tokens=12, eos_token_id=None, cuda_graphs=steps,
                     sampling=sampled)
        assert a == generate(model, pool, calls[2], max_new_tokens=12, eos_token_id=None, sampling=sampled)
    assert steps.closed and not steps._sets
    pool.check_integrity()
    assert pool.stats().num_sequences == 0


def test_weights_moved_elsewhere_capture_again_weights_updated_in_place_do_not():
    model = make_model(hidden=256).cuda()
    pool = pool_for(model)
    prompts = [prompt(n, seed=600 + n) for n in (6, 21, 11)]
    steps = CapturedSteps(model, pool)
    try:
        generate(model, pool, prompts, max_new_tokens=10, eos_token_id=None, cuda_graphs=steps)
        captured = steps.captures
        with torch.no_grad():  # in place: the graphs read the new values where they are
            for p in model.model.layers[0].parameters():
                p.mul_(1.5)
        want = generate(model, pool, prompts, max_new_tokens=10, eos_token_id=None)
        assert generate(model, pool, prompts, max_new_tokens=10, eos_token_id=None, cuda_graphs=steps) == want
        assert steps.captures == captured
        # replaced: a new tensor elsewhere (loading a state dict with assign=True, say)
        layer = model.model.layers[1].mlp.down_proj
        layer.weight = torch.nn.Parameter(layer.weight.detach() * -2.0)
        want = generate(model, pool, prompts, max_new_tokens=10, eos_token_id=None)
        assert generate(model, pool, prompts, max_new_tokens=10, eos_token_id=None, cuda_graphs=steps) == want
        assert steps.captures == captured + 1
    finally:
        steps.close()


def test_far_longer_contexts_capture_again():
    model = make_model(hidden=256).cuda()
    pool = pool_for(model, blocks=2048)
    short = [prompt(n, seed=700 + n) for n in (4, 9)]
    long = [prompt(n, seed=710 + n) for n in (3000, 2900)]
    with CapturedSteps(model, pool) as steps:
        generate(model, pool, short, max_new_tokens=6, eos_token_id=None, cuda_graphs=steps)
        captured = steps.captures
        graphs = next(iter(steps._sets.values()))
        assert graphs.graphs[2].max_len < 64
        want = generate(model, pool, long, max_new_tokens=6, eos_token_id=None)
        assert generate(model, pool, long, max_new_tokens=6, eos_token_id=None, cuda_graphs=steps) == want
        assert steps.captures == captured + 1 and graphs.graphs[2].max_len > 2048
        # and back: contexts of a class the kept graph was not made for capture again
        assert generate(model, pool, short, max_new_tokens=6, eos_token_id=None, cuda_graphs=steps) == \
            generate(model, pool, short, max_new_tokens=6, eos_token_id=None)
        assert steps.captures == captured + 2
    pool.check_integrity()


def test_one_generation_at_a_time():
    model = make_model(hidden=256).cuda()
    pool = pool_for(model)
    prompts = [prompt(n, seed=800 + n) for n in (5, 12)]
    want = generate(model, pool, prompts, max_new_tokens=8, eos_token_id=None)
    with CapturedSteps(model, pool) as steps:
        gen = PagedGeneration(model, pool, prompts, max_new_tokens=8, eos_token_id=None, cuda_graphs=steps)
        gen.step()
        with pytest.raises(InvalidArgument, match="another generation"):
            PagedGeneration(model, pool, prompts, max_new_tokens=8, eos_token_id=None, cuda_graphs=steps)
        errors = []

        def other_thread():
            try:
                generate(model, pool, prompts, max_new_tokens=8, eos_token_id=None, cuda_graphs=steps)
            except InvalidArgument as e:
                errors.append(e)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join(60)
        assert len(errors) == 1
        while not gen.done:
            gen.step()
        assert gen.outputs == want
        gen.close()
        # closed: the next generation takes them
        assert generate(model, pool, prompts, max_new_tokens=8, eos_token_id=None, cuda_graphs=steps) == want
    with pytest.raises(InvalidArgument, match="closed"):
        generate(model, pool, prompts, max_new_tokens=8, eos_token_id=None, cuda_graphs=steps)
    # closed while a generation holds them: it goes on with them, and they go when it closes
    steps = CapturedSteps(model, pool)
    gen = PagedGeneration(model, pool, prompts, max_new_tokens=8, eos_token_id=None, cuda_graphs=steps)
    gen.step()
    gen.step()
    steps.close()
    while not gen.done:
        gen.step()
    assert gen.outputs == want and steps._sets
    gen.close()
    assert not steps._sets
    pool.check_integrity()
    assert pool.stats().num_sequences == 0


def test_refused_where_they_cannot_serve():
    model = make_model(hidden=256).cuda()
    pool, other = pool_for(model), pool_for(model)
    prompts = [prompt(7, seed=900)]
    with CapturedSteps(model, pool) as steps:
        with pytest.raises(InvalidArgument, match="another model or pool"):
            generate(model, other, prompts, max_new_tokens=3, cuda_graphs=steps)
        with pytest.raises(InvalidArgument, match="compile=True"):
            generate(model, pool, prompts, max_new_tokens=3, cuda_graphs=steps, compile=True)
    for p in (pool, other):
        p.check_integrity()
        assert p.stats().num_sequences == 0


def test_a_generation_that_fails_to_allocate_leaves_them_free():
    from kvpager.errors import OutOfBlocks

    model = make_model(hidden=256).cuda()
    pool = pool_for(model, blocks=16)  # 128 tokens
    prompts = [prompt(9, seed=950)]
    with CapturedSteps(model, pool) as steps:
        with pytest.raises(OutOfBlocks):
            generate(model, pool, [prompt(400, seed=951)], max_new_tokens=3, cuda_graphs=steps)
        assert generate(model, pool, prompts, max_new_tokens=5, eos_token_id=None, cuda_graphs=steps) == \
            generate(model, pool, prompts, max_new_tokens=5, eos_token_id=None)
    pool.check_integrity()
    assert pool.stats().num_sequences == 0


def test_beam_searches_keep_theirs_apart():
    """``beam_search(..., cuda_graphs=steps)``: the hypotheses of an eager search, its
    steps kept apart from a generation's and captured once over searches."""
    model = make_model(hidden=256).cuda()
    pool = pool_for(model)
    searches = [[prompt(n, seed=1000 + n + 5 * c) for n in (6, 19)] for c in range(3)]
    eager = [beam_search(model, pool, ps, max_new_tokens=8, num_beams=3, eos_token_id=None) for ps in searches]
    with CapturedSteps(model, pool) as steps:
        generate(model, pool, searches[0], max_new_tokens=4, eos_token_id=None, cuda_graphs=steps)
        greedy = steps.captures
        for ps, want in zip(searches, eager):
            got = beam_search(model, pool, ps, max_new_tokens=8, num_beams=3, eos_token_id=None, cuda_graphs=steps)
            assert [b.tokens for b in got] == [b.tokens for b in want]
            assert [s for b in got for s in b.scores] == pytest.approx([s for b in want for s in b.scores], abs=1e-4)
        assert steps.captures == greedy + 1 and len(steps._sets) == 2  # (6 rows: a bucket of 8, once)
        found = generate(model, pool, searches[1], max_new_tokens=8, num_beams=3, eos_token_id=None,
                         cuda_graphs=steps)
        assert found == [b.tokens[0] for b in eager[1]] and steps.captures == greedy + 1
    pool.check_integrity()
    assert pool.stats().num_sequences == 0
