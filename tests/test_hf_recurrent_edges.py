"""Models with recurrent layers (`kvpager.hf.recurrent`) at their edges: served
through a daemon's `Client`; a packed row refused, one whole prompt taken as one;
the multimodal Qwen3.5 asked for text; FP8 scales calibrated a prompt at a time;
an error in a recurrent layer not called unserved; layers keeping their states in
their modules refused; Zamba2 never reading what its decode steps wrote. Tiny
random models in float32 on the CPU backend (`test_hf_recurrent`'s)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.cache_utils", reason="needs transformers' cache layers")
if not hasattr(__import__("transformers.cache_utils").cache_utils, "LinearAttentionCacheLayerMixin"):
    pytest.skip("transformers without linear-attention cache layers", allow_module_level=True)

from test_hf_recurrent import (  # noqa: E402
    LINEAR,
    SMALL,
    THREE_ONE,
    assert_nothing_held,
    drawn,
    ending_early,
    make,
    prompts,
    reference,
)

from kvpager import KVPool  # noqa: E402
from kvpager.errors import InvalidArgument, UnsupportedModel  # noqa: E402
from kvpager.hf import generate, spec_for_model  # noqa: E402
from kvpager.hf.recurrent import has_recurrent_layers  # noqa: E402


def test_through_a_daemon_client():
    """A daemon `Client` as the pool: transformers' tokens, pipelined, nothing
    left held in the daemon."""
    pytest.importorskip("zmq")
    from daemon_helpers import running_server

    from kvpager.client import Client
    from kvpager.hf import PagedGeneration

    model = make("qwen3_next")
    ps = prompts(11, 30, 2, seed=3)
    with torch.inference_mode():
        want = reference(model, ps, 4)
    spec = spec_for_model(model, num_blocks=64, block_size=8)
    with running_server(spec, heartbeat_timeout=60) as server, Client(server.endpoint) as c:
        with PagedGeneration(model, c, ps, 4, eos_token_id=None) as gen:
            assert gen._pipelined
            while not gen.done:
                gen.step()
            assert gen.outputs == want
        assert_nothing_held(c)


def test_a_packed_row_is_refused():
    """`paged_forward` (one packed row of every sequence's tokens) would run the
    sequences through the recurrent layers as one, without their states: refused by
    name; rows whose K/V are not as many rows of as many tokens as the queries' are
    refused at the attention function."""
    from kvpager.hf import PagedBatch, paged_attention, paged_forward
    from kvpager.hf.attention import kvpager_attention

    model = make("bamba")
    pool = KVPool(spec_for_model(model, num_blocks=16, block_size=8))
    a, b = pool.allocate(prompts(4, 5), "packed")
    slots = torch.cat([torch.as_tensor(a.slots), torch.as_tensor(b.slots)]).numpy()
    batch = PagedBatch(pool.plan([a.seq_id, b.seq_id], [4, 5], slots), torch.float32, torch.device("cpu"))
    ids = torch.tensor([prompts(4, 5)[0] + prompts(4, 5)[1]])
    with paged_attention(model), torch.inference_mode(), pytest.raises(UnsupportedModel, match="recurrent layers"):
        paged_forward(model, batch, ids, torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]]))
    q = torch.zeros(2, 4, 3, 16)
    for k in (q[:1, :2], q[:, :2, :2]):
        with pytest.raises(InvalidArgument, match="as many new tokens each"):
            kvpager_attention(model.model.layers[3].self_attn, q, k, k, None, kvpager=batch)
    pool.free([a.seq_id, b.seq_id])


def test_the_multimodal_qwen3_5_asked_for_text():
    """Qwen3.5 as its checkpoints load it (`Qwen3_5ForConditionalGeneration`, a tiny
    vision tower that never runs): the text config's layers and the wrapper's forward
    (its cache argument, its rope over text positions) give transformers' tokens."""
    text = dict(SMALL, num_hidden_layers=4, layer_types=THREE_ONE, **LINEAR)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  num_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForConditionalGeneration(
        transformers.Qwen3_5Config(text_config=text, vision_config=vision)).eval()
    ps = prompts(9, 7, 21)
    with torch.inference_mode():
        want = reference(model, ps, 5)
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    assert pool.spec.num_layers == 1
    assert generate(model, pool, ps, max_new_tokens=5, eos_token_id=None) == want


def test_fp8_scales_are_calibrated_a_prompt_at_a_time():
    """`calibrate_kv_scales` runs each prompt through its own pass (a packed row would
    run them through the recurrent layers as one sequence): the scales of two prompts
    are the larger of each prompt's own, head by head, and an FP8 pool of the model
    with them generates."""
    from kvpager.hf import calibrate_kv_scales

    model = make("jamba")
    one, two = prompts(12, 23, seed=5)
    a, b = calibrate_kv_scales(model, [one]), calibrate_kv_scales(model, [two])
    both = calibrate_kv_scales(model, [one, two])
    assert both == [[[max(x, y) for x, y in zip(ha, hb)] for ha, hb in zip(la, lb)] for la, lb in zip(a, b)]
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8, dtype=torch.bfloat16, kv_dtype="float8_e4m3",
                                 kv_scales=both))
    out = generate(model, pool, [one, two], max_new_tokens=3, eos_token_id=None)
    assert [len(o) for o in out] == [3, 3] and pool.stats().num_sequences == 0


def test_one_whole_prompt_may_pass_as_a_packed_row():
    """A packed row of one whole prompt (every token of its sequence new) is what a
    fresh prefill is: `paged_forward` takes it, and its next token is transformers'."""
    from kvpager.hf import PagedBatch, layer_map, paged_attention, paged_forward

    model = make("qwen3_5")
    [p] = prompts(13, seed=9)
    with torch.inference_mode():
        [want] = reference(model, [p], 1)
    pool = KVPool(spec_for_model(model, num_blocks=16, block_size=8))
    [a] = pool.allocate([p], "one")
    batch = PagedBatch(pool.plan([a.seq_id], [len(p)], a.slots), torch.float32, torch.device("cpu"),
                       layers=layer_map(model))
    with paged_attention(model), torch.inference_mode():
        out = paged_forward(model, batch, torch.tensor([p]), torch.arange(len(p))[None], 1)
    assert out.tolist() == want
    pool.free([a.seq_id])


def test_an_error_in_a_recurrent_layer_is_not_called_unserved():
    """Qwen3.5's first layers are recurrent: an error there came before any
    attention layer reached kvpager, and was reported as a model whose attention
    kvpager cannot serve. It now surfaces as itself."""
    model = make("qwen3_5")
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8))
    layer = model.model.layers[0].linear_attn

    def fail(*args, **kwargs):
        raise RuntimeError("a fault in the recurrent layer")

    layer.forward = fail
    try:
        with pytest.raises(RuntimeError, match="a fault in the recurrent layer"):
            generate(model, pool, prompts(9), max_new_tokens=2, eos_token_id=None)
    finally:
        del layer.forward
    assert pool.stats().num_sequences == 0


def test_recurrent_layers_that_keep_their_states_in_their_modules_are_refused(monkeypatch):
    """RecurrentGemma's recurrent blocks keep their states in their own modules, not in
    transformers' cache, where kvpager gathers a batch's rows as sequences end and
    holds them for later prompts: it generated other tokens than transformers' (here
    with sequences ending early), without an error. Refused at the first pass by what
    its cache holds, nothing left held; its config still sizes a pool (its local
    attention blocks alone), as `kvpager serve --model` reads it."""
    import json
    import warnings

    from kvpager.hf import continuing
    from kvpager.sizing import config_geometry

    config = transformers.RecurrentGemmaConfig(**SMALL, num_hidden_layers=3, attention_window_size=16, lru_width=64,
                                               w_init_variance_scale=1.0)  # (tokens of a random model that vary)
    torch.manual_seed(0)
    model = transformers.RecurrentGemmaForCausalLM(config).eval()
    assert has_recurrent_layers(model)
    ps = prompts(6, 17, 2, 9, seed=13)
    eos, _ = ending_early(model, ps, 6, [(1, 1), (3, 3)])
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    assert pool.spec.num_layers == 1 == config_geometry(json.loads(config.to_json_string()))["num_layers"]
    with warnings.catch_warnings():
        # (refused, not first warned about as a type whose tokens are right: the warning said so before)
        warnings.simplefilter("error")
        monkeypatch.setattr(continuing, "_warned", set())
        with pytest.raises(UnsupportedModel, match="keep their states outside transformers' cache"):
            generate(model, pool, ps, max_new_tokens=6, eos_token_id=eos)
    assert_nothing_held(pool)


def test_zamba2_never_reads_what_its_decode_steps_wrote():
    """Zamba2's Mamba-2 step (a decode step) leaves other states, so other K/V in its
    attention layers, than its chunked scan over the same tokens. A conversation's
    next turn read the blocks the first turn's decode steps filled (and resumed from
    their states): its log-probabilities 0.008-0.03 off a plain forward pass, its
    tokens transformers' in only 8 of 12 seeds. Its calls now match only their own
    blocks and run its prompts whole."""
    from kvpager.hf import score

    model = drawn(make("zamba2"))
    for seed in (0, 1):
        [p] = prompts(13, seed=200 + seed)
        pool = KVPool(spec_for_model(model, num_blocks=128, block_size=8))
        [answer] = generate(model, pool, [p], max_new_tokens=7, eos_token_id=None)
        turn = p + answer + prompts(6, seed=300 + seed)[0]
        with torch.inference_mode():
            [want] = reference(model, [turn], 6)
            logits = model(torch.tensor([turn])).logits[0].double().log_softmax(-1)
        assert generate(model, pool, [turn], max_new_tokens=6, eos_token_id=None) == [want]
        got = score(model, pool, [turn], start=14)[0]
        plain = [logits[i - 1, turn[i]].item() for i in range(14, len(turn))]
        assert max(abs(a - b) for a, b in zip(got, plain)) < 5e-4
        assert_nothing_held(pool)
