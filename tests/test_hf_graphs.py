"""kvpager.hf.graphs: a decode step captured in CUDA graphs gives the tokens
of the eager step and of transformers' own generate (float32), as sequences
finish and the batch moves between buckets, and when tables outgrow a graph.
Skips without a GPU, CuPy, torch or transformers."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("cupy")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_hf_client import make_model, prompt, reference  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import PagedGeneration, generate, spec_for_model  # noqa: E402
from kvpager.hf.graphs import DecodeGraphs, bucket_for  # noqa: E402

pytestmark = pytest.mark.gpu


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 32, 33, 64, 65, 256)] == [
        1, 2, 4, 8, 8, 16, 32, 64, 64, 96, 256]


def test_graph_steps_give_the_eager_tokens_as_the_batch_shrinks():
    model = make_model(hidden=256).cuda()  # float32, head_dim 64
    prompts = [prompt(n, seed=300 + n) for n in (5, 17, 40, 9, 33)]

    def pool():
        return KVPool(spec_for_model(model, num_blocks=256, block_size=8), device="cuda:0")

    eager = generate(model, pool(), prompts, max_new_tokens=24, eos_token_id=None)
    assert eager == [reference(model, p, 24) for p in prompts]
    # an end token some sequences produce early: the batch shrinks across buckets
    eos = eager[2][6]
    eager_eos = generate(model, pool(), prompts, max_new_tokens=24, eos_token_id=eos)
    assert len({len(o) for o in eager_eos}) > 1
    p = pool()
    assert generate(model, p, prompts, max_new_tokens=24, eos_token_id=eos, cuda_graphs=True) == eager_eos
    p.check_integrity()
    assert p.stats().num_sequences == 0
    # by default the bucket of 8 replays as the batch shrinks (one capture); every bucket its own
    # (reuse off) captures again as it shrinks: the same tokens both ways
    for reuse, reuse_rows in ((DecodeGraphs.reuse, DecodeGraphs.reuse_rows), (1, 0)):
        with PagedGeneration(model, p, prompts, max_new_tokens=24, eos_token_id=eos, cuda_graphs=True) as gen:
            gen._graphs.reuse, gen._graphs.reuse_rows = reuse, reuse_rows
            while not gen.done:
                gen.step()
            assert gen.outputs == eager_eos
            buckets = sorted(gen._graphs.graphs)  # (5 sequences: the bucket of 8, then fewer)
            assert buckets == [8] if reuse > 1 else (8 in buckets and len(buckets) >= 2)
    p.check_integrity()
    assert p.stats().num_sequences == 0


def test_tables_that_outgrow_a_graph_recapture_it():
    model = make_model(hidden=256).cuda()
    prompts = [prompt(n, seed=400 + n) for n in (3, 12)]
    p = KVPool(spec_for_model(model, num_blocks=64, block_size=8), device="cuda:0")
    with PagedGeneration(model, p, prompts, max_new_tokens=30, eos_token_id=None, cuda_graphs=True) as gen:
        gen._graphs.width = 2  # narrower than the 2nd prompt's tables after a few steps
        while not gen.done:
            gen.step()
        assert gen._graphs.captures >= 2 and gen._graphs.width >= 6
        assert gen.outputs == [reference(model, q, 30) for q in prompts]


def test_graphs_need_a_gpu_model_and_pool():
    model = make_model(hidden=256)  # on the CPU
    p = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    with pytest.raises(ValueError, match="cuda_graphs"):
        generate(model, p, [prompt(5, seed=1)], max_new_tokens=2, cuda_graphs=True)


def test_a_forward_that_syncs_during_capture_gets_a_typed_error_and_leaves_the_pool_whole():
    """A model whose forward reads a device value on the host (as some mixture-of-experts
    fallbacks do) runs eagerly but cannot be captured: UnsupportedConfiguration that says
    to pass cuda_graphs=False, every sequence freed, and the pool and GPU still serve."""
    from kvpager.errors import UnsupportedConfiguration

    model = make_model(hidden=256).cuda()
    prompts = [prompt(n, seed=600 + n) for n in (4, 11)]
    p = KVPool(spec_for_model(model, num_blocks=128, block_size=8), device="cuda:0")
    def read_back(module, args, out):  # a host read of a device value: fine eagerly, refused in a capture
        (out[0] if isinstance(out, tuple) else out).sum().tolist()

    hook = model.model.layers[0].register_forward_hook(read_back)
    try:
        with pytest.raises(UnsupportedConfiguration, match="cuda_graphs=False"):
            generate(model, p, prompts, max_new_tokens=4, cuda_graphs=True)
        p.check_integrity()
        assert p.stats().num_sequences == 0
        assert generate(model, p, prompts, max_new_tokens=4) == [reference(model, q, 4) for q in prompts]
    finally:
        hook.remove()


def test_a_failed_capture_leaves_nothing_for_a_later_capture_to_collect():
    """A failed capture's graph and the forward's tensors, kept in reference cycles by the
    error's traceback, are released before the error reaches the caller: collected later,
    during another capture, they invalidated it (an UnsupportedConfiguration for a model
    that captures, or an abort)."""
    import gc

    from kvpager.errors import UnsupportedConfiguration

    model = make_model(hidden=256).cuda()
    prompts = [prompt(n, seed=620 + n) for n in (5, 12)]

    def graphs_alive():
        return sum(isinstance(o, torch.cuda.CUDAGraph) for o in gc.get_objects())

    def read_back(module, args, out):
        (out[0] if isinstance(out, tuple) else out).sum().tolist()

    def collect(module, args, out):  # what the interpreter may do at any allocation
        if torch.cuda.is_current_stream_capturing():
            gc.collect()

    gc.collect()
    gc.disable()  # only what reference counts free goes before the check
    try:
        before = graphs_alive()
        hook = model.model.layers[0].register_forward_hook(read_back)
        p = KVPool(spec_for_model(model, num_blocks=128, block_size=8), device="cuda:0")
        with pytest.raises(UnsupportedConfiguration) as failed:
            generate(model, p, prompts, max_new_tokens=4, cuda_graphs=True)
        hook.remove()
        assert graphs_alive() == before
        hook = model.model.layers[1].register_forward_hook(collect)
        try:
            assert generate(model, p, prompts, max_new_tokens=6, cuda_graphs=True) == [
                reference(model, q, 6) for q in prompts]
        finally:
            hook.remove()
        assert failed.value.__cause__ is not None  # the error still names its cause
    finally:
        gc.enable()


def test_eager_decode_steps_refill_one_plan_while_the_batch_keeps_its_sequences():
    model = make_model(hidden=256).cuda()
    system = prompt(40, seed=500)  # a shared prefix: the plans cascade over it
    prompts = [system + prompt(n, seed=510 + n) for n in (3, 9, 20, 6)]
    eager = [reference(model, p, 12) for p in prompts]
    eos = eager[1][4]  # one sequence ends early: the batch shrinks once

    def run(reuse: bool):
        pool = KVPool(spec_for_model(model, num_blocks=256, block_size=8), device="cuda:0")
        plans = []
        with PagedGeneration(model, pool, prompts, max_new_tokens=12, eos_token_id=eos, cascade=True) as gen:
            gen._plans.refills = reuse
            while not gen.done:
                gen.step()
                if reuse and gen._plans._kept is not None:  # (`DecodePlans`: the decode plan it keeps)
                    plans.append(gen._plans._kept[0])
            out = gen.outputs
        pool.check_integrity()
        return out, plans

    got, plans = run(True)
    want = [e[: e.index(eos) + 1] if eos in e else e for e in eager]
    assert got == want == run(False)[0]
    # a plan per batch: refilled while the batch keeps its sequences, a new one when it shrinks
    finished_at = {len(o) for o in got if len(o) < 12}
    assert len({id(p) for p in plans}) == 1 + len(finished_at) < len(plans)


def test_compiled_graph_steps_give_the_eager_tokens_as_the_batch_shrinks():
    pytest.importorskip("triton")  # torch.compile's inductor backend
    model = make_model(hidden=256).cuda()
    prompts = [prompt(n, seed=600 + n) for n in (4, 19, 35, 8, 27)]

    def pool():
        return KVPool(spec_for_model(model, num_blocks=256, block_size=8), device="cuda:0")

    eager = generate(model, pool(), prompts, max_new_tokens=16, eos_token_id=None)
    eos = eager[1][5]  # some sequences end early: the captures span two buckets
    eager_eos = generate(model, pool(), prompts, max_new_tokens=16, eos_token_id=eos)
    assert len({len(o) for o in eager_eos}) > 1
    p = pool()
    with PagedGeneration(model, p, prompts, max_new_tokens=16, eos_token_id=eos, cuda_graphs=True,
                         compile=True) as gen:
        gen._graphs.reuse, gen._graphs.reuse_rows = 1, 0  # every bucket its own: captured as the batch shrinks
        while not gen.done:
            gen.step()
        assert gen._graphs.captures >= 2
        assert gen.outputs == eager_eos
    p.check_integrity()
    assert p.stats().num_sequences == 0
