"""kvpager.hf over a daemon `Client` whose session is lost: a `PagedCache` or
`PagedGeneration` made before `Client.reconnect()` (a restarted daemon)
refuses its next pass (`SessionLost`) instead of appending to, attending over
and at `close` freeing the sequences a newer cache of the same client got the
same ids for; and closing one whose client was closed or whose daemon
restarted raises nothing (the daemon freed its sequences with the session).
A cache dropped without `close` (as transformers' own caches are) has its
sequences freed at the pool's next call and gives the model's forward back:
a loop that gave each ``generate`` a new cache filled the pool."""

from __future__ import annotations

import gc

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from daemon_helpers import ipc_endpoint, running_server  # noqa: E402
from test_hf_models import make_model  # noqa: E402
from test_hf_paged_cache import PROMPT, cache_kw, padded_batch  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.client import Client  # noqa: E402
from kvpager.errors import InvalidArgument, SessionLost  # noqa: E402
from kvpager.hf import PagedCache, PagedGeneration, spec_for_model  # noqa: E402
from kvpager.hf.paged_cache import open_caches  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


def run(model, client, cache, ids, mask, new: int = 4):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              **cache_kw(model, cache))


def test_a_cache_from_before_a_reconnect_never_touches_the_new_sessions_sequences(model):
    spec = spec_for_model(model, num_blocks=64, block_size=8)
    endpoint, _ = ipc_endpoint()
    ids, mask = padded_batch(2, (0, 5))
    other_ids, other_mask = padded_batch(2, (0, 5), seed=77)
    with running_server(spec, endpoint=endpoint) as first:
        c = Client(first.endpoint, timeout=5)
        old = PagedCache(model, c)
        out = run(model, c, old, ids, mask)
        held = [s for s in old.seq_ids if s is not None]
    with running_server(spec, endpoint=endpoint), c:
        with pytest.raises(SessionLost):
            c.stats()
        c.reconnect()
        new = PagedCache(model, c)
        run(model, c, new, other_ids, other_mask)
        assert sorted(s for s in new.seq_ids if s is not None) == sorted(held)  # (the same ids again)
        lengths = [c.sequence(s).num_tokens for s in new.seq_ids]
        more = torch.cat([out, torch.full((2, 3), 7)], 1)
        more_mask = torch.cat([mask, torch.ones(2, more.shape[1] - mask.shape[1], dtype=torch.long)], 1)
        with pytest.raises(SessionLost, match="make a new PagedCache"):
            run(model, c, old, more, more_mask)
        old.close()  # frees nothing of the new session's
        assert [c.sequence(s).num_tokens for s in new.seq_ids] == lengths
        dyn = transformers.DynamicCache()
        want = run(model, None, dyn, other_ids, other_mask)
        again = torch.cat([want, torch.full((2, 3), 9)], 1)
        again_mask = torch.cat([other_mask, torch.ones(2, again.shape[1] - PROMPT, dtype=torch.long)], 1)
        assert torch.equal(run(model, c, new, again, again_mask), run(model, None, dyn, again, again_mask))
        new.close()
        assert c.stats().num_sequences == 0
        c.check_integrity()


def test_a_generation_from_before_a_reconnect_is_refused_and_frees_nothing_at_close(model):
    spec = spec_for_model(model, num_blocks=64, block_size=8)
    endpoint, _ = ipc_endpoint()
    with running_server(spec, endpoint=endpoint) as first:
        c = Client(first.endpoint, timeout=5)
        old = PagedGeneration(model, c, [list(range(3, 23))], max_new_tokens=8)
        old.step()
    with running_server(spec, endpoint=endpoint), c:
        with pytest.raises(SessionLost):
            old.step()
        c.reconnect()
        new = PagedGeneration(model, c, [list(range(30, 50))], max_new_tokens=8)
        assert new.seq_ids == old.seq_ids
        with pytest.raises(SessionLost, match="make a new PagedGeneration"):
            old.step()
        old.close()
        assert c.sequence(new.seq_ids[0]).num_tokens == 20  # (still held)
        while not new.done:
            new.step()
        new.close()
        assert c.stats().num_sequences == 0


def test_closing_a_cache_whose_client_is_gone_raises_nothing(model):
    spec = spec_for_model(model, num_blocks=64, block_size=8)
    ids, mask = padded_batch(2, (0, 5))
    with running_server(spec) as server:
        c = Client(server.endpoint)
        with PagedCache(model, c) as cache:
            run(model, c, cache, ids, mask)
            c.close()  # (its bye freed the cache's sequences)
        assert "forward" not in vars(model)  # the model's own forward back
        assert server.pool.stats().num_sequences == 0


@pytest.mark.parametrize("kind", ["pool", "daemon"])
def test_caches_dropped_without_close_give_their_blocks_back(model, kind):
    """Twelve generations, each on a new cache never closed, on a pool that holds
    four at a time: the fifth raised OutOfBlocks."""
    spec = spec_for_model(model, num_blocks=24, block_size=8)
    ids, mask = padded_batch(2, (0, 5))
    with running_server(spec) as server, Client(server.endpoint) as c:
        pool = KVPool(spec) if kind == "pool" else c
        want = run(model, None, transformers.DynamicCache(), ids, mask)
        for i in range(12):
            got = run(model, pool, PagedCache(model, pool), ids + 0 * i, mask)  # (dropped at once)
            assert torch.equal(got, want)
            gc.collect()  # (a cache and its layers refer to each other: the cycle collector frees it)
        assert open_caches(model) == 0 and "forward" not in vars(model)
        assert pool.stats().num_sequences == 0  # (freed by the call before this one's answer, at the latest)
        pool.check_integrity()


@pytest.mark.parametrize("kind", ["pool", "daemon"])
@pytest.mark.parametrize("pipeline", [True, False])
def test_generations_dropped_without_close_give_their_blocks_back(model, kind, pipeline):
    """Twelve generations stepped part-way and dropped (a loop that stops early,
    an exception between steps), on a pool that holds three at a time: the fourth
    raised OutOfBlocks. Each one's tokens are those of a generation run whole."""
    spec = spec_for_model(model, num_blocks=16, block_size=8)
    prompts = [list(range(3, 23)), list(range(40, 57))]
    with running_server(spec) as server, Client(server.endpoint) as c:
        pool = KVPool(spec) if kind == "pool" else c
        with PagedGeneration(model, pool, prompts, max_new_tokens=12, pipeline=pipeline) as whole:
            while not whole.done:
                whole.step()
        for i in range(12):
            g = PagedGeneration(model, pool, [p[i % 3 :] for p in prompts], max_new_tokens=12, pipeline=pipeline)
            for _ in range(3):
                g.step()
            if i % 3 == 0:
                assert g.outputs[0][:2] == whole.outputs[0][:2]
            del g
            gc.collect()
        assert pool.stats().num_sequences == 0  # (freed by the call before this one's answer, at the latest)
        pool.check_integrity()


@pytest.mark.parametrize("kind", ["pool", "daemon"])
def test_caches_dropped_without_close_give_their_blocks_back_without_a_cycle_collection(model, kind):
    """A cache and its layers (and its captured steps' and next pass's helpers) no
    longer refer to each other: a dropped cache goes when its last reference does,
    not at the collector's next full pass, which a loop of `generate` calls on a
    full pool did not wait for (OutOfBlocks at the fifth call here)."""
    spec = spec_for_model(model, num_blocks=24, block_size=8)
    ids, mask = padded_batch(2, (0, 5))
    with running_server(spec) as server, Client(server.endpoint) as c:
        pool = KVPool(spec) if kind == "pool" else c
        want = run(model, None, transformers.DynamicCache(), ids, mask)
        gc.collect()
        gc.disable()
        try:
            for _ in range(12):
                assert torch.equal(run(model, pool, PagedCache(model, pool), ids, mask), want)
        finally:
            gc.enable()
        assert pool.stats().num_sequences == 0
        pool.check_integrity()


def test_a_layer_of_a_dropped_cache_says_so(model):
    pool = KVPool(spec_for_model(model, num_blocks=24, block_size=8))
    layer = PagedCache(model, pool).layers[0]  # (the cache dropped at once)
    with pytest.raises(InvalidArgument, match="cache was dropped"):
        layer.get_seq_length()


@pytest.mark.parametrize("kind", ["cache", "generation"])
def test_closing_one_whose_pool_was_closed_raises_nothing(model, kind):
    """As one whose client was closed: its sequences went with the pool's storage.
    It raised the closed pool's InvalidArgument, from a ``with`` block's exit too,
    hiding the exception that ended the block."""
    pool = KVPool(spec_for_model(model, num_blocks=24, block_size=8))
    if kind == "generation":
        held = PagedGeneration(model, pool, [list(range(3, 23))], max_new_tokens=8)
        held.step()
    else:
        held = PagedCache(model, pool)
        ids, mask = padded_batch(2, (0, 5))
        run(model, pool, held, ids, mask)
    pool.close()
    with pytest.raises(KeyError, match="the block's own"), held:
        raise KeyError("the block's own")
    held.close()  # (again: still nothing)
    assert "forward" not in vars(model)
