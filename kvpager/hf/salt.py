"""The default prefix-cache salt of a transformers model (`default_salt`): blocks
may be shared only between workers running the same weights, so K/V computed
by one model is never matched by another."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from kvpager.errors import InvalidArgument

_CACHE_ATTR = "_kvpager_salt"  # on the model: (cache key, salt)
_NOT_KV = frozenset({"transformers_version", "architectures", "name_or_path", "use_cache", "output_attentions",
                     "output_hidden_states", "return_dict", "dtype", "torch_dtype"})
SAMPLES = 64  # entries per tensor in the cache key


def call_salt(model: Any, salt: Any, what: str) -> str | bytes:
    """The salt a call of ``model`` runs under: ``salt`` (a str or bytes), or the
    model's `default_salt` for None. InvalidArgument for anything else, before
    anything is allocated: a per-prompt list was taken by a plain model's pool
    but broke a long-context call's salt and was merged into one string by a model
    with recurrent layers (its held states are keyed by one salt a call)."""
    if salt is None:
        return default_salt(model)
    if not isinstance(salt, (str, bytes)):
        raise InvalidArgument(f"{what}: salt must be a str, bytes or None (the model's default salt), one for "
                              f"the call; got {type(salt).__name__}")
    return salt


def default_salt(model: Any, refresh: bool = False) -> str:
    """Prefix-cache salt: blocks may be shared only between workers running the
    same weights, so K/V computed by one model is never matched by another.

    The model's class and dtype and a SHA-256 over its config (minus fields that
    do not change K/V) and every parameter and buffer: name, dtype, shape and
    all bytes (buffers shape K/V too: the rotary embedding's frequencies, a
    quantized layer's weights). Workers that load the same checkpoint get the
    same salt, whatever its path; a model with one layer changed (a merged
    adapter, rescaled rotary frequencies) gets another.

    Cost: hashing reads every weight once (tensors hashed in parallel threads):
    on a busy 2-core CPU, 4.6 s for a 1.1B-parameter Llama in float32 (4.4 GB),
    3.2 s in bfloat16. The salt is cached on the model and reused while every
    parameter keeps its storage, version counter and a strided sample of its
    values (3-7 ms to check on that model): an edit made through ``param.data``
    that changes none of the sampled entries is not seen; pass ``refresh=True``
    after such an edit, or pass your own salt to `generate`."""
    from kvpager.hf.checks import check_is_model

    check_is_model(model)
    # tied weights once; a buffer under its own prefix (a name never a parameter's)
    named = list(model.named_parameters()) + [("buffer:" + n, b) for n, b in _kv_buffers(model)]
    config = _config_bytes(model.config)
    key = _cache_key(named, config)
    cached = model.__dict__.get(_CACHE_ATTR)
    if not refresh and key is not None and cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256(config)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL on large buffers
        for (name, p), d in zip(named, pool.map(lambda np_: _tensor_digest(np_[1]), named)):
            digest.update(f"{name}|{str(p.dtype)}|{tuple(p.shape)}|".encode() + d)
    dtype = next((p.dtype for n, p in named if not n.startswith("buffer:")), None)
    salt = f"{type(model).__name__}|{dtype}|{digest.hexdigest()[:32]}"
    if key is not None:
        model.__dict__[_CACHE_ATTR] = (key, salt)
    return salt


def _rewritten_each_pass(module: Any) -> bool:
    """Whether ``module`` is a rotary embedding that rewrites its frequencies by the
    length of each forward pass (dynamic NTK scaling, longrope: transformers'
    ``dynamic_rope_update``), from its ``original_inv_freq`` and the config."""
    kind = getattr(module, "rope_type", None)
    kinds = kind.values() if isinstance(kind, dict) else [kind]
    return any(isinstance(k, str) and ("dynamic" in k or k == "longrope") for k in kinds)


def _kv_buffers(model: Any) -> list[tuple[str, torch.Tensor]]:
    """The buffers of ``model`` that K/V depend on as they are: each once, all but the
    frequencies a dynamic rotary embedding rewrites at every pass (its ``*inv_freq``
    but ``*original_inv_freq``, which with the config says what they will be): the
    salt of a longrope model moved with the length of its last pass, and every call
    hashed every weight again (their version counters moved each pass)."""
    out, seen = [], set()
    for prefix, module in model.named_modules():
        rewritten = _rewritten_each_pass(module)
        for name, buf in module.named_buffers(recurse=False, remove_duplicate=False):
            if rewritten and name.endswith("inv_freq") and not name.endswith("original_inv_freq"):
                continue  # (before `seen`: after a short pass it is the original tensor itself)
            if buf is None or id(buf) in seen:
                continue
            seen.add(id(buf))
            out.append((f"{prefix}.{name}" if prefix else name, buf))
    return out


def _config_bytes(config: Any) -> bytes:
    d = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _NOT_KV}
    return json.dumps(d, sort_keys=True, default=str).encode()


def _tensor_digest(p: torch.Tensor) -> bytes:
    t = p.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype.is_floating_point or t.dtype.is_complex:  # NumPy lacks bfloat16: hash the raw bits
        t = t.view(torch.uint8)
    return hashlib.sha256(memoryview(t.numpy()).cast("B")).digest()


def _cache_key(named: list[tuple[str, torch.Tensor]], config: bytes) -> tuple[Any, ...] | None:
    """What must be unchanged for a cached salt to hold: each parameter's and
    buffer's storage, version counter and a strided sample of its values. None
    where parameters have no version counter (made in inference mode): no
    caching. A buffer without one (replaced in inference mode: a dynamic rotary
    embedding's frequencies) is known by its storage and sample alone."""
    try:
        meta = tuple((n, p.data_ptr(), _version(p, n), p.dtype, tuple(p.shape)) for n, p in named)
    except RuntimeError:
        return None
    with torch.no_grad():
        samples = [p.detach().reshape(-1)[:: max(1, p.numel() // SAMPLES)][:SAMPLES] for _, p in named]
        by_kind: dict[Any, list[torch.Tensor]] = {}
        for s in samples:
            by_kind.setdefault((s.device, s.dtype), []).append(s)
        sample = b"".join(_tensor_digest(torch.cat(v)) for v in by_kind.values())
    return meta, config, sample


def _version(t: torch.Tensor, name: str) -> int:
    """``t``'s version counter; -1 for a buffer made in inference mode (a parameter's
    RuntimeError goes on)."""
    try:
        return t._version
    except RuntimeError:
        if name.startswith("buffer:"):
            return -1
        raise
