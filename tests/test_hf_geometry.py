"""Where kvpager.hf's pool geometry comes from, against transformers: released
configs (the wider of the q/k and v head dims, a K/V head per query head under
latent attention), a latent-attention model through a daemon sized from its
config.json, and multimodal models asked for text (their text config, their
language layers), token for token with prefix sharing and cache reuse."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_versions import served_by_this_transformers  # noqa: E402
from test_hf_models import (  # noqa: E402
    ALTERNATING,
    COMMON,
    VARIED,
    WINDOW,
    assert_tokens_vary,
    make_model,
    one_thread,  # noqa: F401 (autouse: these small models run fastest on one thread)
    prompt,
    reference,
)

from kvpager import KVPool  # noqa: E402
from kvpager.hf import PagedGeneration, generate, layer_windows, spec_for_model  # noqa: E402


@pytest.mark.parametrize("model_type,geometry", [
    ("llama", dict(num_kv_heads=32, head_dim=128)),
    # latent attention: q and k 128 + 64, v 128, K/V expanded to all 128 query heads
    ("deepseek_v3", dict(num_kv_heads=128, head_dim=192)),
    ("minicpm3", dict(num_kv_heads=40, head_dim=96)),  # q and k 64 + 32, v 64
    ("glm4_moe_lite", dict(num_kv_heads=20, head_dim=256)),
    # grouped heads, q and k 192, v 128; its sliding layers hold twice its full layers' 4 K/V heads
    # (kvpager.layer_geometry.SLIDING_KV_FACTOR): one pool of 8, the full layers' each stored twice
    ("mimo_v2_flash", dict(num_kv_heads=8, head_dim=192)),
    ("jetmoe", dict(num_kv_heads=32, head_dim=128)),  # 16 K/V heads tiled for 2 experts a token
])
def test_geometry_of_released_configs(model_type, geometry):
    """The pool's KV geometry read from a model type's default config: the wider of the
    q/k and v head dims, and every query head's own K/V under latent attention."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from kvpager.hf.model import model_geometry

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    config = AutoConfig.for_model(model_type)
    got = model_geometry(config)
    assert {k: got[k] for k in geometry} == geometry


def test_latent_attention_through_a_daemon_sized_from_the_config(tmp_path):
    """A daemon sized from a latent-attention model's config.json (`kvpager serve
    --model`'s rule) holds what the worker's padded K/V need, and the worker's tokens
    are transformers'."""
    pytest.importorskip("zmq")
    from daemon_helpers import running_server

    from kvpager.client import Client
    from kvpager.sizing import model_geometry

    model = make_model("deepseek_v3")
    model.config.to_json_file(str(tmp_path / "config.json"))
    geometry = model_geometry(str(tmp_path))
    spec = spec_for_model(model, num_blocks=64, block_size=8)
    assert {k: getattr(spec, k) for k in ("num_layers", "num_kv_heads", "head_dim")} == \
        {k: geometry[k] for k in ("num_layers", "num_kv_heads", "head_dim")} == \
        dict(num_layers=4, num_kv_heads=4, head_dim=32)
    prompts = [prompt(30, seed=14), prompt(17, seed=15)]
    with running_server(spec) as server, Client(server.endpoint) as pool:
        assert generate(model, pool, prompts, 10) == [reference(model, p, 10) for p in prompts]


# Multimodal wrappers, tiny vision towers: text generation runs their language model's layers (drawn
# wide, the head untied, wrapper and text config alike: tied, Gemma-3's and Qwen2.5-VL's tiny models
# repeat one token a prompt, which a wrong window or position would give too)
_TEXT = {k: v for k, v in COMMON.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")} | VARIED
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
               patch_size=14)
WRAPPERS = {
    # windows in the text config's layer types (the wrapper's own config has none)
    "gemma3": lambda: transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        tie_word_embeddings=False,
        text_config=dict(_TEXT, head_dim=16, sliding_window=WINDOW, layer_types=ALTERNATING),
        vision_config=_VISION, mm_tokens_per_image=4)),
    "mistral3": lambda: transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
        tie_word_embeddings=False, text_config=dict(_TEXT, model_type="mistral", sliding_window=WINDOW),
        vision_config=dict(_VISION, head_dim=16))),
    # multimodal rotary positions (three sections), the same for text tokens
    "qwen2_5_vl": lambda: transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        tie_word_embeddings=False,
        text_config=dict(_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(hidden_size=32, intermediate_size=64, depth=1, num_heads=2, out_hidden_size=64))),
    "llava": lambda: transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        tie_word_embeddings=False, text_config=dict(_TEXT, model_type="llama"), vision_config=_VISION)),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_multimodal_wrapper_generates_text_as_its_language_model(wrapper):
    """A multimodal model asked for text (Gemma-3 4B and up, Mistral-3, Qwen2.5-VL,
    LLaVA): geometry and windows from its text config, the bidirectional vision
    tower left alone, transformers' tokens with prefix sharing and cache reuse."""
    from kvpager.hf.model import text_config

    torch.manual_seed(0)
    model = WRAPPERS[wrapper]().eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    assert text_config(model) is not model.config  # a wrapper: the language model's numbers are elsewhere
    windows = {"gemma3": [WINDOW, None] * 2, "mistral3": [WINDOW] * 4}.get(wrapper, [None] * 4)
    assert layer_windows(model) == windows
    pool = KVPool(spec_for_model(model, num_blocks=96, block_size=8))
    assert (pool.spec.num_layers, pool.spec.num_kv_heads) == (4, 2)
    system = prompt(35, seed=21)
    prompts = [system + prompt(5, seed=22), prompt(9, seed=23), system + prompt(13, seed=24)]
    with served_by_this_transformers(model), PagedGeneration(model, pool, prompts, max_new_tokens=10) as gen:
        assert gen.num_cached_tokens == [0, 0, 32]
        while not gen.done:
            gen.step()
        outs = gen.outputs
    want = [reference(model, p, 10) for p in prompts]
    assert_tokens_vary(want, wrapper)
    assert outs == want
    follow = prompts[2] + outs[2] + prompt(4, seed=25)
    assert generate(model, pool, [follow], 6) == [reference(model, follow, 6)]
    pool.check_integrity()
