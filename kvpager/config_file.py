"""A model's ``config.json`` read as transformers reads it, for sizing a pool
(`kvpager.sizing`): found at a path or by hub model id (`read_config`,
`hub_config`), its layer counts bounded (`check_layer_counts`), and the
geometry fields it leaves to its transformers config class filled as that class
fills them (`class_defaults`), in a child process so that transformers stays
out of the daemon (`defaults_apart`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any

from kvpager import env
from kvpager.errors import InvalidArgument

#: a Hugging Face hub model id: ``name`` or ``owner/name`` (letters, digits, ``-_.``), optionally ``@revision``
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}(?:@[\w./-]{1,128})?")


def hub_config(model_id: str) -> str:
    """The local path of hub model ``model_id``'s ``config.json`` (``owner/name``,
    ``@revision`` optional), as transformers finds it: from the Hugging Face cache
    (``HF_HOME`` / ``HF_HUB_CACHE``) where it is there, else downloaded (the hub's
    token and ``HF_HUB_OFFLINE`` honoured). InvalidArgument naming why where
    neither can be had."""
    repo, _, revision = model_id.partition("@")
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        raise InvalidArgument(f"--model {model_id}: no such preset, folder or file; reading a hub model id needs "
                              "huggingface_hub (pip install huggingface_hub, or transformers)") from None
    try:
        cached = try_to_load_from_cache(repo, "config.json", revision=revision or None)
        if isinstance(cached, str):
            return cached
        return hf_hub_download(repo, "config.json", revision=revision or None)
    except Exception as e:  # noqa: BLE001 - offline, gated, no such repo or revision: each says so
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise InvalidArgument(f"--model {model_id}: no such preset, folder or file, and its config.json cannot be "
                              f"had from the Hugging Face hub or its cache ({type(e).__name__}: {first})"
                              f"{preset_hint(model_id)}") from None


def preset_hint(name: str) -> str:
    """"; did you mean PRESET?" for a name close to a preset's (``llama3-8b``), else ""."""
    import difflib

    from kvpager.spec import MODEL_PRESETS

    close = difflib.get_close_matches(name.lower(), list(MODEL_PRESETS), n=1, cutoff=0.75)
    return f"; did you mean the preset {close[0]}?" if close else ""


def read_config(path: str) -> dict[str, Any]:
    """The parsed ``config.json`` at ``path`` (the file, or a folder holding it), or
    of a hub model id (`hub_config`) where no such path exists."""
    if not os.path.exists(path) and _HUB_ID.fullmatch(path) and not path.endswith(".json"):
        path = hub_config(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        config = json.loads(env.read_file(file, "the model config", 64 << 20))
    except FileNotFoundError:
        raise InvalidArgument(f"--model {path}: no such preset, and no {file}") from None
    except (OSError, ValueError, RecursionError) as e:  # (a file nested past the parser's depth)
        raise InvalidArgument(f"--model {path}: cannot read {file}: {e}") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"--model {path}: {file} is not a JSON object")
    return config


#: the fields `config_geometry` reads (with `kvpager.layer_geometry`'s), filled by `class_defaults` where a
#: ``config.json`` leaves them to its transformers class
GEOMETRY_FIELDS = (
    "num_hidden_layers", "num_attention_heads", "hidden_size", "num_key_value_heads", "head_dim",
    "qk_head_dim", "qk_nope_head_dim", "qk_rope_head_dim", "kv_lora_rank", "v_head_dim", "kv_channels",
    "new_decoder_architecture", "multi_query", "num_kv_heads", "layer_types", "num_kv_shared_layers",
    "kv_source_layers", "global_head_dim", "num_global_key_value_heads", "attention_k_eq_v",
)


def _plain(value: Any) -> bool:
    """Whether ``value`` is what a ``config.json`` holds (a scalar, or a list of scalars)."""
    scalar = (int, float, str)  # (bool is an int)
    return isinstance(value, scalar) or isinstance(value, (list, tuple)) and all(
        isinstance(v, scalar) or v is None for v in value)


def _filled(fields: dict[str, Any], config: Any) -> dict[str, Any]:
    """``fields`` with each `GEOMETRY_FIELDS` name it lacks taken from the transformers
    config object ``config`` (its own name or, through its ``attribute_map``, an
    alias's: GPT-2's ``n_layer``), where that holds a plain value."""
    out = dict(fields)
    for name in GEOMETRY_FIELDS:
        if name not in out:
            try:
                value = getattr(config, name)
            except Exception:  # noqa: BLE001 - a class without the field (or whose property refuses)
                continue
            if value is not None and _plain(value):
                out[name] = list(value) if isinstance(value, tuple) else value
    return out


#: the most layers a config may give (the largest models have a few hundred): a count past it is refused
#: before anything is built a layer at a time (a list of 2**40 layer kinds, or transformers' own)
MAX_LAYERS = 1 << 16


def check_layer_counts(config: dict[str, Any], where: str = "config.json") -> None:
    """InvalidArgument where a field counting layers (an int field named ``*_layers``
    or ``*_layer``: ``num_hidden_layers``, GPT-2's ``n_layer``, ``num_kv_shared_layers``,
    in ``config`` or its ``text_config``) is past `MAX_LAYERS`."""
    for fields in (config, config.get("text_config")):
        if not isinstance(fields, dict):
            continue
        for key, value in fields.items():
            if isinstance(key, str) and key.endswith(("_layers", "_layer")) and type(value) is int \
                    and value > MAX_LAYERS:
                raise InvalidArgument(f"{where}: {key} {value} is past any model's count of layers "
                                      f"(at most {MAX_LAYERS:,})")


def class_defaults(config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """``config`` with the geometry fields it leaves to its transformers config class
    filled in as that class fills them when transformers loads the file (a
    Mistral without ``num_key_value_heads`` has 8; a Gemma without ``head_dim``,
    256; a multimodal ``text_config`` saved sparse, as ``save_pretrained`` writes
    it, only what differs from its class; GPT-2's ``n_layer`` / ``n_head`` read
    as ``num_hidden_layers`` / ``num_attention_heads``). Keys the file has, null
    ones included, stay as they are. Without transformers installed, for a
    ``model_type`` it does not know, or a file it cannot build a config from
    (warned), ``config`` is returned unchanged: the pool is sized from the
    file's fields alone."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return config
    check_layer_counts(config, where)
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except Exception:  # noqa: BLE001 - transformers absent or broken: the file's fields alone
        return config
    if model_type not in CONFIG_MAPPING:
        return config
    try:
        built = CONFIG_MAPPING[model_type].from_dict(dict(config))
        text = built.get_text_config()
    except Exception as e:  # noqa: BLE001 - transformers' own validation: its message says why
        why = " ".join(str(e).split())[:200]  # (transformers' own message runs over several lines)
        warnings.warn(f"{where}: transformers cannot build a {model_type} config from it ({type(e).__name__}: "
                      f"{why}); sizing from its fields alone", stacklevel=2)
        return config
    if text is built:
        return _filled(config, built)
    sub = config.get("text_config")
    if sub is not None and not isinstance(sub, dict):
        return config  # (`config_geometry` names what is wrong with it)
    return {**config, "text_config": _filled(sub or {}, text)}


#: seconds the child of `defaults_apart` may take (importing transformers takes a few)
CHILD_SECONDS = 120.0


def defaults_apart(config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """`class_defaults` run in a child Python process: transformers (and the torch it
    imports) would stay in the caller for good, about 220 MB of a daemon's memory
    for one reading of a file (36 MB without). Its InvalidArgument is raised here;
    a child that cannot answer (no kvpager on its path, killed, past
    `CHILD_SECONDS`) is warned about and the file's fields are read alone."""
    import importlib.util
    import subprocess
    import sys

    if not isinstance(config.get("model_type"), str):
        return config
    if importlib.util.find_spec("transformers") is None:
        text = config.get("text_config")
        fields = {**config, **text} if isinstance(text, dict) else config
        left = [f for f in ("num_key_value_heads", "head_dim") if f not in fields]
        if left:
            warnings.warn(f"{where} gives no {' / '.join(left)}, and transformers is not installed to say what "
                          f"its {config['model_type']} config class fills in: sized as one K/V head a query head "
                          "and hidden_size / num_attention_heads (pass --kv-heads / --head-dim where its class "
                          "differs)", stacklevel=2)
        return config
    check_layer_counts(config, where)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        done = subprocess.run([sys.executable, "-c", "from kvpager.config_file import _child; _child()", where],
                              input=json.dumps(config), capture_output=True, text=True, env=env,
                              timeout=CHILD_SECONDS)
        answer = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:300]
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
        answer, why = None, f"{type(e).__name__}: {e}"
    if not isinstance(answer, dict) or not isinstance(answer.get("config", answer.get("error")), (dict, str)):
        warnings.warn(f"{where}: the fields it leaves to its config class could not be read from transformers "
                      f"({why}); sizing from its fields alone", stacklevel=2)
        return config
    for message in answer.get("warnings", []):  # (transformers could not build the config, ...)
        warnings.warn(str(message), stacklevel=2)
    if "error" in answer:
        raise InvalidArgument(str(answer["error"]))
    return answer["config"]


def _child() -> None:
    """`defaults_apart`'s child: a config on stdin, `class_defaults` of it on stdout."""
    import sys

    where = sys.argv[1] if len(sys.argv) > 1 else "config.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            out: dict[str, Any] = {"config": class_defaults(json.load(sys.stdin), where)}
        except InvalidArgument as e:
            out = {"error": str(e)}
    out["warnings"] = [str(w.message) for w in caught if w.filename == __file__]  # (its own, not imports')
    sys.stdout.write("\n" + json.dumps(out) + "\n")
