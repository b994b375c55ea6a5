"""Sizing a pool for a model with recurrent layers from its config.json (`kvpager
serve --model`: `kvpager.sizing.config_geometry`): the layers that attend alone,
each family's config as transformers saves it and hub-style configs in their own
names, against the pool its model needs (`spec_for_model`) and transformers' own
config classes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.cache_utils", reason="needs transformers' cache layers")

from test_hf_recurrent import FAMILIES, make  # noqa: E402

from kvpager import InvalidArgument  # noqa: E402
from kvpager.hf import spec_for_model  # noqa: E402
from kvpager.sizing import config_geometry  # noqa: E402


def test_a_config_json_sizes_the_attention_layers_alone():
    """`kvpager serve --model`'s sizing of a config.json counts the layers that attend
    (as the worker's model does), and refuses a config without any."""
    config = dict(num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                  hidden_size=512, layer_types=["linear_attention", "linear_attention", "full_attention"] * 2,
                  torch_dtype="bfloat16")
    assert config_geometry(config) == dict(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16")
    model = make("qwen3_5")
    assert spec_for_model(model, num_blocks=8).num_layers == 1
    with pytest.raises(InvalidArgument, match="no layer attends"):
        config_geometry({**config, "layer_types": ["linear_attention"] * 6})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_familys_config_json_sizes_the_pool_its_model_needs(family):
    """`kvpager serve --model`'s sizing of each family's config.json (as transformers
    saves it) is the pool its model needs (`spec_for_model`). Jamba, Bamba and the
    Zambas had been sized for every layer, Zamba2 at half its head dim, and
    Nemotron-H refused (its config counts its layers by their types alone)."""
    import json

    model = make(family)
    spec = spec_for_model(model, num_blocks=8)
    got = config_geometry(json.loads(model.config.to_json_string()))
    assert (got["num_layers"], got["num_kv_heads"], got["head_dim"]) == (spec.num_layers, spec.num_kv_heads,
                                                                          spec.head_dim)


SMALL_ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64)


@pytest.mark.parametrize("config", [
    dict(model_type="nemotron_h", hybrid_override_pattern="M-M*-ME*", head_dim=16),
    dict(model_type="granitemoehybrid", num_hidden_layers=4, layer_types=["mamba", "mamba", "attention", "mamba"]),
    dict(model_type="zamba2", num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"]),
    dict(model_type="zamba", num_hidden_layers=9, attn_layer_period=3, attn_layer_offset=1),
    dict(model_type="zamba", num_hidden_layers=12),
    dict(model_type="jamba", num_hidden_layers=8, attn_layer_period=4, attn_layer_offset=1),
    dict(model_type="jamba", num_hidden_layers=16),
    dict(model_type="bamba", num_hidden_layers=6, attn_layer_indices=[2, 5]),
    dict(model_type="lfm2", num_hidden_layers=6, full_attn_idxs=[1, 4]),
    # RecurrentGemma's cycle of blocks, repeated over its layers
    dict(model_type="recurrent_gemma", num_hidden_layers=26, block_types=["recurrent", "recurrent", "attention"]),
    dict(model_type="recurrent_gemma", num_hidden_layers=7, block_types=["attention", "recurrent"]),
    dict(model_type="recurrent_gemma", num_hidden_layers=5),
], ids=lambda c: f"{c['model_type']}-{'-'.join(k for k in c if k not in ('model_type', 'num_hidden_layers'))}")
def test_a_hub_config_json_in_its_own_names_sizes_as_transformers_reads_it(config):
    """config.json files as checkpoints carry them, in the names their families use
    (a pattern string, older kind names, a period and offset, attention indices,
    a head dim for twice the hidden size): sized as transformers' own config class
    resolves them (`kvpager.hf.model.model_geometry` of the config it loads)."""
    from kvpager.hf.model import model_geometry

    raw = {**SMALL_ATTENTION, **config}
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    want = model_geometry(transformers.AutoConfig.for_model(raw["model_type"], **fields))
    got = config_geometry(raw)
    assert (got["num_layers"], got["num_kv_heads"], got["head_dim"]) == (want["num_layers"], want["num_kv_heads"],
                                                                          want["head_dim"])
    assert got["num_layers"] < transformers.AutoConfig.for_model(raw["model_type"], **fields).num_hidden_layers
