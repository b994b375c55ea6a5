"""kvpager.hf: a transformers Llama generating with its KV in kvpager
produces exactly the tokens of transformers' own greedy ``generate``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvpager import KVPool, OutOfBlocks  # noqa: E402
from kvpager.hf import (  # noqa: E402
    PagedGeneration,
    default_salt,
    generate,
    spec_for_model,
)

VOCAB = 128


def make_model(seed: int = 0, eos: int | None = None, hidden: int = 64):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=hidden,  # 4 heads: head_dim = hidden / 4
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: two query heads per KV head
        vocab_size=VOCAB,
        max_position_embeddings=512,
        initializer_range=0.1,  # livelier than the default 0.02: fewer repeats
        bos_token_id=1,
        eos_token_id=eos,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def reference(model, tokens: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generation of one prompt (no padding: the mask is given, or
    ``generate`` takes a pad token id among the tokens, a generated one, for padding)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([tokens], device=model.device),
            attention_mask=torch.ones(1, len(tokens), dtype=torch.long, device=model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
    return out[0, len(tokens) :].tolist()


def make_pool(model, num_blocks: int = 128, block_size: int = 8) -> KVPool:
    return KVPool(spec_for_model(model, num_blocks=num_blocks, block_size=block_size))


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("length", [5, 17, 40])
def test_single_prompt_matches_transformers(model, block_size, length):
    pool = make_pool(model, block_size=block_size)
    tokens = prompt(length, seed=length)
    [out] = generate(model, pool, [tokens], max_new_tokens=24)
    assert out == reference(model, tokens, 24)
    assert len(out) == 24  # crosses block boundaries while decoding
    pool.check_integrity()
    assert pool.stats().num_sequences == 0  # freed at the end


def test_batch_of_different_lengths_matches_transformers(model):
    pool = make_pool(model)
    prompts = [prompt(n, seed=100 + n) for n in (5, 17, 40, 8, 1)]
    outs = generate(model, pool, prompts, max_new_tokens=20)
    assert outs == [reference(model, p, 20) for p in prompts]
    assert model.config._attn_implementation != "kvpager"  # restored after the call
    pool.check_integrity()


def test_batch_sharing_a_system_prompt_stores_it_once(model):
    """Prompts of one batch that start alike share the blocks the first of them
    fills in the same forward pass, and still produce transformers' tokens."""
    pool = make_pool(model)
    system = prompt(27, seed=21)  # 3 full blocks of 8 + 3 tokens
    prompts = [system + prompt(n, seed=30 + n) for n in (4, 11, 2)]
    gen = PagedGeneration(model, pool, prompts, max_new_tokens=12)
    assert gen.num_cached_tokens == [0, 24, 24]
    tables = [pool.sequence(s).block_table for s in gen.seq_ids]
    assert tables[0][:3] == tables[1][:3] == tables[2][:3]
    assert pool.stats().shared_blocks == 3
    while not gen.done:
        gen.step()
    assert gen.outputs == [reference(model, p, 12) for p in prompts]
    gen.close()
    pool.check_integrity()


def test_stops_at_eos_like_transformers():
    # pick as EOS a token the model emits early for one prompt, then compare
    tokens = prompt(12, seed=7)
    plain = reference(make_model(seed=3), tokens, 16)
    eos = plain[5]
    m = make_model(seed=3, eos=eos)
    pool = make_pool(m)
    prompts = [tokens, prompt(9, seed=8)]
    outs = generate(m, pool, prompts, max_new_tokens=16)
    assert outs == [reference(m, p, 16) for p in prompts]
    assert outs[0][-1] == eos and len(outs[0]) <= 6
    pool.check_integrity()


@pytest.mark.parametrize("pipeline", [True, False])
def test_two_workers_share_a_prompt_prefix(model, pipeline):
    """Worker A is mid-generation when worker B arrives with the same system prompt:
    B reuses A's committed prefix blocks, computes only its own tail, and both
    produce transformers' tokens, pipelined or not."""
    pool = make_pool(model)
    system = prompt(27, seed=11)  # 3 full blocks of 8 + 3 tokens
    a_prompt, b_prompt = system + prompt(6, seed=12), system + prompt(13, seed=13)
    salt = default_salt(model)
    a = PagedGeneration(model, pool, [a_prompt], max_new_tokens=18, salt=salt, pipeline=pipeline)
    assert a.num_cached_tokens == [0]
    for _ in range(4):
        a.step()
    b = PagedGeneration(model, pool, [b_prompt], max_new_tokens=18, salt=salt, pipeline=pipeline)
    assert b.num_cached_tokens == [24]  # the system prompt's full blocks
    [info_a] = [pool.sequence(s) for s in a.seq_ids]
    assert info_a.shared_blocks == 3
    while not (a.done and b.done):
        a.step()
        b.step()
    assert a.outputs == [reference(model, a_prompt, 18)]
    assert b.outputs == [reference(model, b_prompt, 18)]
    a.close()
    b.close()
    pool.check_integrity()


def test_next_turn_reuses_generated_tokens(model):
    """A follow-up whose prompt is the previous prompt + answer finds the answer's
    blocks too (published as they filled), after the first call freed them."""
    pool = make_pool(model)
    first = prompt(20, seed=21)
    [answer] = generate(model, pool, [first], max_new_tokens=21)
    follow = first + answer + prompt(4, seed=22)
    with PagedGeneration(model, pool, [follow], max_new_tokens=10) as gen:
        # 20 + 21 tokens were generated; all but the last one's K/V is in the pool
        assert gen.num_cached_tokens == [40]
        while not gen.done:
            gen.step()
        assert gen.outputs == [reference(model, follow, 10)]
    pool.check_integrity()


def test_other_weights_do_not_match(model):
    """The default salt keeps different weights apart: no prefix hit across models."""
    other = make_model(seed=1)
    pool = make_pool(model)
    tokens = prompt(30, seed=31)
    generate(model, pool, [tokens], max_new_tokens=2)
    with PagedGeneration(other, pool, [tokens], max_new_tokens=4) as gen:
        assert gen.num_cached_tokens == [0]
        while not gen.done:
            gen.step()
        assert gen.outputs == [reference(other, tokens, 4)]


def test_out_of_blocks_leaves_pool_clean(model):
    pool = make_pool(model, num_blocks=6)  # 5 usable blocks of 8: 40 tokens
    with pytest.raises(OutOfBlocks):
        generate(model, pool, [prompt(30, seed=41)], max_new_tokens=30)
    pool.check_integrity()
    assert pool.stats().num_sequences == 0
    with pytest.raises(OutOfBlocks):
        generate(model, pool, [prompt(50, seed=42)], max_new_tokens=1)
    assert pool.stats().num_sequences == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_tensors_cross_into_the_pool_dtype_exactly(dtype):
    from kvpager.hf.generation import PagedBatch, _to_pool
    from kvpager.plan_numpy import from_numpy, to_numpy
    from kvpager.spec import numpy_dtype

    x = torch.randn(5, 2, 16).to(getattr(torch, dtype))
    arr, from_torch = to_numpy(x, "x", numpy_dtype(dtype))
    assert from_torch and arr.dtype == numpy_dtype(dtype) and arr.shape == (5, 2, 16)
    back = from_numpy(arr)
    assert back.dtype == x.dtype and torch.equal(back, x)
    # a float32 model over a float16 pool: K/V rounded to the pool dtype
    batch = PagedBatch(None, getattr(torch, dtype), torch.device("cpu"))
    assert _to_pool(x.float(), batch).dtype == x.dtype


def test_bfloat16_model_runs_on_a_bfloat16_pool():
    # bf16 rounding differs between the pool's float32-accumulating attention and
    # torch's, so tokens may drift from transformers' after a while: no exact check
    m = make_model().to(torch.bfloat16)
    pool = KVPool(spec_for_model(m, num_blocks=64, block_size=8))
    assert pool.spec.dtype == "bfloat16"
    prompts = [prompt(n, seed=n) for n in (5, 17, 40)]
    outs = generate(m, pool, prompts, max_new_tokens=12)
    assert [len(o) for o in outs] == [12, 12, 12]
    assert outs == generate(m, pool, prompts, max_new_tokens=12)  # deterministic, cache hits
    assert [o[0] for o in outs] == [reference(m, p, 1)[0] for p in prompts]
    pool.check_integrity()


def test_geometry_mismatch_is_refused(model):
    pool = KVPool(spec_for_model(make_model(), num_blocks=16).replace(num_kv_heads=4))
    with pytest.raises(ValueError, match="geometry"):
        generate(model, pool, [prompt(4, seed=1)], max_new_tokens=2)


def test_sliding_layers_without_a_window_are_refused():
    # windowed layers are honoured (tests/test_hf_models.py); a window of no size is refused
    m = make_model()
    m.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="sliding_window is not set"):
        generate(m, make_pool(m), [prompt(4, seed=1)], max_new_tokens=2)


def test_plain_forward_without_kvpager_state_is_refused(model):
    from kvpager.hf.generation import paged_attention

    with paged_attention(model), pytest.raises(RuntimeError, match="kvpager"):
        model(torch.tensor([[1, 2, 3]]), use_cache=False)
    assert model.config._attn_implementation != "kvpager"


@pytest.mark.gpu
def test_cuda_model_on_a_gpu_pool_matches_transformers():
    """K/V stays on the GPU: torch tensors go into the CuPy pool through DLPack.
    (head_dim 64: the smallest the CUDA kernels are built for.)"""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("cupy")
    model = make_model(hidden=256).cuda()
    pool = KVPool(spec_for_model(model, num_blocks=128, block_size=8), device="cuda:0")
    prompts = [prompt(n, seed=200 + n) for n in (5, 17, 40)]
    outs = generate(model, pool, prompts, max_new_tokens=20)
    assert outs == [reference(model, p, 20) for p in prompts]
    follow = prompts[1] + outs[1] + prompt(3, seed=9)
    with PagedGeneration(model, pool, [follow], max_new_tokens=8) as gen:
        assert gen.num_cached_tokens == [32]
        while not gen.done:
            gen.step()
        assert gen.outputs == [reference(model, follow, 8)]
    pool.check_integrity()
    # bfloat16 end to end: runs, and the prefill's token agrees with transformers
    m16 = make_model(hidden=256).to("cuda", torch.bfloat16)
    pool16 = KVPool(spec_for_model(m16, num_blocks=128, block_size=8), device="cuda:0")
    outs16 = generate(m16, pool16, prompts, max_new_tokens=8)
    assert [len(o) for o in outs16] == [8, 8, 8]
    assert [o[0] for o in outs16] == [reference(m16, p, 1)[0] for p in prompts]
    pool16.check_integrity()


# -- two worker processes through the daemon ------------------------------------------
WAIT = 120  # seconds: spawning a worker that imports torch is slow on a busy 2-core machine
SYSTEM = prompt(27, seed=11)  # 3 full blocks of 8 + 3 tokens
A_PROMPT, B_PROMPT = SYSTEM + prompt(6, seed=12), SYSTEM + prompt(13, seed=13)


def _worker(endpoint: str, tokens: list[int], out, go) -> None:
    """A model worker process: same seed, so the same weights and the same default
    salt as the other worker. Reports its prefix hit, pauses after a few steps
    until ``go`` is set, then reports its tokens and the reference."""
    from kvpager.client import Client

    model = make_model()
    with Client(endpoint) as pool:
        with PagedGeneration(model, pool, [tokens], max_new_tokens=18) as gen:
            for _ in range(3):
                gen.step()
            out.put({"cached": gen.num_cached_tokens[0], "seq_id": gen.seq_ids[0]})
            if not go.wait(WAIT):
                raise TimeoutError("never told to go on")
            while not gen.done:
                gen.step()
        out.put({"outputs": gen.outputs[0], "reference": reference(model, tokens, 18)})


@pytest.mark.slow
def test_two_processes_share_a_prompt_prefix_through_the_daemon():
    import multiprocessing as mp

    pytest.importorskip("zmq")
    from daemon_helpers import join_or_kill, running_server

    from kvpager.client import Client

    ctx = mp.get_context("spawn")
    spec = spec_for_model(make_model(), num_blocks=128, block_size=8)
    with running_server(spec, heartbeat_timeout=60) as server:
        out_a, out_b, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        a = ctx.Process(target=_worker, args=(server.endpoint, A_PROMPT, out_a, go))
        b = ctx.Process(target=_worker, args=(server.endpoint, B_PROMPT, out_b, go))
        try:
            a.start()
            first_a = out_a.get(timeout=WAIT)  # A is mid-generation, its prompt committed
            b.start()
            first_b = out_b.get(timeout=WAIT)  # both alive and paused
            with Client(server.endpoint) as obs:
                shared = obs.sequence(first_a["seq_id"]).shared_blocks
            go.set()
            done_a, done_b = out_a.get(timeout=WAIT), out_b.get(timeout=WAIT)
        finally:
            go.set()
            join_or_kill((a, b), WAIT)
        assert a.exitcode == 0 and b.exitcode == 0
        assert first_a["cached"] == 0
        assert first_b["cached"] == 24  # B computed only its tail
        assert shared == 3  # A's three system-prompt blocks are B's too
        assert done_a["outputs"] == done_a["reference"]
        assert done_b["outputs"] == done_b["reference"]
        with Client(server.endpoint) as obs:
            assert obs.stats().num_sequences == 0
            obs.check_integrity()


def test_threads_in_one_model_keep_it_switched_until_the_last_leaves(model):
    """The switch to kvpager attention lives in the model's shared config: a
    thread that leaves `paged_attention` while another is inside must not
    switch the model back under it (the other's forward would then run another
    attention). The last to leave restores what the model had."""
    import threading

    from kvpager.hf import paged_attention

    before = model.config._attn_implementation
    assert before != "kvpager"
    inside, first_left = threading.Event(), threading.Event()
    seen: list[str] = []

    def second():
        with paged_attention(model):
            inside.set()
            assert first_left.wait(30)
            seen.append(model.config._attn_implementation)  # after the first thread left

    t = threading.Thread(target=second)
    with paged_attention(model):
        t.start()
        assert inside.wait(30)
    first_left.set()
    t.join(30)
    assert not t.is_alive()
    assert seen == ["kvpager"]
    assert model.config._attn_implementation == before
