"""Pipelined decode steps (`kvpager.hf.pipeline`): each pass launched before the
last one's tokens reach the host gives the unpipelined loop's tokens, and
leaves the pool exactly as that loop does (the same blocks published, nothing
leaked, sequences ending on an end token freed)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvpager import KVPool  # noqa: E402
from kvpager.hf import PagedGeneration, default_salt, spec_for_model  # noqa: E402
from tests.test_hf_client import make_model, prompt, reference  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return make_model(seed=4)  # its tokens vary (seed 5 repeats one a prompt)


def run(model, prompts, max_new_tokens, pipeline, eos=None, pool=None, steps_seen=None):
    pool = pool or KVPool(spec_for_model(model, num_blocks=160, block_size=8))
    with PagedGeneration(model, pool, prompts, max_new_tokens, eos_token_id=eos, pipeline=pipeline) as gen:
        assert gen._pipelined == pipeline
        while not gen.done:
            gen.step()
            if steps_seen is not None:
                steps_seen.append([len(o) for o in gen.outputs])
        outs = gen.outputs
    return outs, pool


def cached(pool, model, tokens):
    return pool.cached_tokens([tokens], default_salt(model))[0]


def test_pipelined_tokens_and_published_blocks_equal_the_unpipelined_loop(model):
    prompts = [prompt(n, seed=40 + n) for n in (3, 8, 19, 30)]
    sync, sync_pool = run(model, prompts, 21, pipeline=False)
    seen: list[list[int]] = []
    piped, pool = run(model, prompts, 21, pipeline=True, steps_seen=seen)
    assert piped == sync == [reference(model, p, 21) for p in prompts]
    # the outputs trail by one pass: nothing after the first step, everything at the end
    assert seen[0] == [1, 1, 1, 1] and seen[-1] == [21] * 4 and len(seen) == 21
    # generated blocks were published through record_tokens: the same cached prefixes
    for p, out in zip(prompts, piped):
        whole = p + out
        assert cached(pool, model, whole + [0]) == cached(sync_pool, model, whole + [0]) \
            == (len(whole) - 1) // 8 * 8 > len(p) // 8 * 8
    assert pool.stats().cached_blocks == sync_pool.stats().cached_blocks
    assert pool.stats().num_sequences == 0 and pool.stats().used_blocks == sync_pool.stats().used_blocks
    pool.check_integrity()


def test_a_sequence_ending_on_an_end_token_is_fed_once_more_and_freed_after(model):
    prompts = [prompt(n, seed=70 + n) for n in (6, 13, 22)]
    plain = [reference(model, p, 16) for p in prompts]
    # the end token: the second prompt's first token from its 3rd on that no output has earlier (so
    # the second prompt ends first, others maybe with it)
    eos = next(t for j, t in enumerate(plain[1]) if j >= 2 and all(t not in o[:j] for o in plain))
    want = [o[: o.index(eos) + 1] if eos in o else o for o in plain]
    assert len({len(o) for o in want}) > 1
    pool = KVPool(spec_for_model(model, num_blocks=160, block_size=8))
    with PagedGeneration(model, pool, prompts, 16, eos_token_id=eos, pipeline=True) as gen:
        held = []
        while not gen.done:
            gen.step()
            held.append(pool.stats().num_sequences)
            pool.check_integrity()
        assert gen.outputs == want
    # the ended sequence is held one pass past its end (the pass it was fed to), then freed
    short = want.index(min(want, key=len))
    ends_at = len(want[short])  # the step() whose completion saw its end token
    assert held[ends_at - 1] == 3 and held[ends_at] == 3 - sum(len(o) == len(want[short]) for o in want)
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


def test_an_end_token_fed_once_more_is_never_published(model):
    """Regression: the token a sequence ends on is fed to the pass already in
    flight, which writes its K/V. Where that slot was the last of a block, the
    block was published on that pass's commit (its id was recorded), so the
    pool kept one cached block more than the unpipelined loop, which never
    writes that token. Its id is no longer recorded: the pools end the same."""
    checked = 0
    for n in (5, 13, 21):
        p = prompt(n, seed=90 + n)
        plain = reference(model, p, 12)
        # the end token: an output whose slot (position n + j) is a block's last
        ends = [j for j in range(12) if (n + j + 1) % 8 == 0 and plain[j] not in plain[:j]]
        if not ends:
            continue
        eos = plain[ends[0]]
        sync, sync_pool = run(model, [p], 12, pipeline=False, eos=eos)
        piped, pool = run(model, [p], 12, pipeline=True, eos=eos)
        assert piped == sync == [plain[: ends[0] + 1]]
        assert pool.stats().cached_blocks == sync_pool.stats().cached_blocks
        whole = p + piped[0]
        assert cached(pool, model, whole + [0]) == cached(sync_pool, model, whole + [0]) == len(whole) // 8 * 8 - 8
        pool.check_integrity()
        checked += 1
    assert checked >= 2


def test_closing_with_a_pass_in_flight_completes_it_and_frees_everything(model):
    prompts = [prompt(9, seed=1), prompt(19, seed=2)]
    pool = KVPool(spec_for_model(model, num_blocks=160, block_size=8))
    gen = PagedGeneration(model, pool, prompts, 30, pipeline=True)
    for _ in range(5):
        gen.step()
    assert gen._inflight is not None and [len(o) for o in gen.outputs] == [5, 5]
    gen.close()
    # the pass in flight completed: six tokens each (the prefill's and five decode passes')
    assert gen.outputs == [reference(model, p, 30)[:6] for p in prompts]
    assert pool.stats().num_sequences == 0
    # what it wrote was committed: it fed position 23, which fills the third block of 8
    assert pool.cached_tokens([prompts[1] + gen.outputs[1] + [0]], default_salt(model)) == [24]
    pool.check_integrity()


def test_steady_steps_tell_the_pool_a_block_of_ids_at_a_time_and_close_settles(model):
    """Steady pipelined steps owe the pool their ids and commits (`Owed`) until a
    block's worth of passes: one `record_tokens` of a column per pass, then one
    `commit`. After every step each sequence's prompt + outputs finds cached all
    but at most a block's worth of passes (and the pass in flight); a generation
    closed while passes are owed leaves the pool as the unpipelined loop that
    ends on the same tokens, having published each generated block."""
    bs = 8
    prompts = [prompt(n, seed=300 + n) for n in (5, 11, 20)]
    pool = KVPool(spec_for_model(model, num_blocks=160, block_size=bs))
    salt = default_salt(model)
    told, record = [], pool.record_tokens

    def recorded(ids, tokens, *a, **k):
        told.append(tokens.shape)
        return record(ids, tokens, *a, **k)

    pool.record_tokens = recorded
    gen = PagedGeneration(model, pool, prompts, 40, eos_token_id=None)
    for _ in range(21):  # 20 passes completed: two blocks' worth told, 4 passes owed
        gen.step()
        for p, o in zip(prompts, gen.outputs):
            whole = p + o  # K/V written through its last token but the one in flight
            found = pool.cached_tokens([whole + [0]], salt)[0]
            assert (len(whole) - 1 - (bs - 1)) // bs * bs <= found <= (len(whole) - 1) // bs * bs
    assert told == [(3, bs), (3, bs)] and gen._owed is not None and gen._owed.count == 4
    gen.close()  # completes the pass in flight and settles
    assert told[2:] == [(3, 4)]  # (the tokens of the pass in flight were never fed: no ids to tell)
    outs = gen.outputs
    assert len(outs[0]) == 22 and outs == [reference(model, p, 22) for p in prompts]
    plain, plain_pool = run(model, prompts, 22, pipeline=False)
    assert plain == outs
    for p, o in zip(prompts, outs):
        whole = p + o
        assert cached(pool, model, whole + [0]) == cached(plain_pool, model, whole + [0]) == (len(whole) - 1) // bs * bs
    assert pool.stats().cached_blocks == plain_pool.stats().cached_blocks and pool.stats().num_sequences == 0
    pool.check_integrity()


def test_owed_passes_stay_within_a_default_daemons_tokens_limit(model, monkeypatch):
    """Owed ids are capped at `OWED_TOKENS` a call (a default daemon's tokens limit):
    a batch so large that a block's worth of passes would pass it owes fewer passes
    (here a cap of 7 ids over 3 sequences: 2 passes a call)."""
    import kvpager.hf.pipeline as pipeline

    monkeypatch.setattr(pipeline, "OWED_TOKENS", 7)
    prompts = [prompt(n, seed=320 + n) for n in (5, 11, 20)]
    pool = KVPool(spec_for_model(model, num_blocks=160, block_size=8))
    told, record = [], pool.record_tokens
    pool.record_tokens = lambda ids, tokens, *a, **k: told.append(tokens.shape) or record(ids, tokens, *a, **k)
    with PagedGeneration(model, pool, prompts, 10, eos_token_id=None) as gen:
        while not gen.done:
            gen.step()
        outs = gen.outputs
    assert outs == [reference(model, p, 10) for p in prompts]
    assert told == [(3, 2)] * 4  # 8 passes fed ids (9 decode passes, the last one's never fed)
    pool.check_integrity()


def test_a_pool_without_record_tokens_runs_unpipelined(model):
    class Plain:
        """A pool with `KVPool`'s methods but `record_tokens`."""

        def __init__(self, pool):
            self._pool = pool

        def __getattr__(self, name):
            if name == "record_tokens":
                raise AttributeError(name)
            return getattr(self._pool, name)

    pool = KVPool(spec_for_model(model, num_blocks=160, block_size=8))
    p = [prompt(11, seed=3)]
    with PagedGeneration(model, Plain(pool), p, 9) as gen:
        assert not gen._pipelined
        while not gen.done:
            gen.step()
        assert gen.outputs == [reference(model, p[0], 9)]
    pool.check_integrity()


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_pipelined_gpu_steps_equal_the_unpipelined_loop(graphs):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = make_model(seed=6, hidden=256).cuda()  # float32, head dim 64
    system = prompt(40, seed=600)  # shared: the plans cascade over it
    prompts = [system + prompt(n, seed=610 + n) for n in (3, 9, 20, 6, 31)]
    plain = [reference(model, p, 20) for p in prompts]
    eos = plain[1][5]

    def go(pipeline):
        pool = KVPool(spec_for_model(model, num_blocks=256, block_size=8), device="cuda:0")
        with PagedGeneration(model, pool, prompts, 20, eos_token_id=eos, cuda_graphs=graphs, cascade=True,
                             pipeline=pipeline) as gen:
            while not gen.done:
                gen.step()
            outs = gen.outputs
        pool.check_integrity()
        assert pool.stats().num_sequences == 0
        return outs, pool.stats().cached_blocks

    want = [o[: o.index(eos) + 1] if eos in o else o for o in plain]
    piped = go(True)
    assert piped == go(False) and piped[0] == want


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_failed_forward_pass_takes_back_its_slots(model, pipeline, monkeypatch):
    """A decode pass whose forward raises (a device out of memory, an interrupt)
    gives back the slots it appended: the next step feeds the same tokens at the
    same positions and the generation ends with transformers' tokens."""
    import kvpager.hf.generation as generation

    prompts = [prompt(n, seed=90 + n) for n in (7, 16, 25)]
    pool = KVPool(spec_for_model(model, num_blocks=160, block_size=8))
    real, calls = generation.paged_forward, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) in (4, 9):  # two decode passes fail (the 1st call is the prefill)
            raise RuntimeError("injected failure")
        return real(*a, **k)

    monkeypatch.setattr(generation, "paged_forward", flaky)
    with PagedGeneration(model, pool, prompts, 12, pipeline=pipeline) as gen:
        failures = 0
        while not gen.done:
            try:
                gen.step()
            except RuntimeError as e:
                assert "injected" in str(e)
                failures += 1
                pool.check_integrity()
                for s, i in zip(gen.seq_ids, range(3)):  # the tokens held: fed so far, none extra
                    fed = len(prompts[i]) + len(gen.outputs[i]) - 1 + (gen._inflight is not None)
                    assert pool.sequence(s).num_tokens == fed
        assert failures == 2
        assert gen.outputs == [reference(model, p, 12) for p in prompts]
    pool.check_integrity()


def test_the_plan_a_pass_in_flight_reads_outlives_the_next_plans(model):
    """A pass in flight keeps what its kernels read (its plan) until it completes,
    whatever plans are made meanwhile: on a GPU a dropped plan's device buffers
    could be handed to other work while the pass still reads them."""
    import gc
    import weakref

    pool = KVPool(spec_for_model(model, num_blocks=160, block_size=8))
    with PagedGeneration(model, pool, [prompt(9, seed=4), prompt(14, seed=5)], 8, pipeline=True) as gen:
        gen.step()
        refs = []
        while not gen.done:
            if gen._inflight is not None:
                assert gen._inflight.reads is not None
                refs.append(weakref.ref(gen._inflight.reads))
            gen.step()
            gc.collect()
            if len(refs) >= 1 and gen._inflight is not None:
                assert refs[-1]() is None or refs[-1]() is gen._inflight.reads  # completed: let go
        assert len(refs) >= 5


def _windowed_model():
    """A Mistral with a 12-token sliding window on every layer (blocks released as it decodes)."""
    torch.manual_seed(11)
    config = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=512, initializer_range=0.1, sliding_window=12)
    m = transformers.MistralForCausalLM(config).eval()
    m.generation_config.eos_token_id = None
    return m


@pytest.fixture(scope="module")
def windowed():
    return _windowed_model()


def test_pipelined_equals_unpipelined_for_random_batches(model, windowed):
    """Property: for random batches (prompt lengths, a shared prefix or not, block
    size, max_new_tokens, an end token some sequences reach, a sliding-window
    model releasing blocks), the pipelined loop gives the unpipelined loop's
    tokens and leaves the pool in the same state (cached blocks, what each
    prompt + output finds cached, no sequence, the integrity check)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def check(data):
        m = data.draw(st.sampled_from([model, windowed]), label="model")
        bs = data.draw(st.sampled_from([8, 16]), label="block size")
        shared = data.draw(st.integers(0, 20), label="shared prefix")
        seed = data.draw(st.integers(0, 10_000), label="seed")
        lens = data.draw(st.lists(st.integers(1, 30), min_size=1, max_size=4), label="own lengths")
        new = data.draw(st.integers(1, 14), label="max_new_tokens")
        system = prompt(shared, seed=seed) if shared else []
        prompts = [system + prompt(n, seed=seed + 1 + k) for k, n in enumerate(lens)]
        eos = data.draw(st.one_of(st.none(), st.integers(3, 127)), label="eos")
        results = []
        for pipeline in (False, True):
            pool = KVPool(spec_for_model(m, num_blocks=128, block_size=bs))
            with PagedGeneration(m, pool, prompts, new, eos_token_id=eos, pipeline=pipeline) as gen:
                while not gen.done:
                    gen.step()
                outs = gen.outputs
            pool.check_integrity()
            st_ = pool.stats()
            assert st_.num_sequences == 0
            salt = default_salt(m)
            found = [pool.cached_tokens([p + o + [0]], salt)[0] for p, o in zip(prompts, outs)]
            results.append((outs, st_.cached_blocks, found))
        assert results[0] == results[1]

    check()


def test_eager_plans_say_the_step_is_host_bound(model, monkeypatch):
    """Eager passes (prefill and decode, new plans and the reused one) ask for plans
    with ``host_bound=True``, so a decode cascade is chosen only where it would pace
    the device (`kvpager.cascade.HOST_BOUND_MIN_SAVED`); the tokens are transformers'."""
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    asked: list[dict] = []
    plan = pool.plan

    def recorded(*args, **options):
        asked.append(options)
        return plan(*args, **options)

    monkeypatch.setattr(pool, "plan", recorded)
    prompts = [prompt(n, seed=160 + n) for n in (4, 11)]
    with PagedGeneration(model, pool, prompts, 5) as gen:
        while not gen.done:
            gen.step()
        assert gen.outputs == [reference(model, p, 5) for p in prompts]
    assert len(asked) >= 5 and all(o.get("host_bound") is True for o in asked)
