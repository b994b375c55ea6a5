"""`kvpager serve --model owner/name`: a hub model id sized from its config.json in
the Hugging Face cache (as transformers finds it; offline here), a revision's
too; an id neither cached nor reachable, or without huggingface_hub, refused
by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvpager import sizing
from kvpager.errors import InvalidArgument

pytest.importorskip("huggingface_hub")

LLAMA = {"model_type": "llama", "hidden_size": 512, "num_attention_heads": 8, "num_hidden_layers": 4,
         "num_key_value_heads": 2, "torch_dtype": "bfloat16"}


def cache_with(root, repo: str, revisions: dict[str, dict]) -> str:
    """A Hugging Face hub cache holding ``repo``'s config.json at each revision."""
    base = root / ("models--" + repo.replace("/", "--"))
    for i, (ref, config) in enumerate(revisions.items()):
        commit = f"{i + 1:040x}"
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / ref).write_text(commit)
        snap = base / "snapshots" / commit
        snap.mkdir(parents=True)
        (snap / "config.json").write_text(json.dumps(config))
    return str(root)


def geometry_offline(cache: str, model: str) -> subprocess.CompletedProcess:
    """`model_geometry(model)` in a process whose hub cache is ``cache``, offline
    (huggingface_hub reads both when it is imported)."""
    env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    code = ("import json, sys\nfrom kvpager.sizing import model_geometry\n"
            "from kvpager.errors import InvalidArgument\n"
            "try:\n    print(json.dumps(model_geometry(sys.argv[1])))\n"
            "except InvalidArgument as e:\n    print('InvalidArgument', e)\n")
    return subprocess.run([sys.executable, "-c", code, model], env=env, capture_output=True, text=True, timeout=120)


def test_a_hub_id_is_sized_from_the_cache(tmp_path):
    cache = cache_with(tmp_path / "hub", "acme/tiny-llama",
                       {"main": LLAMA, "v2": {**LLAMA, "num_key_value_heads": 4, "torch_dtype": "float16"}})
    out = geometry_offline(cache, "acme/tiny-llama")
    assert json.loads(out.stdout) == {"num_layers": 4, "num_kv_heads": 2, "head_dim": 64, "dtype": "bfloat16"}, \
        out.stderr
    out = geometry_offline(cache, "acme/tiny-llama@v2")
    assert json.loads(out.stdout) == {"num_layers": 4, "num_kv_heads": 4, "head_dim": 64, "dtype": "float16"}, \
        out.stderr
    out = geometry_offline(cache, "acme/not-cached")
    assert out.stdout.startswith("InvalidArgument --model acme/not-cached: no such preset, folder or file, and "
                                 "its config.json cannot be had from the Hugging Face hub"), out.stdout + out.stderr


def test_serve_takes_a_hub_id(tmp_path):
    cache = cache_with(tmp_path / "hub", "acme/tiny-llama", {"main": LLAMA})
    env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    code = ("from kvpager.serve_options import build_spec\n"
            "o = dict(model='acme/tiny-llama', layers=None, kv_heads=None, head_dim=None, dtype=None,\n"
            "         block_size=None, blocks=10, memory=None, host_blocks=None, host_memory=None)\n"
            "s = build_spec(o)\nprint(s.num_layers, s.num_kv_heads, s.head_dim, s.dtype, s.num_blocks)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["4", "2", "64", "bfloat16", "10"], out.stderr


def test_paths_are_not_hub_ids(tmp_path):
    """A path that exists is read as a path; one that does not, and cannot be a hub id
    (an absolute path, more than one slash, a .json name), is named missing at once."""
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "config.json").write_text(json.dumps(LLAMA))
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert sizing.model_geometry("acme")["num_kv_heads"] == 2  # (a folder named like an id)
        for missing in ("nowhere/deeper/config.json", "missing.json", str(tmp_path / "missing")):
            with pytest.raises(InvalidArgument, match=r"no such preset, and no"):
                sizing.model_geometry(missing)
    finally:
        os.chdir(here)


def test_without_huggingface_hub_the_id_is_refused_by_name(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(InvalidArgument, match="needs huggingface_hub"):
        sizing.model_geometry("acme/tiny-llama")
