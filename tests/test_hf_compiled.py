"""kvpager.hf.compiled: a forward pass compiled by torch.compile around the
``kvpager::write_attend`` op gives the eager pass's tokens and pool, traced
without a graph break (windows and soft caps included); the op refuses to run
without a current batch. CPU, NumPy backend, ``aot_eager`` (the GPU test with
inductor and CUDA graphs is in test_hf_graphs.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_versions import OLD_TRANSFORMERS, served_by_this_transformers  # noqa: E402
from test_hf_models import (  # noqa: E402, F401
    make_model,
    one_thread,
    prompt,
)

from kvpager import KVPool  # noqa: E402
from kvpager.hf import (  # noqa: E402
    PagedBatch,
    PagedGeneration,
    generate,
    layer_map,
    layer_windows,
    paged_attention,
    paged_forward,
)
from kvpager.hf.compiled import compiled_forward, running, write_attend  # noqa: E402
from kvpager.hf.model import spec_for_model  # noqa: E402


def two_passes(model, forward) -> tuple[list[list[int]], bytes]:
    """A packed prefill of three prompts, then one decode step of all three, through
    ``forward``: each pass's tokens, and the pool's K/V bytes after both."""
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    prompts = [prompt(n, seed=40 + n) for n in (5, 13, 21)]
    allocs = pool.allocate(prompts, "compiled")
    ids = [a.seq_id for a in allocs]
    windows, layers = layer_windows(model), layer_map(model)
    heads = model.config.num_attention_heads
    with torch.inference_mode(), paged_attention(model):
        lens = [len(p) for p in prompts]
        slots = np.concatenate([np.asarray(a.slots, dtype=np.int64) for a in allocs])
        batch = PagedBatch(pool.plan(ids, lens, slots, num_q_heads=heads), torch.float32, torch.device("cpu"),
                           windows, layers=layers)
        flat = torch.tensor([[t for p in prompts for t in p]])
        pos = torch.tensor([[i for n in lens for i in range(n)]])
        ends = torch.as_tensor(np.cumsum(lens) - 1)
        first = forward(model, batch, flat, pos, ends).tolist()
        pool.commit(ids)
        slots = np.asarray(pool.append_flat(ids, 1, [[t] for t in first]), dtype=np.int64)
        batch = PagedBatch(pool.plan(ids, [1] * 3, slots, num_q_heads=heads), torch.float32, torch.device("cpu"),
                           windows, layers=layers)
        second = forward(model, batch, torch.tensor([first]), torch.tensor([lens])).tolist()
    return [first, second], pool.backend.kv.tobytes()


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2-sliding", "stablelm", "gpt_oss", "deepseek_v3",
                                    "deepseek_v3-wide-v", "gemma3n", "llama4"])
def test_compiled_pass_gives_the_eager_tokens_and_kv(family):
    torch._dynamo.reset()  # each family compiles afresh: the families together pass dynamo's recompile limit
    if OLD_TRANSFORMERS and family.startswith("deepseek_v3"):
        pytest.skip("transformers 4.x's DeepSeek-V3 experts loop on data-dependent sizes: no full graph")
    model = make_model(family)
    with served_by_this_transformers(model):
        eager = two_passes(model, paged_forward)

    def compiled(*args):
        return compiled_forward(*args, backend="aot_eager", fullgraph=True)  # a graph break would raise

    assert two_passes(model, compiled) == eager


def test_the_op_needs_a_current_batch():
    q = torch.zeros((1, 4, 1, 16))
    k = torch.zeros((1, 2, 1, 16))
    with pytest.raises(RuntimeError, match="running"):
        write_attend(q, k, k, 0, None, None, None)
    with running("outer"), running(None):  # nested blocks restore the outer batch
        pass


def test_compile_needs_cuda_graphs_torch_2_4_and_triton(monkeypatch):
    import importlib.util

    import kvpager.hf.compiled

    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=16, block_size=8))
    with pytest.raises(ValueError, match="cuda_graphs"):
        PagedGeneration(model, pool, [prompt(5, seed=1)], max_new_tokens=2, compile=True)
    monkeypatch.setattr(kvpager.hf.compiled, "HAS_OP", False)  # as on torch < 2.4
    with pytest.raises(ValueError, match="torch >= 2.4"):
        PagedGeneration(model, pool, [prompt(5, seed=1)], max_new_tokens=2, cuda_graphs=True, compile=True)
    monkeypatch.undo()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    with pytest.raises(ValueError, match="triton"):
        PagedGeneration(model, pool, [prompt(5, seed=1)], max_new_tokens=2, cuda_graphs=True, compile=True)
    assert pool.stats().num_sequences == 0  # refused before anything was allocated


def test_a_model_its_user_compiled_generates_the_same_tokens():
    """``torch.compile(model)`` by the user, then kvpager's eager generation: the
    attention layers inside the compiled model call the op, which finds the
    step's batch (`paged_forward` makes it current)."""
    model = make_model("gemma2")
    prompts = [prompt(n, seed=70 + n) for n in (4, 11, 19)]

    def pool():
        return KVPool(spec_for_model(model, num_blocks=64, block_size=8))

    want = generate(model, pool(), prompts, max_new_tokens=5)
    p = pool()
    assert generate(torch.compile(model, backend="aot_eager"), p, prompts, max_new_tokens=5) == want
    p.check_integrity()
    assert p.stats().num_sequences == 0


def test_threads_each_reach_their_own_batch():
    """Two threads generating at once with one user-compiled model, each on its
    own pool: the op finds each thread's current batch (`running` is per thread)."""
    import threading

    model = make_model("llama")
    compiled = torch.compile(model, backend="aot_eager")
    jobs = [[prompt(n, seed=90 + n) for n in (3, 14)], [prompt(n, seed=95 + n) for n in (9, 6, 17)]]

    def pool():
        return KVPool(spec_for_model(model, num_blocks=64, block_size=8))

    want = [generate(model, pool(), ps, max_new_tokens=6) for ps in jobs]
    got: list = [None, None]
    errors: list = []

    def run(k):
        try:
            for _ in range(3):  # several passes each, interleaved with the other thread's
                got[k] = generate(compiled, pool(), jobs[k], max_new_tokens=6)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)  # (compiling in two threads: minutes on a loaded 2-core host)
    assert not errors and not any(t.is_alive() for t in threads)
    assert got == want
