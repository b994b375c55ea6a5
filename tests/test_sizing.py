"""Sizing like serving engines: geometry from a model's config.json, --memory
as a fraction of free memory; `kvpager serve` with both."""

from __future__ import annotations

import json
import os

import pytest
from daemon_helpers import daemon_process, ipc_endpoint

from kvpager import sizing
from kvpager.client import Client
from kvpager.errors import InvalidArgument, UnsupportedConfiguration
from kvpager.serve_options import build_spec
from kvpager.spec import PoolSpec

LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
         "num_hidden_layers": 32, "num_key_value_heads": 8, "torch_dtype": "bfloat16"}


GEMMA4 = {"model_type": "gemma4", "torch_dtype": "bfloat16",
          "text_config": {"model_type": "gemma4_text", "hidden_size": 5376, "num_attention_heads": 32,
                          "num_hidden_layers": 60, "num_key_value_heads": 16, "head_dim": 256,
                          "global_head_dim": 512, "num_global_key_value_heads": 4, "attention_k_eq_v": True,
                          "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 10}}


FALCON = {"model_type": "falcon", "hidden_size": 4544, "num_attention_heads": 71, "num_hidden_layers": 32,
          "multi_query": True, "new_decoder_architecture": False, "alibi": False, "parallel_attn": True,
          "torch_dtype": "bfloat16"}


def write(tmp_path, config, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def opts(**kw):
    base = dict(model=None, layers=None, kv_heads=None, head_dim=None, dtype=None, block_size=None,
                blocks=None, memory=None, host_blocks=None, host_memory=None)
    return {**base, **kw}


@pytest.mark.parametrize("config, want", [
    (LLAMA, dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")),
    # head_dim given (Gemma: not hidden/heads); transformers 5 writes "dtype"
    ({"hidden_size": 2304, "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4,
      "head_dim": 256, "dtype": "float32"}, dict(num_layers=26, num_kv_heads=4, head_dim=256, dtype="float32")),
    # multi-head attention: no num_key_value_heads; no dtype named
    ({"hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12},
     dict(num_layers=12, num_kv_heads=12, head_dim=64)),
    # a multimodal config: the language model's numbers in text_config, the dtype outside
    ({"model_type": "gemma3", "torch_dtype": "float16",
      "text_config": {"hidden_size": 2560, "num_attention_heads": 8, "num_hidden_layers": 34,
                      "num_key_value_heads": 4, "head_dim": 256}},
     dict(num_layers=34, num_kv_heads=4, head_dim=256, dtype="float16")),
    # multi-head latent attention (DeepSeek-V3's numbers): q and k 128 + 64, v 128, decompressed
    # for every query head: a K/V head per query head of the wider dim
    ({"hidden_size": 7168, "num_attention_heads": 128, "num_hidden_layers": 61, "num_key_value_heads": 128,
      "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
      "v_head_dim": 128, "torch_dtype": "bfloat16"},
     dict(num_layers=61, num_kv_heads=128, head_dim=192, dtype="bfloat16")),
    # ... whatever num_key_value_heads says (MiniCPM3's configs leave the default)
    ({**LLAMA, "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64},
     dict(num_layers=32, num_kv_heads=32, head_dim=96, dtype="bfloat16")),
    # grouped heads with a narrower v (MiMo-V2-Flash): the wider, heads as given
    ({**LLAMA, "head_dim": 192, "v_head_dim": 128}, dict(num_layers=32, num_kv_heads=8, head_dim=192,
                                                         dtype="bfloat16")),
    # v wider than q and k
    ({**LLAMA, "head_dim": 64, "v_head_dim": 128}, dict(num_layers=32, num_kv_heads=8, head_dim=128,
                                                        dtype="bfloat16")),
    # JetMoE-8B: 16 K/V heads tiled for its 2 experts a token, as its attention receives them
    ({"model_type": "jetmoe", "hidden_size": 2048, "num_attention_heads": 32, "num_hidden_layers": 24,
      "num_key_value_heads": 16, "kv_channels": 128, "num_experts_per_tok": 2, "torch_dtype": "bfloat16"},
     dict(num_layers=24, num_kv_heads=32, head_dim=128, dtype="bfloat16")),
    # Gemma-3n E2B's text model: its last 10 of 30 layers reuse earlier layers' K/V and store none
    ({"model_type": "gemma3n", "torch_dtype": "bfloat16",
      "text_config": {"hidden_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 30,
                      "num_key_value_heads": 2, "head_dim": 256, "num_kv_shared_layers": 10,
                      "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 6}},
     dict(num_layers=20, num_kv_heads=2, head_dim=256, dtype="bfloat16")),
    # Llama-4 Scout: chunked and full layers alike store K/V of one geometry
    ({"model_type": "llama4", "text_config": {"model_type": "llama4_text", "hidden_size": 5120,
                                             "num_attention_heads": 40, "num_hidden_layers": 48,
                                             "num_key_value_heads": 8, "head_dim": 128, "torch_dtype": "bfloat16",
                                             "attention_chunk_size": 8192,
                                             "layer_types": (["chunked_attention"] * 3 + ["full_attention"]) * 12}},
     dict(num_layers=48, num_kv_heads=8, head_dim=128, dtype="bfloat16")),
    # sources named: layers 2 and 3 reuse layers 0 and 1
    ({**LLAMA, "num_hidden_layers": 4, "kv_source_layers": [0, 1, 0, 1]},
     dict(num_layers=2, num_kv_heads=8, head_dim=128, dtype="bfloat16")),
    # Gemma-4 as its hub configs write it: full layers of head dim 512 and, keys as values, 4 K/V
    # heads; sliding ones of 256 and 16, two by two in a head of 512: one pool of 8 heads of 512
    # (kvpager.layer_geometry)
    (GEMMA4, dict(num_layers=60, num_kv_heads=8, head_dim=512, dtype="bfloat16")),
    # ... without attention_k_eq_v its full layers keep the sliding ones' 8 K/V heads; without
    # global_head_dim transformers gives them 512
    ({**GEMMA4, "text_config": {**GEMMA4["text_config"], "attention_k_eq_v": False, "num_key_value_heads": 8}},
     dict(num_layers=60, num_kv_heads=8, head_dim=512, dtype="bfloat16")),
    ({**GEMMA4, "text_config": {k: v for k, v in GEMMA4["text_config"].items() if k != "global_head_dim"}},
     dict(num_layers=60, num_kv_heads=8, head_dim=512, dtype="bfloat16")),
    # MiMo-V2-Flash: its sliding layers have twice num_key_value_heads (its attention code's rule), v
    # narrower than q and k: one pool of 8 heads of 192 (its full layers' 4 each stored twice)
    ({"model_type": "mimo_v2_flash", "hidden_size": 4096, "num_attention_heads": 64, "num_key_value_heads": 4,
      "head_dim": 192, "v_head_dim": 128, "num_hidden_layers": 8, "sliding_window": 128,
      "layer_types": ["full_attention"] + ["sliding_attention"] * 4 + ["full_attention"] + ["sliding_attention"] * 2,
      "torch_dtype": "bfloat16"}, dict(num_layers=8, num_kv_heads=8, head_dim=192, dtype="bfloat16")),
    # as transformers saves per-layer configs: the layers' fields that differ, by index (layers of 8 and
    # of 32 heads of 128, two by two: 4 and 16; one of 2 heads of 256: the pool's 16 heads of 256)
    ({**LLAMA, "num_hidden_layers": 4, "per_layer_config": {"1": {"head_dim": 256, "num_key_value_heads": 2},
                                                             "3": {"num_key_value_heads": 32}}},
     dict(num_layers=4, num_kv_heads=16, head_dim=256, dtype="bfloat16")),
    ({**LLAMA, "per_layer_config": {}}, dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16")),
    # Falcon: the K/V heads its attention makes, by its own rule: one where multi-query (Falcon-7B;
    # the default, as its config.json gives no num_key_value_heads), num_kv_heads under the new
    # decoder architecture (Falcon-40B), one a query head without multi-query (Falcon-RW)
    (FALCON, dict(num_layers=32, num_kv_heads=1, head_dim=64, dtype="bfloat16")),
    ({**{k: v for k, v in FALCON.items() if k != "multi_query"}, "num_key_value_heads": 71},
     dict(num_layers=32, num_kv_heads=1, head_dim=64, dtype="bfloat16")),
    ({**FALCON, "hidden_size": 8192, "num_attention_heads": 128, "num_hidden_layers": 60,
      "new_decoder_architecture": True, "num_kv_heads": 8},
     dict(num_layers=60, num_kv_heads=8, head_dim=64, dtype="bfloat16")),
    ({**FALCON, "hidden_size": 2048, "num_attention_heads": 32, "num_hidden_layers": 24, "multi_query": False,
      "alibi": True}, dict(num_layers=24, num_kv_heads=32, head_dim=64, dtype="bfloat16")),
])
def test_geometry_from_config(tmp_path, config, want):
    assert sizing.model_geometry(write(tmp_path, config)) == want
    assert sizing.model_geometry(str(tmp_path)) == want  # the model folder


@pytest.mark.parametrize("config, error, match", [
    ({**LLAMA, "v_head_dim": "128"}, InvalidArgument, "v_head_dim"),
    ({**LLAMA, "kv_lora_rank": 512, "v_head_dim": 0}, InvalidArgument, "v_head_dim"),
    ({**LLAMA, "torch_dtype": "float64"}, UnsupportedConfiguration, "float64"),
    ({**LLAMA, "num_hidden_layers": 0}, InvalidArgument, "num_hidden_layers"),
    ({**LLAMA, "num_key_value_heads": "8"}, InvalidArgument, "num_key_value_heads"),
    ({**LLAMA, "hidden_size": 4001}, InvalidArgument, "not a multiple"),
    ({"vocab_size": 3}, InvalidArgument, "num_hidden_layers and num_attention_heads"),
    ([1, 2], InvalidArgument, "not a JSON object"),
    ({**LLAMA, "num_kv_shared_layers": 32, "layer_types": ["full_attention"] * 32}, InvalidArgument,
     "num_kv_shared_layers"),
    ({**LLAMA, "num_kv_shared_layers": 2}, InvalidArgument, "num_kv_shared_layers"),  # no layer types
    ({**LLAMA, "num_hidden_layers": 3, "kv_source_layers": [0, 2, 2]}, InvalidArgument, "reuse an earlier"),
    ({**LLAMA, "num_hidden_layers": 3, "kv_source_layers": [0, 0, 1]}, InvalidArgument, "reuse an earlier"),
    ({**LLAMA, "num_hidden_layers": 3, "kv_source_layers": [0, 1]}, InvalidArgument, "reuse an earlier"),
    ({**LLAMA, "per_layer_config": {"x": {"head_dim": 64}}}, InvalidArgument, "per_layer_config"),
    ({**LLAMA, "per_layer_config": {"32": {"head_dim": 64}}}, InvalidArgument, "per_layer_config"),
    ({**LLAMA, "per_layer_config": {"1": 64}}, InvalidArgument, "per_layer_config"),
    ({**LLAMA, "per_layer_config": [{"head_dim": 64}]}, InvalidArgument, "per_layer_config"),
    ({**LLAMA, "per_layer_config": {"1": {"head_dim": "64"}}}, InvalidArgument, "layer 1: head_dim"),
    ({**LLAMA, "per_layer_config": {"1": {"num_key_value_heads": 5}}}, InvalidArgument, "layer 1: .*multiple"),
    ({**LLAMA, "global_head_dim": 512}, InvalidArgument, "global_head_dim"),  # no layer types
])
def test_bad_configs_are_named(tmp_path, config, error, match):
    with pytest.raises(error, match=match):
        sizing.model_geometry(write(tmp_path, config))


@pytest.mark.parametrize("fields", [
    {},
    {"attention_k_eq_v": False},
    {"global_head_dim": 32},  # full and sliding layers alike
    {"num_kv_shared_layers": 2, "layer_types": ["sliding_attention", "full_attention"] * 3},
])
def test_gemma4_geometry_is_transformers(fields):
    """A Gemma-4 config.json in its hub form (global_head_dim, num_global_key_value_heads)
    sizes the pool that transformers' own reading of it (its per-layer configs)
    does, and so does the config transformers saves from it."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma4TextConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma-4")
    from kvpager.hf.model import model_geometry

    hub = {"model_type": "gemma4_text", "hidden_size": 64, "num_attention_heads": 8, "num_hidden_layers": 6,
           "num_key_value_heads": 4, "head_dim": 16, "global_head_dim": 64, "num_global_key_value_heads": 2,
           "attention_k_eq_v": True, **fields}
    config = transformers.Gemma4TextConfig(**{k: v for k, v in hub.items() if k != "model_type"})
    want = model_geometry(config)
    assert sizing.config_geometry(hub) == want
    assert sizing.config_geometry(config.to_dict()) == want
    layers = [(config.per_layer_config[i].num_key_value_heads, config.per_layer_config[i].head_dim)
              for i in range(6)]
    pool_heads, width = want["num_kv_heads"], want["head_dim"]
    assert width == max(d for _, d in layers) and 8 % pool_heads == 0
    for kv, d in layers:  # each layer fits a pool head's width, its K/V heads packed and repeated whole
        packed = min(kv, width // d)
        assert kv * d <= pool_heads * width and pool_heads % (kv // packed) == 0


def test_kv_sharing_modes_are_checked_against_the_sources():
    """transformers' configs compute ``kv_sharing_modes``: layers that reuse must be the
    ones the sources say, and no other mode (an indexer's) is followed."""
    base = {"num_kv_shared_layers": 2, "layer_types": ["sliding_attention", "full_attention"] * 2}
    modes = [None, None, "reuse", "reuse"]
    assert sizing.kv_sources({**base, "kv_sharing_modes": modes}.get, 4) == [0, 1, 0, 1]
    assert sizing.pool_layers([0, 1, 0, 1]) == [0, 1, 0, 1]
    assert sizing.pool_layers([0, 1, 2, 1, 4, 2]) == [0, 1, 2, 1, 3, 2]
    with pytest.raises(InvalidArgument, match="do not match"):
        sizing.kv_sources({**base, "kv_sharing_modes": [None, "reuse", None, "reuse"]}.get, 4)
    with pytest.raises(InvalidArgument, match="reuse_but_indexer"):
        sizing.kv_sources({**base, "kv_sharing_modes": [None, None, "reuse_but_indexer", "reuse"]}.get, 4)


@pytest.mark.parametrize("config, match", [
    ({"kv_source_layers": 5}, "kv_source_layers must be a list"),
    ({"kv_source_layers": "ab"}, "kv_source_layers must be a list"),
    ({"kv_source_layers": [0, "0"]}, "reuse an earlier"),
    ({"num_kv_shared_layers": 1, "layer_types": {"a": 1, "b": 2}}, "layer_types must be a list"),
    ({"num_kv_shared_layers": 1, "layer_types": [["a"], ["a"]]}, "layer_types must name"),
    ({"num_kv_shared_layers": 1, "layer_types": ["a", "b"]}, "reuse an earlier"),  # no earlier "b"
    ({"kv_sharing_modes": 3}, "kv_sharing_modes must be a list"),
    ({"num_kv_shared_layers": 1.5}, "num_kv_shared_layers"),
    ({"num_kv_shared_layers": True, "layer_types": ["a", "a"]}, "num_kv_shared_layers"),
])
def test_junk_sharing_fields_are_typed_errors(config, match):
    """What a config.json says of shared K/V, whatever its types: a typed error naming it."""
    with pytest.raises(InvalidArgument, match=match):
        sizing.kv_sources(config.get, 2)


def test_missing_or_broken_config(tmp_path):
    with pytest.raises(InvalidArgument, match="no such preset"):
        sizing.model_geometry(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="cannot read"):
        sizing.model_geometry(str(tmp_path))


def test_build_spec_from_a_config_and_options(tmp_path):
    path = write(tmp_path, LLAMA)
    spec = build_spec(opts(model=path, blocks=100, block_size=32))
    assert spec == PoolSpec(32, 8, 128, 100, 32, "bfloat16")
    assert build_spec(opts(model=path, blocks=10, dtype="float16", layers=2)).dtype == "float16"
    no_dtype = write(tmp_path, {k: v for k, v in LLAMA.items() if k != "torch_dtype"}, "x.json")
    with pytest.raises(Exception, match="pass --dtype"):
        build_spec(opts(model=no_dtype, blocks=10))
    assert build_spec(opts(model=no_dtype, blocks=10, dtype="float32")).dtype == "float32"
    assert build_spec(opts(model="tiny", blocks=10)).num_layers == 2  # presets still work


@pytest.mark.parametrize("text, want", [("0.9", 0.9), (".5", 0.5), ("1.0", 1.0), ("90%", 0.9), ("100%", 1.0),
                                        ("8G", None), ("4096", None), ("1", None), ("1.5GiB", None)])
def test_fraction_or_bytes(text, want):
    got = sizing.parse_fraction(text)
    assert got == pytest.approx(want) if want is not None else got is None


@pytest.mark.parametrize("text", ["2.5", "0.0", "0%", "150%"])
def test_fractions_out_of_range(text):
    with pytest.raises(InvalidArgument, match=r"\(0, 1\]"):
        sizing.parse_fraction(text)


def test_memory_budget_on_cpu_and_gpu(monkeypatch):
    assert sizing.memory_budget("8G", "cpu") == (8 << 30, "--memory 8G")
    monkeypatch.setattr(sizing, "cpu_available_bytes", lambda: (10_000_000, "available RAM"))
    budget, how = sizing.memory_budget("0.5", "cpu", host_bytes=2_000_000)
    assert budget == 4_000_000 and "50% of available RAM less the host pool" in how
    monkeypatch.setattr(sizing, "gpu_free_bytes", lambda device: 80 << 30)
    assert sizing.memory_budget("90%", "cuda:0", host_bytes=1 << 30)[0] == int(0.9 * (80 << 30))
    with pytest.raises(InvalidArgument, match="fraction of free memory"):
        sizing.memory_budget("lots", "cpu")


def test_cpu_available_is_the_smaller_of_ram_and_shm():
    with open("/proc/meminfo") as f:
        ram = next(int(x.split()[1]) for x in f if x.startswith("MemAvailable:")) * 1024
    st = os.statvfs("/dev/shm")
    shm = st.f_bavail * st.f_frsize
    got, what = sizing.cpu_available_bytes()
    assert got == pytest.approx(min(ram, shm), rel=0.05)
    assert what == ("available RAM" if ram <= shm else "free space in /dev/shm")


def test_serve_with_a_model_folder_and_a_fraction(tmp_path):
    """The daemon sized from a config.json and a fraction of what a CPU pool can take."""
    tiny = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
            "torch_dtype": "float32"}
    write(tmp_path, tiny)
    endpoint, _ = ipc_endpoint()
    free, _ = sizing.cpu_available_bytes()
    args = ["--model", str(tmp_path), "--memory", "0.1%", "--device", "cpu"]
    with daemon_process(args, endpoint) as proc, Client(endpoint, heartbeat=False, map_pool=False) as c:
        spec = c.spec
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == (2, 2, 16, "float32")
    assert spec.num_blocks == pytest.approx(free * 0.001 // spec.bytes_per_block, rel=0.05)
    assert any(f"device pool: {spec.num_blocks} blocks from 0.1% of " in line for line in proc.log)


def test_serve_refuses_a_bad_model_clearly(tmp_path):
    endpoint, _ = ipc_endpoint()
    write(tmp_path, {**LLAMA, "torch_dtype": "float64"})
    for model, match in ((tmp_path, "float64"), (tmp_path / "nope", "no such preset")):
        with pytest.raises(RuntimeError, match=match), daemon_process(["--model", str(model), "--blocks", "8"],
                                                                       endpoint):
            pass


@pytest.mark.gpu
def test_a_fraction_of_free_gpu_memory_sizes_a_gpu_pool():
    """On a GPU, --memory 0.02 is 2% of the device's free memory as CUDA reports
    it, and a pool of that many bytes fits there."""
    from gpu_helpers import cupy_or_skip

    cupy = cupy_or_skip()
    from kvpager import KVPool

    free = cupy.cuda.runtime.memGetInfo()[0]
    budget, how = sizing.memory_budget("0.02", "cuda:0")
    assert abs(budget - 0.02 * free) <= 0.002 * free and "free memory of cuda:0" in how
    spec = PoolSpec(num_layers=4, num_kv_heads=8, head_dim=128, num_blocks=2, block_size=16, dtype="bfloat16")
    spec = spec.replace(num_blocks=budget // spec.bytes_per_block)
    pool = KVPool(spec, device="cuda:0")
    assert spec.device_bytes <= budget and cupy.cuda.runtime.memGetInfo()[0] <= free - spec.device_bytes + (64 << 20)
    pool.close()


def test_dtype_is_read_before_its_older_name():
    """A config naming both `dtype` and `torch_dtype`, differently, loads in transformers 5
    as its `dtype`; sizing took `torch_dtype`."""
    from kvpager.sizing import config_geometry

    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "torch_dtype": "float16", "dtype": "bfloat16"}
    assert config_geometry(config)["dtype"] == "bfloat16"
    assert config_geometry({**config, "dtype": None})["dtype"] == "float16"
    text = {k: v for k, v in config.items() if k not in ("model_type", "dtype", "torch_dtype")}
    assert config_geometry({"model_type": "x", "dtype": "float32", "text_config": {**text, "dtype": "bfloat16"}}
                           )["dtype"] == "bfloat16"  # (the text config's first)


@pytest.mark.parametrize("config", [
    {**LLAMA, "num_hidden_layers": 1 << 40},  # a list of its layers' sources took all memory
    {**LLAMA, "num_hidden_layers": 10 ** 30},  # OverflowError
    {"model_type": "bamba", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1 << 40,
     "attn_layer_indices": [1]},  # (layer kinds built a layer at a time)
    {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 1 << 40},  # (transformers' class builds them)
    {"model_type": "x", "text_config": {**LLAMA, "num_hidden_layers": 1 << 40}},
])
def test_layer_counts_past_any_model_are_refused_by_name(tmp_path, config):
    with pytest.raises(InvalidArgument, match="past any model's count of layers"):
        sizing.model_geometry(write(tmp_path, config))


def test_no_attending_layer_with_per_layer_fields_is_refused_by_name(tmp_path):
    """Layers none of which attends, with a field that gives layers their own geometry
    (``global_head_dim``): fitting no layer raised ValueError."""
    config = {"model_type": "lfm2", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "layer_types": ["conv", "conv"], "global_head_dim": 32, "torch_dtype": "float32"}
    with pytest.raises(InvalidArgument, match="no layer attends"):
        sizing.config_geometry(config)
    with pytest.raises(InvalidArgument, match="no layer attends"):
        sizing.model_geometry(write(tmp_path, config))


def test_serve_dry_run_prints_the_pool_and_makes_nothing(tmp_path):
    """`kvpager serve --dry-run`: the pool its options size, printed; no endpoint bound
    (nor a pool made: it returns before the server); a bad model refused as serve
    refuses it."""
    from click.testing import CliRunner

    from kvpager.cli import main

    path = write(tmp_path, LLAMA)
    endpoint, _ = ipc_endpoint()
    result = CliRunner().invoke(main, ["serve", "--model", path, "--memory", "64M", "--host-memory", "16M",
                                       "--device", "cpu", "--endpoint", endpoint, "--dry-run"])
    assert result.exit_code == 0, result.output
    spec = PoolSpec.for_memory(64 << 20, host_bytes=16 << 20, num_layers=32, num_kv_heads=8, head_dim=128,
                               dtype="bfloat16")
    lines = dict(line.split("  ", 1) for line in result.output.splitlines())
    assert lines["layers x kv heads x head dim"].strip() == "32 x 8 x 128"
    assert lines["device blocks"].strip().startswith(f"{spec.num_blocks:,} ({spec.num_blocks - 1:,} usable: "
                                                    f"{(spec.num_blocks - 1) * 16:,} tokens)")
    assert lines["host blocks"].strip().startswith(f"{(16 << 20) // spec.bytes_per_block:,} ")
    assert lines["K/V bytes a token"].strip() == f"{32 * 2 * 8 * 128 * 2:,}"
    assert not os.path.exists(endpoint.removeprefix("ipc://"))  # (nothing bound)
    bad = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "nope"), "--blocks", "8", "--dry-run"])
    assert bad.exit_code != 0 and "no such preset" in bad.output
