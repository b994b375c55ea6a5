"""Model coverage of kvpager.hf through a daemon and over long runs: families
whose layers need the plan's views (windows and soft caps, layers reusing
earlier layers' K/V, chunked layers, two geometries in one pool) through a
daemon client; a windowed model holding about one window of blocks, and its
next turn hitting past its evicted first blocks, embedded and through a daemon.
Float32 on the CPU backend, tokens against transformers' greedy ``generate``."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_models import (  # noqa: E402, F401 (one_thread: its autouse fixture, one torch thread)
    WINDOW,
    make_model,
    one_thread,
    pool_for,
    prompt,
    reference,
)

from kvpager import KVPool  # noqa: E402
from kvpager.hf import PagedGeneration, beam_search, default_salt, generate, score, spec_for_model  # noqa: E402

THROUGH_DAEMON = {
    "gemma2": 4,  # windows and the soft cap
    "gemma3n": 3,  # layers that reuse earlier layers' K/V: the daemon's pool holds only those that store
    "llama4": 4,  # chunked layers: the plans' chunked views; queries scaled by position
    "gemma4": 4,  # layers of two geometries in one pool (the daemon's, sized by the client's spec)
}


@pytest.mark.parametrize("family", list(THROUGH_DAEMON))
def test_family_through_a_daemon_client(family):
    pytest.importorskip("zmq")
    from daemon_helpers import running_server

    from kvpager.client import Client

    model = make_model(family)
    prompts = [prompt(30, seed=10), prompt(17, seed=11)]
    spec = spec_for_model(model, num_blocks=64, block_size=8)
    assert spec.num_layers == THROUGH_DAEMON[family]
    with running_server(spec) as server, Client(server.endpoint) as pool:
        assert generate(model, pool, prompts, 10) == [reference(model, p, 10) for p in prompts]


@pytest.mark.parametrize("through_daemon", [False, True])
def test_windowed_model_holds_about_one_window_of_blocks(through_daemon):
    """Every layer windowed (Mistral-style): each step gives back the blocks no
    window reads again, so a sequence holds about a window of blocks however
    long it generates, with the tokens unchanged; a model with full-attention
    layers (Gemma-2's alternating layout) keeps them all."""
    tokens = [prompt(30, seed=12), prompt(9, seed=13)]
    new = 40
    for family, releases in (("mistral", True), ("gemma2", False)):
        model = make_model(family)
        spec = spec_for_model(model, num_blocks=96, block_size=8)
        with contextlib.ExitStack() as stack:
            pool = pool_for(spec, through_daemon, stack)
            held = []
            with PagedGeneration(model, pool, tokens, max_new_tokens=new) as gen:
                while not gen.done:
                    gen.step()
                    held.append(pool.stats().used_blocks)
                outs = gen.outputs
            assert outs == [reference(model, p, new) for p in tokens]
            if releases:  # window 6 in blocks of 8: at most 2 blocks each, and 1 more while a step appends
                assert max(held[2:]) <= 2 * 3
            else:  # every block kept: 79 tokens hold 10 blocks
                assert max(held) >= 10
            pool.check_integrity()


@pytest.mark.parametrize("through_daemon", [False, True])
def test_a_windowed_models_next_turn_hits_past_its_evicted_first_blocks(through_daemon):
    """Every layer windowed: a conversation's first turn gave its leading blocks
    back as it went (released first, so evicted first in a tight pool), and
    the next turn, whose prompt begins with the whole first turn, found no
    prefix at all (the chain of hits starts at block 0) and ran its prompt
    again. Now it hits as far as its first new token's window reads cached
    blocks, computes only the rest, and gives transformers' tokens."""
    model = make_model("mistral")
    first, new = prompt(40, seed=21), 30
    spec = spec_for_model(model, num_blocks=24, block_size=8)
    with contextlib.ExitStack() as stack:
        pool = pool_for(spec, through_daemon, stack)
        [answer] = generate(model, pool, [first], new)
        assert answer == reference(model, first, new)
        [filler] = pool.allocate([prompt(8 * 16, seed=22)])  # takes most of the pool: the oldest cached go
        pool.free([filler.seq_id])
        turn = first + answer + prompt(12, seed=23)
        salt = default_salt(model)
        assert pool.cached_tokens([turn], salt) == [0]  # no prefix from block 0 on
        hits = pool.cached_tokens([turn], salt, window=WINDOW)[0]
        assert hits >= (len(first) + new) // 8 * 8 - 8  # all but the block the last answer token went to
        with PagedGeneration(model, pool, [turn], max_new_tokens=20) as gen:
            assert gen.num_cached_tokens == [hits]
            while not gen.done:
                gen.step()
            outs = gen.outputs
        assert outs == [reference(model, turn, 20)]
        # score and beam search allocate with the window too: their hits, a fresh pool's results
        fresh = KVPool(spec)
        start = len(first) + new
        hit_before = pool.stats().prefix_hit_tokens
        [scored] = score(model, pool, [turn], start=start)
        assert pool.stats().prefix_hit_tokens - hit_before >= hits - 8
        np.testing.assert_allclose(scored, score(model, fresh, [turn], start=start)[0], rtol=1e-5, atol=1e-5)
        hit_before = pool.stats().prefix_hit_tokens
        [beams] = beam_search(model, pool, [turn], 6, num_beams=2, eos_token_id=None)
        assert pool.stats().prefix_hit_tokens - hit_before >= hits - 8
        assert beams.tokens == beam_search(model, fresh, [turn], 6, num_beams=2, eos_token_id=None)[0].tokens
        pool.check_integrity()
        assert pool.stats().used_blocks == 0
