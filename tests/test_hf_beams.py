"""Beam search on kvpager (`kvpager.hf.beam_search`): the hypotheses and scores of
transformers' ``generate(num_beams=..., do_sample=False)``, with and without end
tokens, every ``early_stopping`` and several length penalties; a batch the same as
each prompt alone; beams forked (their blocks shared, the last one copied on
write), nothing left held; bad arguments refused before anything is allocated."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_models import make_model, one_thread, prompt  # noqa: E402, F401

from kvpager import KVPool  # noqa: E402
from kvpager.hf import Beams, Sampling, beam_search, generate, spec_for_model  # noqa: E402

PROMPTS = [prompt(21, seed=1), prompt(5, seed=2), prompt(16, seed=3), prompt(30, seed=4)]
SETTINGS = [dict(num_beams=4), dict(num_beams=3, length_penalty=0.5), dict(num_beams=4, early_stopping=True),
            dict(num_beams=2, early_stopping="never", length_penalty=2.0), dict(num_beams=1)]


def transformers_beams(model, p: list[int], n: int, returned: int, eos, **settings) -> tuple[list, list]:
    """transformers' hypotheses (cut after their end token: the rest is padding) and scores."""
    with torch.no_grad():
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, num_return_sequences=returned, pad_token_id=0,
                             eos_token_id=eos, output_scores=True, return_dict_in_generate=True, **settings)
    ends = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    tokens = []
    for row in out.sequences[:, len(p) :].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
        tokens.append(row[:cut])
    scores = getattr(out, "sequences_scores", None)  # (none from num_beams=1: greedy search)
    scores = None if scores is None else scores.tolist()
    return tokens, scores


def _pool(model):
    return KVPool(spec_for_model(model, num_blocks=256, block_size=8))


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_transformers_hypotheses_and_scores(settings):
    model = make_model("llama")
    pool = _pool(model)
    free = beam_search(model, pool, PROMPTS[:1], 10, eos_token_id=None, num_beams=4)[0]
    ends = [None, free.tokens[0][2], [free.tokens[0][5], PROMPTS[3][0]]]  # none, one, two end tokens
    returned = min(2, settings["num_beams"])
    ended = 0
    for eos in ends:
        batch = beam_search(model, pool, PROMPTS, 10, eos_token_id=eos, num_return_sequences=returned, **settings)
        for p, got in zip(PROMPTS, batch):
            assert isinstance(got, Beams) and len(got.tokens) == len(got.scores) == returned
            want, scores = transformers_beams(model, p, 10, returned, eos, **settings)
            assert got.tokens == want
            if scores is not None:
                assert got.scores == pytest.approx(scores, abs=1e-5)
            alone = beam_search(model, pool, [p], 10, eos_token_id=eos, num_return_sequences=returned, **settings)[0]
            assert got.tokens == alone.tokens and got.scores == pytest.approx(alone.scores, abs=1e-5)
            ended += sum(len(t) < 10 for t in got.tokens)
    if settings["num_beams"] > 1 and settings.get("length_penalty", 1.0) <= 1.0:
        assert ended  # some hypotheses ended on an end token (a length penalty of 2 favours the longest)
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


def test_beams_share_their_blocks():
    """Beams are forks: the prompt's blocks held once, a beam's last block copied when
    a second child appends to it; the pool holds less than a copy a beam would."""
    model = make_model("llama")
    pool = _pool(model)
    forks, peak = [], []
    real_fork, real_append = pool.fork, pool.append_flat

    def fork(ids, n=1):
        forks.append(n)
        return real_fork(ids, n)

    def append_flat(*a, **k):
        out = real_append(*a, **k)
        peak.append(pool.stats().used_blocks)
        return out

    pool.fork, pool.append_flat = fork, append_flat
    p = prompt(64, seed=9)  # 8 blocks of 8
    beam_search(model, pool, [p], 12, eos_token_id=None, num_beams=4)
    assert forks and sum(forks) >= 3  # the first step's children at least
    assert pool.counters().cow_blocks > 0
    assert max(peak) < 4 * (8 + 2)  # a copy a beam would hold 4 x (8 prompt blocks + 2 of new tokens)
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(num_beams=0), "num_beams must be an int >= 1"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences must be an int from 1 to num_beams"),
    (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(early_stopping="sometimes"), "early_stopping must be False, True or 'never'"),
    (dict(early_stopping=None), "early_stopping must be False, True or 'never'"),
    (dict(cuda_graphs=True), "cuda_graphs needs the model and the pool on a CUDA device"),
    (dict(compile=True), "compile=True compiles the captured decode step: it needs cuda_graphs=True"),
    (dict(cuda_graphs="yes"), "cuda_graphs must be a bool"),
    (dict(eos_token_id=10**30), "eos_token_id: token ids must be within int64"),  # (a plain ValueError before)
])
def test_bad_arguments_are_refused_before_anything_is_allocated(kwargs, needle):
    model = make_model("llama")
    pool = _pool(model)
    before = pool.stats()
    with pytest.raises(ValueError, match=needle):
        beam_search(model, pool, PROMPTS, **{"max_new_tokens": 4, **kwargs})
    assert pool.stats() == before


def test_more_beams_than_the_vocabulary_give_transformers_beams():
    """At the first step every beam is the prompt; with fewer continuations than beams,
    beams are chosen from the prompt's copies that hold no sequence yet. Before, that
    forked a sequence of None after the prefill (an InvalidArgument about seq_ids)."""
    from test_hf_models import VOCAB

    model = make_model("llama")
    pool = _pool(model)
    p = prompt(5, seed=2)
    want, scores = transformers_beams(model, p, 3, 2, None, num_beams=VOCAB + 2)
    got = beam_search(model, pool, [p], 3, num_beams=VOCAB + 2, num_return_sequences=2, eos_token_id=None)[0]
    assert got.tokens == want and got.scores == pytest.approx(scores, abs=1e-4)
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


def test_extreme_length_penalties_run_to_the_end():
    """A length penalty whose ``length ** penalty`` overflows a float divides by inf (every
    score -0.0; transformers' own search raises OverflowError there); before, kvpager
    raised it too, after the prefill. A penalty of -1e300 gives transformers' beams."""
    model = make_model("llama")
    pool = _pool(model)
    eos = PROMPTS[3][0]
    got = beam_search(model, pool, PROMPTS[:1], 6, num_beams=3, num_return_sequences=2, length_penalty=1e300,
                      eos_token_id=eos)[0]
    assert len(got.tokens) == 2 and got.scores == [0.0, 0.0]
    want, scores = transformers_beams(model, PROMPTS[0], 6, 2, eos, num_beams=3, length_penalty=-1e300)
    got = beam_search(model, pool, PROMPTS[:1], 6, num_beams=3, num_return_sequences=2, length_penalty=-1e300,
                      eos_token_id=eos)[0]
    assert got.tokens == want and got.scores == scores
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


def assert_a_daemon_gives_the_embedded_beams(model, spec, prompts: list[list[int]], new: int, check_pool) -> None:
    """3 beams of ``new`` tokens, all returned, through a daemon `Client` over ``spec``:
    the embedded pool's hypotheses and scores; ``check_pool(client)`` after the search."""
    pytest.importorskip("zmq")
    from daemon_helpers import running_server

    from kvpager.client import Client

    want = beam_search(model, KVPool(spec), prompts, new, eos_token_id=None, num_beams=3, num_return_sequences=3)
    with running_server(spec) as server, Client(server.endpoint) as pool:
        got = beam_search(model, pool, prompts, new, eos_token_id=None, num_beams=3, num_return_sequences=3)
        check_pool(pool)
    for g, w in zip(got, want):
        assert g.tokens == w.tokens and g.scores == pytest.approx(w.scores, abs=1e-5)


def test_through_a_daemon_client_the_embedded_beams():
    model = make_model("llama")

    def no_sequences(pool):
        assert pool.stats().num_sequences == 0

    assert_a_daemon_gives_the_embedded_beams(model, spec_for_model(model, num_blocks=256, block_size=8), PROMPTS,
                                             8, no_sequences)


def test_a_pool_too_small_leaves_nothing_behind():
    """Beams outgrow the pool part-way: the pool's typed error, every beam freed."""
    from kvpager.errors import OutOfBlocks

    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=12, block_size=8))
    with pytest.raises(OutOfBlocks):
        beam_search(model, pool, [prompt(60, seed=3)], 30, eos_token_id=None, num_beams=4)
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


def test_generate_with_num_beams_gives_the_best_hypothesis():
    model = make_model("llama")
    pool = _pool(model)
    eos = PROMPTS[3][0]
    got = generate(model, pool, PROMPTS, 9, num_beams=3, length_penalty=0.8, eos_token_id=eos)
    for p, g in zip(PROMPTS, got):
        want, _ = transformers_beams(model, p, 9, 1, eos, num_beams=3, length_penalty=0.8)
        assert g == want[0]
    assert got == [b.tokens[0] for b in beam_search(model, pool, PROMPTS, 9, num_beams=3, length_penalty=0.8,
                                                    eos_token_id=eos)]
    for bad, needle in ((dict(sampling=Sampling(temperature=0.7)), "takes no sampling"),
                        (dict(logprobs=1), "takes no logprobs"), (dict(stop_sequences=[[3]]), "stop_sequences"),
                        (dict(num_beams=0), "num_beams must be an int >= 1"),
                        # (before, a beam search took cuda_graphs and ran eagerly whatever it said)
                        (dict(cuda_graphs=True), "cuda_graphs needs the model and the pool on a CUDA device")):
        with pytest.raises(ValueError, match=needle):
            generate(model, pool, PROMPTS, 4, **{"num_beams": 2, **bad})
    assert pool.stats().num_sequences == 0


def test_a_generation_config_that_asks_for_beams():
    """``generate(sampling="model")`` of a model whose generation config asks for a beam
    search (num_beams > 1, no sampling) gives transformers' ``generate()`` tokens:
    before, its greedy tokens, without a word. With a processor besides (a repetition
    penalty), refused by name."""
    model = make_model("llama")
    pool = _pool(model)
    c = model.generation_config
    c.num_beams, c.length_penalty, c.early_stopping, c.do_sample = 3, 0.7, True, False
    got = generate(model, pool, PROMPTS, 8, sampling="model", eos_token_id=None)
    for p, g in zip(PROMPTS, got):
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=8, eos_token_id=None)
        assert g == out[0, len(p) :].tolist()
    assert got != generate(model, pool, PROMPTS, 8, eos_token_id=None)  # (greedy differs here)
    c.repetition_penalty = 1.3
    with pytest.raises(ValueError, match="num_beams=3.*processors"):
        generate(model, pool, PROMPTS, 8, sampling="model", eos_token_id=None)
    assert pool.stats().num_sequences == 0


@pytest.mark.parametrize("through_daemon", [False, True])
def test_a_windowed_models_beams_hold_about_one_window_of_blocks(through_daemon):
    """Every layer windowed (Mistral-style): each step gives back the blocks no
    beam's window reads again, as `generate` does, so a long search holds about a
    window of blocks a beam (it held every block, and ran out of blocks where the
    greedy generation fit); the hypotheses and scores are transformers'."""
    import contextlib

    from test_hf_models import pool_for

    model = make_model("mistral")
    tokens = [prompt(30, seed=12), prompt(9, seed=13)]
    new, beams = 60, 3
    with contextlib.ExitStack() as stack:
        # a window of 6 in blocks of 8: the search fits 14 blocks; every block kept, it needed 30
        pool = pool_for(spec_for_model(model, num_blocks=20, block_size=8), through_daemon, stack)
        got = beam_search(model, pool, tokens, new, num_beams=beams, eos_token_id=None)
        for p, hyp in zip(tokens, got):
            want, scores = transformers_beams(model, p, new, 1, None, num_beams=beams)
            assert hyp.tokens[:1] == want and hyp.scores[:1] == pytest.approx(scores, abs=1e-5)
        assert pool.stats().num_sequences == 0
        pool.check_integrity()
