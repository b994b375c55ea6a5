"""`kvpager serve --model`: a config.json sized as transformers builds the model
from it, fields the file leaves to its config class included (`class_defaults`).

Before it, sizing read the file's fields alone: a Mistral without
``num_key_value_heads`` got a K/V head per query head where its class gives 8,
a Gemma without ``head_dim`` hidden / heads where its class gives 256, a
multimodal ``text_config`` saved sparse (``save_pretrained`` writes only what
differs from its class) head dim 16, and GPT-2's ``n_layer`` / ``n_head`` were
refused. A worker then refused the daemon's pool as of another geometry."""

from __future__ import annotations

import json
import sys
import warnings

import pytest

from kvpager import sizing
from kvpager.errors import UnsupportedConfiguration

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")

from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from kvpager.errors import UnsupportedModel  # noqa: E402
from kvpager.hf.model import model_geometry  # noqa: E402


def json_of(config: dict) -> dict:
    """``config`` as it reads back from a file."""
    return json.loads(json.dumps(config, default=str))


def file_geometry(tmp_path, config: dict) -> dict:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return {k: v for k, v in sizing.model_geometry(str(path)).items() if k != "dtype"}


def built_geometry(config: dict):
    """What the worker checks the pool against: transformers' config built from the
    file, read by `kvpager.hf.model.model_geometry`; None where that config gives no
    attention kvpager serves (or transformers cannot build it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
        text = built.get_text_config()
        geometry = model_geometry(text)
    except (UnsupportedModel, Exception):  # noqa: BLE001 - no reference to hold sizing to
        return None
    try:
        heads, head_dim, hidden = text.num_attention_heads, getattr(text, "head_dim", None), text.hidden_size
    except Exception:  # noqa: BLE001 - per-layer fields (Gemma-4's): read by layer, as model_geometry did
        return geometry
    if head_dim is None and hidden % heads:
        return None  # (no head dim and a width its heads do not divide: sizing refuses it by name)
    return geometry


def variants(model_type: str) -> dict[str, dict]:
    """Files a model of ``model_type`` may come with: every field written, what
    ``save_pretrained`` writes (sub-configs only what differs from their class), and
    an older file without ``head_dim`` / ``num_key_value_heads``."""
    config = CONFIG_MAPPING[model_type]()
    full = json_of(config.to_dict())
    older = {k: v for k, v in full.items() if k not in ("head_dim", "num_key_value_heads")}
    if isinstance(full.get("text_config"), dict):
        older["text_config"] = {k: v for k, v in full["text_config"].items()
                                if k not in ("head_dim", "num_key_value_heads")}
    out = {"full": full, "saved": json_of(config.to_diff_dict()), "older": older}
    for v in out.values():
        v.setdefault("model_type", model_type)
    return out


def test_every_causal_lm_type_is_sized_as_transformers_builds_it():
    """For every causal LM type this transformers knows, sizing a config.json gives the
    geometry the worker checks the pool against (or refuses where that config has
    none to check): no type sized otherwise."""
    wrong, checked = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
            try:
                files = variants(model_type)
            except Exception:  # noqa: BLE001 - a class without defaults of its own: no file to write
                continue
            for name, config in files.items():
                want = built_geometry(config)
                try:
                    got = sizing.config_geometry(sizing.class_defaults(config))
                    got.pop("dtype", None)
                except (sizing.InvalidArgument, UnsupportedConfiguration):
                    got = None
                checked += want is not None
                if got != want:
                    wrong.append(f"{model_type} ({name}): sized {got}, transformers {want}")
    assert checked > 100 and not wrong, "\n".join(wrong)


@pytest.mark.parametrize("config, want", [
    # Mistral without num_key_value_heads: its class's 8, not one a query head
    ({"model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32},
     {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128}),
    # Gemma without head_dim: its class's 256, not 3,072 / 16
    ({"model_type": "gemma", "hidden_size": 3072, "num_attention_heads": 16, "num_hidden_layers": 28,
      "num_key_value_heads": 16}, {"num_layers": 28, "num_kv_heads": 16, "head_dim": 256}),
    # GPT-2's own field names
    ({"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12},
     {"num_layers": 12, "num_kv_heads": 12, "head_dim": 64}),
    # a sparse multimodal text config, as save_pretrained writes Gemma-3 4B's
    ({"model_type": "gemma3", "text_config": {"hidden_size": 2560, "num_hidden_layers": 34,
                                              "num_attention_heads": 8, "num_key_value_heads": 4}},
     {"num_layers": 34, "num_kv_heads": 4, "head_dim": 256}),
])
def test_fields_left_to_the_class(tmp_path, config, want):
    assert file_geometry(tmp_path, config) == want
    assert built_geometry(config) == want


def test_the_files_own_fields_stay():
    """A key the file has stays as it is, null included; a type transformers does not
    know, or a file without transformers, is read as it is."""
    mistral = {"model_type": "mistral", "hidden_size": 512, "num_attention_heads": 8, "num_hidden_layers": 2,
               "num_key_value_heads": 2, "head_dim": None}
    assert sizing.class_defaults(mistral)["head_dim"] is None
    assert sizing.config_geometry(sizing.class_defaults(mistral))["head_dim"] == 64
    custom = {"model_type": "not-a-transformers-type", "hidden_size": 512, "num_attention_heads": 8,
              "num_hidden_layers": 2}
    assert sizing.class_defaults(custom) == custom
    untyped = {k: v for k, v in mistral.items() if k != "model_type"}
    assert sizing.class_defaults(untyped) == untyped


def test_without_transformers_the_file_alone(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers.models.auto.configuration_auto", None)  # (import fails)
    config = {"model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32}
    assert sizing.class_defaults(config) == config
    assert sizing.config_geometry(sizing.class_defaults(config))["num_kv_heads"] == 32


def test_a_file_transformers_refuses_is_sized_from_its_fields_with_a_warning():
    config = {"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "head_dim": 16, "layer_types": ["full_attention"] * 3}  # (three types for two layers)
    try:
        CONFIG_MAPPING["gemma3_text"].from_dict(dict(config))
    except Exception:  # noqa: BLE001
        pass
    else:
        pytest.skip(f"transformers {transformers.__version__} builds that config")
    with pytest.warns(UserWarning, match="transformers cannot build"):
        assert sizing.class_defaults(config) == config


def test_layers_of_other_query_head_counts_are_refused_by_both():
    """A config whose layers differ in their query heads (``per_layer_config``): the
    worker's check refused it with transformers' own error, sizing sized it at the
    config's count; both refuse it by name now."""
    config = {"model_type": "llama", "hidden_size": 512, "num_attention_heads": 8, "num_hidden_layers": 3,
              "num_key_value_heads": 8, "head_dim": 64,
              "per_layer_config": {"1": {"num_attention_heads": 4, "num_key_value_heads": 4}}}
    with pytest.raises(UnsupportedConfiguration, match="query heads"):
        sizing.config_geometry(config)
    heterogeneous = [t for t in ("dots3_note_text",) if t in CONFIG_MAPPING]
    for model_type in heterogeneous:
        with pytest.raises(UnsupportedModel, match="query heads"):
            model_geometry(CONFIG_MAPPING[model_type]())


def test_attention_free_configs_are_refused():
    """xLSTM, Mamba: no attention layer, no K/V for kvpager to hold."""
    for model_type in ("xlstm", "mamba"):
        if model_type not in CONFIG_MAPPING:
            continue
        config = json_of(CONFIG_MAPPING[model_type]().to_diff_dict())
        config["model_type"] = model_type
        with pytest.raises(sizing.InvalidArgument):
            sizing.config_geometry(sizing.class_defaults(config))


def test_serve_sizes_a_model_folder_as_transformers_builds_it(tmp_path):
    """`kvpager serve --model <folder>`'s pool for a Mistral config.json without
    ``num_key_value_heads``: 8 K/V heads, as the model has (32 before: 4x the bytes,
    and a pool every worker refused)."""
    from kvpager.serve_options import build_spec

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
         "num_attention_heads": 32, "num_hidden_layers": 32, "torch_dtype": "bfloat16"}))
    options = dict(model=str(tmp_path), layers=None, kv_heads=None, head_dim=None, dtype=None, block_size=None,
                   blocks=100, memory=None, host_blocks=None, host_memory=None)
    spec = build_spec(options)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == (32, 8, 128, "bfloat16")


def test_sizing_a_file_leaves_transformers_out_of_the_daemon(tmp_path):
    """`model_geometry` (what `kvpager serve --model` calls) reads the class defaults in
    a child process: transformers and torch stayed in the daemon for good before
    (about 220 MB of its memory against 36)."""
    import subprocess

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32}))
    code = ("import json, sys\nfrom kvpager.sizing import model_geometry\n"
            "g = model_geometry(sys.argv[1])\n"
            "print(json.dumps([g, 'transformers' in sys.modules, 'torch' in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    geometry, had_transformers, had_torch = json.loads(out.stdout.splitlines()[-1])
    assert geometry == {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128}
    assert not had_transformers and not had_torch


def test_apart_refusals_fills_and_warnings_are_the_callers():
    """`defaults_apart`: a count of layers past the bound refused before any child; the
    child's filled fields and its warnings (transformers refusing the file) reach the
    caller."""
    config = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "text_config": {"num_layers": 1 << 20}}
    with pytest.raises(sizing.InvalidArgument, match="past any model's count of layers"):
        sizing.defaults_apart(config)
    assert sizing.defaults_apart({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2})[
        "num_hidden_layers"] == 2
    refused = {"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
               "head_dim": 16, "layer_types": ["full_attention"] * 3}
    try:
        CONFIG_MAPPING["gemma3_text"].from_dict(dict(refused))
    except Exception:  # noqa: BLE001
        with pytest.warns(UserWarning, match="transformers cannot build"):
            assert sizing.defaults_apart(refused) == refused


def test_without_transformers_a_file_leaving_fields_out_is_warned_about(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else
                        real(name, *a))
    config = {"model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32}
    with pytest.warns(UserWarning, match="num_key_value_heads / head_dim, and transformers is not installed"):
        assert sizing.defaults_apart(config) == config
    whole = {**config, "num_key_value_heads": 8, "head_dim": 128}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sizing.defaults_apart(whole) == whole


@pytest.mark.parametrize("child", ["hangs", "is killed"])
def test_a_child_that_hangs_or_dies_is_bounded_and_the_file_read_alone(child, tmp_path, monkeypatch):
    """`defaults_apart`: a child that never answers is killed at `CHILD_SECONDS` (the
    daemon's start is not held for good), one killed by a signal is warned about;
    either way the file's own fields are the answer."""
    import time

    from kvpager import config_file

    (tmp_path / "sitecustomize.py").write_text(
        "import os, signal, time\n"
        "if os.environ.get('KVPAGER_TEST_CHILD') == 'hangs':\n    time.sleep(600)\n"
        "elif os.environ.get('KVPAGER_TEST_CHILD') == 'is killed':\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.setenv("KVPAGER_TEST_CHILD", child)
    monkeypatch.setattr(config_file, "CHILD_SECONDS", 3.0)
    config = {"model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32}
    started = time.monotonic()
    with pytest.warns(UserWarning, match="could not be read from transformers .*; sizing from its fields alone"):
        assert sizing.defaults_apart(config) == config
    assert time.monotonic() - started < 30
