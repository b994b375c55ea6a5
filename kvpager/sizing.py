"""Sizing a pool as serving engines do: geometry from a Hugging Face model's
``config.json``, memory as a fraction of what the device has free.

- `model_geometry(path)`: layers, KV heads, head dim and dtype from a model
  folder or its ``config.json`` (a multimodal config's ``text_config`` when the
  language model's numbers live there), as transformers reads them: fields the
  file leaves to its config class filled as the class fills them
  (`kvpager.config_file`, where transformers is installed); beyond those,
  ``num_key_value_heads`` defaults to ``num_attention_heads`` (multi-head
  attention), ``head_dim`` to ``hidden_size / num_attention_heads``, the
  dtype is ``dtype`` (``torch_dtype`` in older configs).
- `memory_budget(text, device)`: ``--memory`` as bytes (``8G``) or as a
  fraction of free memory (``0.9`` or ``90%``, as vLLM's
  ``--gpu-memory-utilization``, but of what is free when the daemon starts,
  since the weights live in other processes). On a GPU: free device memory
  (``cudaMemGetInfo``). On the CPU backend the pool lives in POSIX shared
  memory, so: the smaller of available RAM (``MemAvailable``) and free space
  in ``/dev/shm``, less the host (swap) pool, which lives there too, after the
  segments of dead daemons are swept (`kvpager.shm.sweep_stale`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from kvpager.config_file import (  # noqa: F401 - class_defaults, GEOMETRY_FIELDS: read through this module too
    GEOMETRY_FIELDS,
    check_layer_counts,
    class_defaults,
    defaults_apart,
    read_config,
)
from kvpager.errors import BackendUnavailable, InvalidArgument, UnsupportedConfiguration
from kvpager.layer_geometry import fit, layer_getters

_DTYPES = {"float16": "float16", "half": "float16", "bfloat16": "bfloat16", "float32": "float32", "float": "float32"}


#: model types whose attention function receives K/V tiled to every query head (JetMoE's
#: mixture of attention heads: its 16 K/V heads repeated for each of its 2 experts a token)
KV_PER_QUERY_HEAD = frozenset({"jetmoe"})


def kv_heads_field(get: Callable[[str], Any]) -> Any:
    """The K/V heads a config's attention makes, as its fields give them (None where
    unset: one a query head): ``num_key_value_heads``, but for Falcon its
    attention's own rule (transformers' ``FalconAttention``), whatever
    ``num_key_value_heads`` says (set by hand, or absent from older configs):
    ``num_kv_heads`` under ``new_decoder_architecture`` (Falcon-40B/180B) or
    without ``multi_query`` (Falcon-RW), else one (multi-query: Falcon-7B, the
    default)."""
    if get("model_type") == "falcon":
        if get("new_decoder_architecture") or get("multi_query") is False:
            return get("num_kv_heads")
        return 1
    return get("num_key_value_heads")


#: ``layer_types`` kinds of layers that hold no K/V: recurrent mixers (linear attention, and the
#: state-space / Mamba layers transformers names so: Qwen3.5, Qwen3-Next, Jamba, Bamba, ...; LFM2's
#: short convolutions, "conv") and layers of a feed-forward block alone (Nemotron-H's "mlp", "moe")
NO_KV_KINDS = frozenset({"linear_attention", "conv", "mlp", "moe"})


def kv_sources(get: Callable[[str], Any], layers: int) -> list[int]:
    """For each of ``layers`` layers, the layer whose K/V it attends over: itself, or,
    for a layer that reuses an earlier layer's K/V, that layer; -1 for a layer that
    attends over none (a ``layer_types`` kind of `NO_KV_KINDS`). Gemma-3n's last
    ``num_kv_shared_layers`` layers each reuse the last layer of their
    ``layer_types`` kind before them (transformers' ``kv_sharing_modes``: that
    layer "store"s, they "reuse"); a config may name the sources instead
    (``kv_source_layers``). Such a model stores K/V for its source layers only: a
    kvpager pool holds those (`pool_layers`). ``get``: the config's attribute or
    key getter. InvalidArgument for sharing kvpager cannot follow (modes other than
    "store" and "reuse", a source that reuses in turn, or one after its layer)."""
    shared = get("num_kv_shared_layers") or 0
    named = get("kv_source_layers")
    kinds = get("layer_types")
    modes = get("kv_sharing_modes")  # transformers' configs compute it; a config.json has none
    for name, value in (("kv_source_layers", named), ("layer_types", kinds), ("kv_sharing_modes", modes)):
        if value is not None and not isinstance(value, (list, tuple)):
            raise InvalidArgument(f"{name} must be a list, one entry a layer, got {value!r:.60}")
    if kinds is not None and not all(isinstance(k, str) for k in kinds):
        raise InvalidArgument(f"layer_types must name each layer's kind, got {list(kinds)!r:.60}")
    if named is not None:
        sources = list(named)
    elif shared:
        if type(shared) is not int or not 0 < shared < layers or not kinds or len(kinds) != layers:
            raise InvalidArgument(f"num_kv_shared_layers={shared!r} with {layers} layers of types {kinds!r}: "
                                  "kvpager follows the last shared layers reusing an earlier layer of their type")
        first = layers - shared
        producer = {kinds[j]: j for j in range(first)}  # the last of each kind before the shared layers
        sources = list(range(first)) + [producer.get(kinds[i], -1) for i in range(first, layers)]
    else:
        sources = list(range(layers))
    if kinds is not None and NO_KV_KINDS & set(kinds):
        if named is not None or shared:
            raise InvalidArgument("layers that reuse another's K/V beside layers without K/V "
                                  f"({sorted(NO_KV_KINDS & set(kinds))}): not a layout kvpager follows")
        if len(kinds) != layers:
            raise InvalidArgument(f"layer_types names {len(kinds)} layers, the config has {layers}")
        return [-1 if k in NO_KV_KINDS else i for i, k in enumerate(kinds)]
    if len(sources) != layers or any(type(s) is not int or not (s == i or 0 <= s < i and sources[s] == s)
                                     for i, s in enumerate(sources)):
        raise InvalidArgument(f"layers reuse K/V of layers {sources}: each must reuse an earlier layer that "
                              "stores its own")
    if modes is not None:
        other = sorted({str(m) for m in modes} - {"None", "store", "reuse"})
        if other:
            raise InvalidArgument(f"kvpager serves layers that store or reuse K/V; kv_sharing_modes here: {other}")
        if [m == "reuse" for m in modes] != [s != i for i, s in enumerate(sources)]:
            raise InvalidArgument(f"kv_sharing_modes {list(modes)} do not match the layers' sources {sources}")
    return sources


def pool_layers(sources: list[int]) -> list[int]:
    """For each layer (`kv_sources`), the pool layer that holds the K/V it attends over
    (the pool holds the layers that store K/V, in order); -1 for a layer without K/V."""
    own = {layer: i for i, layer in enumerate(s for j, s in enumerate(sources) if s == j)}
    return [own[s] if s >= 0 else -1 for s in sources]


def attention_dims(get: Callable[[str], Any]) -> tuple[Any, Any, bool]:
    """(q and k head dim, v head dim, a K/V head per query head) of the tensors a
    transformers config's attention passes to its attention function, its fields
    read by ``get(name)`` (None where unset). q/k: ``qk_head_dim``, else under
    latent attention (``kv_lora_rank``: DeepSeek-V2/V3, MiniCPM3, ...)
    ``qk_nope_head_dim + qk_rope_head_dim``, else ``head_dim``, else
    ``kv_channels`` (Megatron-style configs: JetMoE, ChatGLM) (None: the
    caller's ``hidden_size / num_attention_heads``); v: ``v_head_dim`` as
    given, None where unset (it is q's). Latent attention attends with K/V
    decompressed for every query head (as transformers' does), and the types of
    `KV_PER_QUERY_HEAD` with K/V tiled to them, so their pools have a K/V head
    per query head."""
    rank = get("kv_lora_rank")
    latent = type(rank) is int and rank > 0
    qk = get("qk_head_dim")
    if qk is None:
        nope, rope = get("qk_nope_head_dim"), get("qk_rope_head_dim")
        if latent and (nope is not None or rope is not None):
            if type(nope) is not int or type(rope) is not int:  # a typo here must not size another head dim
                raise InvalidArgument(f"latent attention needs integer qk_nope_head_dim and qk_rope_head_dim, "
                                      f"got {nope!r} and {rope!r}")
            qk = nope + rope
        else:
            qk = get("head_dim")
            if qk is None:
                qk = get("kv_channels")
    return qk, get("v_head_dim"), latent or get("model_type") in KV_PER_QUERY_HEAD


#: older names of ``layer_types`` kinds, as transformers remaps them when it loads a config
LEGACY_KINDS = {"mamba": "linear_attention", "attention": "full_attention"}
#: transformers' defaults of (attn_layer_period, attn_layer_offset) by model type
_PERIODS = {"jamba": (8, 4), "zamba": (6, 4)}
#: RecurrentGemma's ``block_types``, repeated over its layers (its attention blocks attend locally,
#: in a window), and transformers' default of them
_RECURRENT_GEMMA_KINDS = {"recurrent": "linear_attention", "attention": "sliding_attention"}
_RECURRENT_GEMMA_BLOCKS = ("recurrent", "recurrent", "attention")
#: Nemotron-H's ``hybrid_override_pattern``, a character a layer
PATTERN_KINDS = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}


def layer_fields(cfg: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """``cfg`` with ``layer_types``, ``num_hidden_layers`` and ``head_dim`` as
    transformers' config classes resolve them from the other names a
    ``config.json`` may give them under: ``layers_block_type`` (Zamba, Nemotron-H,
    ...), Nemotron-H's ``hybrid_override_pattern``, Jamba's
    ``attn_layer_period`` / ``attn_layer_offset`` (Zamba's after its first three
    layers; transformers' defaults where a config of those types gives none),
    Bamba's ``attn_layer_indices``, LFM2's ``full_attn_idxs``, RecurrentGemma's
    ``block_types`` (a cycle of blocks); older kind names (``mamba``,
    ``attention``: `LEGACY_KINDS`); Zamba's ``attention_head_dim`` (twice the
    hidden size a head where unset). A dict that names none is returned as it is."""
    out = dict(cfg)
    kinds = out.get("layer_types", out.get("layers_block_type"))
    n, model_type = out.get("num_hidden_layers"), out.get("model_type")
    pattern = out.get("hybrid_override_pattern")
    if kinds is None and isinstance(pattern, str):
        if set(pattern) - PATTERN_KINDS.keys():
            raise InvalidArgument(f"{where}: hybrid_override_pattern {pattern!r} has characters other than "
                                  f"{''.join(PATTERN_KINDS)}")
        kinds = [PATTERN_KINDS[c] for c in pattern]
    elif kinds is None and type(n) is int and isinstance(out.get("attn_layer_indices"), list):  # Bamba
        attends = set(out["attn_layer_indices"])
        kinds = ["full_attention" if i in attends else "linear_attention" for i in range(n)]
    elif kinds is None and type(n) is int and isinstance(out.get("full_attn_idxs"), list):  # LFM2
        attends = set(out["full_attn_idxs"])
        kinds = ["full_attention" if i in attends else "conv" for i in range(n)]
    elif kinds is None and type(n) is int and (isinstance(out.get("block_types"), list)
                                               or model_type == "recurrent_gemma"):  # RecurrentGemma
        cycle = out.get("block_types", list(_RECURRENT_GEMMA_BLOCKS))
        if not isinstance(cycle, list) or not cycle or not all(isinstance(b, str) and b in _RECURRENT_GEMMA_KINDS
                                                               for b in cycle):
            raise InvalidArgument(f"{where}: block_types must list {' / '.join(_RECURRENT_GEMMA_KINDS)} blocks, "
                                  f"got {cycle!r:.60}")
        kinds = [_RECURRENT_GEMMA_KINDS[cycle[i % len(cycle)]] for i in range(n)]
    elif kinds is None and type(n) is int and ("attn_layer_period" in out or model_type in _PERIODS):
        period, offset = (out.get(k, d) for k, d in zip(("attn_layer_period", "attn_layer_offset"),
                                                           _PERIODS.get(model_type, (None, 0))))
        if type(period) is not int or period < 1 or type(offset) is not int:
            raise InvalidArgument(f"{where}: attn_layer_period / attn_layer_offset must be ints (a period >= 1), "
                                  f"got {period!r} / {offset!r}")
        if model_type == "zamba":  # (its first three layers fixed, the period counted after them)
            kinds = ["linear_attention"] * 2 + ["hybrid"] + [
                "hybrid" if i % period == offset else "linear_attention" for i in range(n - 3)]
        else:  # Jamba's
            kinds = ["full_attention" if i % period == offset else "linear_attention" for i in range(n)]
    if isinstance(kinds, (list, tuple)):
        out["layer_types"] = [LEGACY_KINDS.get(k, k) if isinstance(k, str) else k for k in kinds]
        if n is None:  # (Nemotron-H's count is its layer types')
            out["num_hidden_layers"] = len(kinds)
    if out.get("head_dim") is None:
        if out.get("attention_head_dim") is not None:
            out["head_dim"] = out["attention_head_dim"]
        elif model_type in ("zamba", "zamba2") and type(out.get("hidden_size")) is int \
                and type(out.get("num_attention_heads")) is int and out["num_attention_heads"] > 0:
            out["head_dim"] = 2 * out["hidden_size"] // out["num_attention_heads"]
    return out


def config_geometry(config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """`PoolSpec` fields (num_layers: the layers that store K/V, `kv_sources`;
    num_kv_heads, head_dim, and dtype when the config names one) from a
    transformers config dict. Where v's head dim differs
    from q's and k's (`attention_dims`), the pool holds the wider (the client pads
    the other: `kvpager.hf.attention`); where layers differ in geometry, a pool
    fitted to all (`kvpager.layer_geometry`)."""
    if not isinstance(config, dict):
        raise InvalidArgument(f"{where}: a config is a dict (a JSON object), got {type(config).__name__}")
    check_layer_counts(config, where)
    text = config.get("text_config")
    cfg = {**config, **text} if isinstance(text, dict) and "num_hidden_layers" not in config else config
    cfg = layer_fields(cfg, where)

    if "num_hidden_layers" not in cfg or "num_attention_heads" not in cfg:
        raise InvalidArgument(f"{where}: needs num_hidden_layers and num_attention_heads (is it a "
                              "transformers causal LM config?)")
    layers = _positive(where, "num_hidden_layers", cfg["num_hidden_layers"])
    heads = _positive(where, "num_attention_heads", cfg["num_attention_heads"])
    sources = kv_sources(cfg.get, layers)
    stored = len({s for s in sources if s >= 0})  # layers that reuse another's K/V, or hold none, store none
    if not stored:
        raise InvalidArgument(f"{where}: no layer attends (layer_types {sorted(set(cfg['layer_types']))}); "
                              "a model without attention layers has no K/V for kvpager to hold")
    getters = layer_getters(cfg, cfg.get, layers)
    if getters is None:
        kv_heads, head_dim = _layer_dims(cfg.get, heads, where)
    else:  # layers of other geometry (Gemma-4's full layers): one pool fitted to all
        counts = {getters[i]("num_attention_heads") for i, s in enumerate(sources) if s == i} - {None}
        if counts - {heads}:
            raise UnsupportedConfiguration(f"{where}: layers of {sorted(counts | {heads}, key=str)} query heads "
                                           "(per_layer_config); kvpager serves models whose layers have one "
                                           "count of query heads")
        dims = [_layer_dims(getters[i], heads, f"{where}: layer {i}") for i, s in enumerate(sources) if s == i]
        kv_heads, head_dim = fit(dims, heads, where)
    out: dict[str, Any] = dict(num_layers=stored, num_kv_heads=kv_heads, head_dim=head_dim)
    # (`dtype` first, as transformers 5 reads it, `torch_dtype` its earlier name: a config naming both,
    # differently, loads as its `dtype`)
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype")
    if dtype is not None:
        name = _DTYPES.get(str(dtype).removeprefix("torch."))
        if name is None:
            raise UnsupportedConfiguration(f"{where}: dtype {dtype!r} is not one kvpager stores "
                                           f"({', '.join(sorted(set(_DTYPES.values())))}); pass --dtype")
        out["dtype"] = name
    return out


def _positive(where: str, name: str, value: Any) -> int:
    if type(value) is not int or value < 1:
        raise InvalidArgument(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def _layer_dims(get: Callable[[str], Any], heads: int, where: str) -> tuple[int, int]:
    """(K/V heads, head dim) of the attention a config's fields describe (``get``:
    the config's, or one layer's: `kvpager.layer_geometry`)."""
    qk, v, per_query_head = attention_dims(get)
    kv = kv_heads_field(get)
    kv_heads = heads if per_query_head or kv is None else _positive(where, "num_key_value_heads", kv)
    if heads % kv_heads:
        raise InvalidArgument(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                              f"{kv_heads}")
    if qk is not None:
        head_dim = _positive(where, "head_dim", qk)
    else:
        hidden = _positive(where, "hidden_size", get("hidden_size"))
        if hidden % heads:
            raise InvalidArgument(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads "
                                  f"{heads}, and there is no head_dim")
        head_dim = hidden // heads
    if v is not None:
        head_dim = max(head_dim, _positive(where, "v_head_dim", v))
    return kv_heads, head_dim


def model_geometry(path: str) -> dict[str, Any]:
    """`config_geometry` of the ``config.json`` at ``path`` (a file or a model folder),
    the fields it leaves to its transformers class filled as transformers fills them
    (`class_defaults`, in a child process: `defaults_apart`)."""
    return config_geometry(defaults_apart(read_config(path), path), path)


_FRACTION = re.compile(r"\s*(\d*\.\d+|\d+\.\d*)\s*|\s*(\d+(?:\.\d+)?)\s*%\s*")


def parse_fraction(text: str) -> float | None:
    """``0.9`` or ``90%`` -> 0.9; None if ``text`` is not written as a fraction
    (a plain integer or a size with a unit is bytes)."""
    m = _FRACTION.fullmatch(str(text))
    if not m:
        return None
    value = float(m.group(1)) if m.group(1) is not None else float(m.group(2)) / 100
    if not 0 < value <= 1:
        raise InvalidArgument(f"--memory {text}: a fraction of free memory must be in (0, 1] (or up to 100%); "
                              "for bytes give a unit, e.g. 8G")
    return value


def cpu_available_bytes(shm: str = "/dev/shm") -> tuple[int, str]:
    """What a CPU pool can take: the smaller of MemAvailable and free space in ``shm``, and which."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        ram = kib * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        raise BackendUnavailable("--memory as a fraction needs /proc/meminfo (MemAvailable); "
                                 "give a size instead, e.g. --memory 8G") from None
    try:
        st = os.statvfs(shm)
        free_shm = st.f_bavail * st.f_frsize
    except OSError:
        return ram, "available RAM"
    return (free_shm, f"free space in {shm}") if free_shm < ram else (ram, "available RAM")


def gpu_free_bytes(device: str) -> int:
    """Free memory of the CUDA device ``device`` now (``cudaMemGetInfo``)."""
    from kvpager.backends import parse_device

    _, index = parse_device(device)
    try:
        import cupy

        with cupy.cuda.Device(index):
            free, _total = cupy.cuda.runtime.memGetInfo()
    except Exception as e:
        raise BackendUnavailable(f"cannot read the free memory of {device}: {e}") from None
    return int(free)


def memory_budget(text: str, device: str, host_bytes: int = 0) -> tuple[int, str]:
    """Bytes for the device pool from ``--memory`` (a size, or a fraction of free
    memory), and a line saying how they were found."""
    from kvpager.env import parse_size

    fraction = parse_fraction(text)
    if fraction is None:
        try:
            return parse_size(text), f"--memory {text}"
        except ValueError as e:
            raise InvalidArgument(f"--memory: {e}, or a fraction of free memory such as 0.9") from None
    if device.startswith("cuda"):
        free, what = gpu_free_bytes(device), f"free memory of {device}"
    else:
        from kvpager.shm import sweep_stale

        # A daemon killed by SIGKILL (or the OOM killer) left its segments: they hold
        # /dev/shm and RAM until the next daemon sweeps them, so sweep before
        # measuring (once they were counted, and a restarted 90% daemon got 9%).
        sweep_stale()
        free, what = cpu_available_bytes()
        free -= host_bytes  # the host pool lives in shared memory too
        what += " less the host pool" if host_bytes else ""
    budget = int(max(free, 0) * fraction)
    return budget, f"{fraction * 100:g}% of {what} ({free} bytes)"
