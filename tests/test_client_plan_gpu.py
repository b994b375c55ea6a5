"""A worker of a GPU daemon plans locally: its mirror of the block tables
drives a `CupyPlan` over the IPC-mapped slab, which writes K/V where the
daemon reads it and attends as the daemon does. The daemon is a subprocess
(a process cannot open its own IPC handles). Skips without CuPy or a GPU."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip  # noqa: E402

cupy = cupy_or_skip()

from daemon_helpers import daemon_process, ipc_endpoint  # noqa: E402
from reference import TOLERANCE, rel_err  # noqa: E402

from kvpager.client import Client  # noqa: E402
from kvpager.spec import PoolSpec  # noqa: E402

pytestmark = pytest.mark.gpu

SPEC = PoolSpec(num_layers=3, num_kv_heads=2, head_dim=64, num_blocks=64, block_size=16,
                dtype="float16", num_host_blocks=16)
SERVE = ["--device", "cuda:0", "--layers", "3", "--kv-heads", "2", "--head-dim", "64",
         "--block-size", "16", "--dtype", "float16", "--blocks", "64", "--host-blocks", "16",
         "--heartbeat-timeout", "60"]
WAIT = 240  # seconds: the daemon imports CuPy and compiles kernels


@pytest.fixture(scope="module")
def endpoint():
    endpoint, tmp = ipc_endpoint()
    try:
        with daemon_process(SERVE, endpoint, timeout=120):
            yield endpoint
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(SPEC.dtype)


def test_gpu_worker_plans_from_its_mirror(endpoint):
    rng = np.random.default_rng(5)
    with Client(endpoint, timeout=WAIT, heartbeat=False) as c:
        assert c.gpu and not c._same_process()
        seqs = c.allocate([list(range(n)) for n in (21, 16, 40)])
        ids = [s.seq_id for s in seqs]
        slots = np.concatenate([s.slots for s in seqs])
        for layer in range(SPEC.num_layers):
            c.write(layer, slots, _rand(rng, len(slots), 2, 64), _rand(rng, len(slots), 2, 64))
        c.commit(ids)
        [kids] = c.fork([ids[2]], 2)
        c.swap_out([ids[0]])
        c.swap_in([ids[0]])  # new block ids, from swap_in's reply
        step, qlens = ids + kids, [1, 2, 1, 5, 1]
        slots = c.append_flat(step, qlens)  # copy-on-write for both children
        tables, lens = c.tables(step)
        want = c._call("tables", {"seq_ids": step})
        np.testing.assert_array_equal(tables, want[0])
        np.testing.assert_array_equal(lens, want[1])

        plan = c.plan(step, qlens, slots)
        n = sum(qlens)
        for layer in range(SPEC.num_layers):
            plan.write(layer, cupy.asarray(_rand(rng, n, 2, 64)), cupy.asarray(_rand(rng, n, 2, 64)))
            q = _rand(rng, n, 4, 64)
            out = cupy.asnumpy(plan.attend(layer, cupy.asarray(q)))
            c.synchronize()
            ref = cupy.asnumpy(c.remote_attend(layer, step, q, qlens))
            assert rel_err(out, ref) < TOLERANCE[SPEC.dtype]
            assert rel_err(cupy.asnumpy(c.local_attend(layer, step, q, qlens)), ref) < TOLERANCE[SPEC.dtype]
        c.check_integrity()


@pytest.mark.parametrize("graphs", [False, True, "compiled", "kept"])
def test_pipelined_generation_through_the_gpu_daemon(endpoint, graphs):
    """A model worker generating over the daemon's GPU pool: pipelined passes (slots
    appended without ids, `record_tokens` over the wire, commits that do not wait for
    the pass in flight) give the tokens and published blocks of the loop that waits
    for each pass, eager, captured, and captured after torch.compile (the worker's
    plans reached through the ``kvpager::write_attend`` op)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    compiled = graphs == "compiled"
    if compiled:
        pytest.importorskip("triton")
        graphs = True
    from kvpager.hf import CapturedSteps, PagedGeneration, default_salt

    torch.manual_seed(7)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=512, initializer_range=0.1)
    model = transformers.LlamaForCausalLM(config).to("cuda", torch.float16).eval()
    rng = np.random.default_rng(9)
    system = rng.integers(3, 128, 35).tolist()
    prompts = [system + rng.integers(3, 128, int(n)).tolist() for n in (3, 11, 20)]
    with Client(endpoint, timeout=WAIT, heartbeat=False) as c:
        salt = default_salt(model)
        runs = []
        steps = CapturedSteps(model, c) if graphs == "kept" else None  # (kept across both runs)
        for pipeline in (True, False):
            tag = f"{salt}-{pipeline}-{graphs}-{compiled}"
            with PagedGeneration(model, c, prompts, 14, salt=tag, eos_token_id=None,
                                 cuda_graphs=steps or graphs, pipeline=pipeline, compile=compiled) as gen:
                assert gen._pipelined == pipeline
                while not gen.done:
                    gen.step()
                outs = gen.outputs
            cached = [c.cached_tokens([p + o + [0]], salt=tag)[0]
                      for p, o in zip(prompts, outs)]
            runs.append((outs, cached))
        assert runs[0] == runs[1]
        assert all(len(o) == 14 for o in runs[0][0]) and min(runs[0][1]) >= 48  # generated blocks published
        if steps is not None:
            assert steps.captures == 1  # (3 sequences: a bucket of 4, captured by the first run alone)
            steps.close()
        assert c.stats().num_sequences == 0
        c.check_integrity()


@pytest.mark.parametrize("graphs", [False, True])
def test_transformers_generate_on_a_paged_cache_over_the_gpu_daemon(endpoint, graphs):
    """transformers' own ``generate`` on a `PagedCache` over a worker's `Client` of the
    daemon's GPU pool (its plans over the IPC-mapped slab; with ``cuda_graphs`` its
    decode passes replayed): the tokens of the same cache over an in-process GPU pool of
    that geometry, on prefix hits the second time, every sequence freed after."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("transformers.cache_utils")
    from kvpager import KVPool
    from kvpager.hf import PagedCache
    from kvpager.hf.recurrent_states import cache_argument

    torch.manual_seed(7)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=512, initializer_range=0.1)
    model = transformers.LlamaForCausalLM(config).to("cuda", torch.float16).eval()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, 128, (3, 40), generator=torch.Generator().manual_seed(3))
    ids[:, :32] = ids[0, :32]  # a shared prefix of two blocks
    mask = torch.ones_like(ids)
    mask[2, :4] = 0  # (left padding: the third row's prompt is 36 tokens)
    ids, mask = ids.masked_fill(mask == 0, 0).cuda(), mask.cuda()

    def generate(pool):
        with PagedCache(model, pool, salt="over-the-daemon", cuda_graphs=graphs) as cache:
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False,
                                  **{cache_argument(model): cache})

    local = KVPool(SPEC, device="cuda:0")
    try:
        want = generate(local)
    finally:
        local.close()
    with Client(endpoint, timeout=WAIT, heartbeat=False) as c:
        assert c.gpu and not c._same_process()
        for _ in range(2):  # the second on the first's committed blocks
            assert torch.equal(generate(c), want)
        assert c.stats().num_sequences == 0
        c.check_integrity()
