"""Models with recurrent layers (`kvpager.hf.recurrent`) on a GPU pool: float32,
head dim 32 (the smallest the CUDA kernels take), tokens identical to
transformers' greedy ``generate`` of the same model on the same GPU, sequences
ending at different steps; eager decode steps, and decode steps captured in CUDA
graphs (pipelined or not, and compiled by inductor) over batch buckets that
shrink as sequences end, their recurrent states read and written in place. Skips
without CUDA."""

from __future__ import annotations

import pytest
from gpu_helpers import cupy_torch_or_skip

pytest.importorskip("transformers")
_, torch = cupy_torch_or_skip()

from test_hf_recurrent import make, prompts, reference  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import PagedGeneration, generate, spec_for_model  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next", "jamba", "lfm2", "nemotron_h"])
def test_tokens_equal_transformers_on_a_gpu_pool(family):
    model = make(family, head_dim=32, hidden_size=128).cuda()
    ps = prompts(9, 40, 1, 17)
    with torch.inference_mode():
        free = reference(model, ps, 6)
        eos = [free[1][2]]
        want = reference(model, ps, 6, eos=eos)
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=16), device="cuda:0")
    assert generate(model, pool, ps, max_new_tokens=6, eos_token_id=eos) == want
    assert pool.stats().num_sequences == 0
    pool.check_integrity()
    pool.close()


def _ending_early(free: list[list[int]], n: int) -> tuple[list[int], list[list[int]]]:
    """One or two end tokens that no sequence gives first, that end at least two
    sequences by their ``n - 3``-th token and leave at least one to run all ``n``
    (so the batch's graph bucket shrinks mid-way, pipelined or not), and each
    sequence's tokens with them: greedy tokens stop at the first end token."""
    def cut(ends: set[int]) -> list[list[int]]:
        return [f[: next((k for k, t in enumerate(f) if t in ends), len(f) - 1) + 1] for f in free]

    seen = sorted({t for f in free for t in f})
    for ends in [{t} for t in seen] + [{a, b} for a in seen for b in seen if a < b]:
        want = cut(ends)
        if (all(len(w) >= 2 for w in want) and sum(len(w) <= n - 3 for w in want) >= 2
                and any(len(w) == n for w in want)):
            return sorted(ends), want
    raise AssertionError(f"no end tokens end some sequences early and leave another: {free}")


FAMILIES = ["qwen3_5", "qwen3_next", "jamba", "bamba", "lfm2", "nemotron_h", "falcon_h1", "zamba", "zamba2"]


def captured_steps_give_transformers_tokens(family: str, own_buckets: bool = True, **options) -> None:
    """9 sequences run in the bucket of 16 (7 padding rows, whose states are unused
    rows), then, once some have ended, in the bucket of 8 (a second capture over the
    same state tensors, the rows left moved up in place); every token is
    transformers', nothing is left in the pool. ``options``: `PagedGeneration`'s.
    Not ``own_buckets``: the graphs' default, the bucket of 16 replayed throughout."""
    # (Bamba's Mamba heads are sized to twice the default hidden size; LFM2's weights drawn wider,
    # or its greedy tokens repeat each sequence's first, so no token ends some sequences early)
    # The experts of Qwen3-Next, Jamba and Nemotron-H as batched matmuls: in float32 their default
    # (grouped-mm) loop reads the routing to the host, which a capture refuses (test below).
    # (Zamba's attention takes twice the hidden size, as its tests' configs give it: their weights drawn
    # wider too)
    own = {"bamba": {}, "lfm2": dict(hidden_size=128, initializer_range=0.1),
           **{f: dict(hidden_size=64, initializer_range=0.2) for f in ("zamba", "zamba2")}}
    model = make(family, head_dim=32, experts_implementation="batched_mm",
                 **own.get(family, dict(hidden_size=128))).cuda()
    ps = prompts(9, 40, 1, 17, 5, 23, 3, 11, 30, seed=4)
    n = 8
    with torch.inference_mode():
        free = reference(model, ps, n)
    eos, want = _ending_early(free, n)
    pool = KVPool(spec_for_model(model, num_blocks=128, block_size=16), device="cuda:0")
    with PagedGeneration(model, pool, ps, n, eos_token_id=eos, cuda_graphs=True, **options) as gen:
        assert gen._pipelined == options.get("pipeline", True)
        if own_buckets:  # every bucket its own: captured as the batch shrinks
            gen._graphs.reuse, gen._graphs.reuse_rows = 1, 0
        while not gen.done:
            gen.step()
        outputs = gen.outputs
        buckets = sorted(gen._graphs.graphs)
    assert outputs == want
    # the batch shrank into a smaller bucket: captured again, or the bucket of 16 replayed
    assert (16 in buckets and min(buckets) < 16) if own_buckets else buckets == [16]
    assert pool.stats().num_sequences == 0
    pool.check_integrity()
    pool.close()


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "unpipelined"])
@pytest.mark.parametrize("family", FAMILIES)
def test_captured_decode_steps_give_transformers_tokens(family, pipeline):
    """``cuda_graphs=True``, pipelined or not (`captured_steps_give_transformers_tokens`)."""
    captured_steps_give_transformers_tokens(family, pipeline=pipeline)


def test_a_shrinking_batch_replays_its_larger_bucket():
    """The graphs' default: as sequences end, the bucket of 16 replays their rows
    (the states' rows moved up in place, the rest padding): transformers' tokens."""
    captured_steps_give_transformers_tokens("qwen3_5", own_buckets=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_captured_steps_give_transformers_tokens(family, monkeypatch):
    """``compile=True``: the captured steps are the decode pass compiled by inductor
    (the recurrent layers' code fused with the rest, kvpager's attention one opaque
    op), captured over the same state tensors in both buckets: transformers' tokens,
    and the step did run compiled."""
    pytest.importorskip("triton")  # torch.compile's inductor backend
    import kvpager.hf.compiled as compiled
    from kvpager.hf.recurrent import forward_rows

    torch._dynamo.reset()  # the families together would pass dynamo's recompile limit
    monkeypatch.setattr(compiled, "_compiled", {})
    captured_steps_give_transformers_tokens(family, compile=True)
    assert list(compiled._compiled) == [(forward_rows, "inductor", False)]


def test_a_step_that_reads_back_during_capture_is_refused_with_the_way_out():
    """Qwen3-Next in float32 with its default experts, whose loop reads the routing
    to the host: the eager pass runs, the capture fails, and kvpager's typed error
    names both ways out (no graphs, or batched experts); nothing is left held."""
    from kvpager.errors import UnsupportedConfiguration

    model = make("qwen3_next", head_dim=32, hidden_size=128).cuda()
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=16), device="cuda:0")
    with pytest.raises(UnsupportedConfiguration, match="cuda_graphs=False.*batched_mm"):
        generate(model, pool, prompts(9, 5, seed=2), max_new_tokens=4, eos_token_id=None, cuda_graphs=True)
    assert pool.stats().num_sequences == 0
    pool.check_integrity()
    pool.close()


def test_a_shared_system_prompt_resumes_from_its_held_state_on_a_gpu_pool():
    """Prefix reuse on a GPU pool (the CPU tests count the tokens each pass runs):
    requests sharing a 40-token system prompt, one generation each, then the first
    one's follow-up turn twice. The third request on resumes from the state held
    where the system prompt's whole blocks end (32 tokens), its attention reading the cached K/V (nothing
    written there); every run gives transformers' tokens on the same GPU."""
    from kvpager.hf.state_cache import StateCache

    model = make("qwen3_next", head_dim=32, hidden_size=128, experts_implementation="batched_mm").cuda()
    store = StateCache.of(model)
    store.clear()
    pool = KVPool(spec_for_model(model, num_blocks=128, block_size=16), device="cuda:0")
    [system] = prompts(40, seed=21)
    users = [system + u for u in prompts(6, 11, 3, 9, seed=22)]
    answers = []
    for p in users:
        with torch.inference_mode():
            [want] = reference(model, [p], 3)
        assert generate(model, pool, [p], max_new_tokens=3, eos_token_id=None) == [want]
        answers.append(want)
    assert store.stores >= 1 and store.hits >= 2
    turn = users[0] + answers[0][:2] + prompts(7, seed=23)[0]
    with torch.inference_mode():
        [want2] = reference(model, [turn], 3)
    for _ in range(2):
        assert generate(model, pool, [turn], max_new_tokens=3, eos_token_id=None) == [want2]
    assert pool.stats().num_sequences == 0
    pool.check_integrity()
    pool.close()


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "unpipelined"])
def test_a_next_turn_resumes_where_captured_steps_ended(pipeline, monkeypatch):
    """``cuda_graphs=True``, sequences ending at different steps: the states each
    held at its last block boundary (marked after the graph replays that reached
    one, moved up with the rows as the batch shrank) let each sequence's next turn
    run only what follows that boundary (the tokens each prefill pass runs
    counted); every token is transformers' on the same GPU."""
    from kvpager.hf.recurrent import Recurrent
    from kvpager.hf.state_cache import StateCache

    model = make("qwen3_5", head_dim=32, hidden_size=128).cuda()
    StateCache.of(model).clear()
    bs, n = 16, 24
    ps = prompts(9, 40, 1, 17, 5, 23, 3, 11, 30, seed=4)
    with torch.inference_mode():
        free = reference(model, ps, n)
    eos, want = _ending_early(free, n)
    pool = KVPool(spec_for_model(model, num_blocks=256, block_size=bs), device="cuda:0")
    assert generate(model, pool, ps, max_new_tokens=n, eos_token_id=eos, cuda_graphs=True, pipeline=pipeline) == want
    seen: list[int] = []
    real = Recurrent._pass
    monkeypatch.setattr(Recurrent, "_pass", lambda self, plan, *a, **kw: seen.append(plan.num_tokens) or real(
        self, plan, *a, **kw))
    resumed = 0
    for p, answer, more in zip(ps, want, prompts(*[5] * len(ps), seed=6)):
        turn = p + answer + more
        ran = len(p) + len(answer) - 1
        held = ran - ran % bs if ran - ran % bs >= len(p) else 0
        resumed += held > len(p)
        with torch.inference_mode():
            [want2] = reference(model, [turn], 3)
        seen.clear()
        assert generate(model, pool, [turn], max_new_tokens=3, eos_token_id=None) == [want2]
        assert sum(seen[:-2]) == len(turn) - held, (held, seen)
    assert resumed >= 2
    assert pool.stats().num_sequences == 0
    pool.check_integrity()
    pool.close()
