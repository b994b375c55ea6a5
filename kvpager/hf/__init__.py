"""Hugging Face transformers on kvpager: a causal LM generating with its KV
cache in a kvpager pool (embedded `KVPool` or a daemon `Client`).

Install with ``pip install 'kvpager[torch]'`` (torch and transformers), then::

    from kvpager.hf import generate, spec_for_model

    pool = KVPool(spec_for_model(model, num_blocks=4096))
    outputs = generate(model, pool, [prompt_ids, ...], max_new_tokens=64)

Modules: `kvpager.hf.generation` (step plans, `PagedGeneration`),
`kvpager.hf.generate_call` (`generate`: a call's arguments resolved against the
model's generation config), `kvpager.hf.attention` (the attention function, the packed forward
pass), `kvpager.hf.model` (windows, attention arguments, the KV geometry),
`kvpager.hf.salt` (the default salt), `kvpager.hf.recurrent` (models with
recurrent layers), `kvpager.hf.fp8` (FP8 scales calibrated from a sample prompt),
`kvpager.hf.graphs` (CUDA graphs of the decode step), `kvpager.hf.padding` (a
tokenizer's ``attention_mask`` applied to padded prompts), `kvpager.hf.sampling`
(sampled decoding: `Sampling`), `kvpager.hf.paged_cache` (`PagedCache`: a transformers
``Cache`` in a kvpager pool, for transformers' own ``generate``). ``import kvpager``
never imports this package (nor torch).
"""

try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as e:  # say what to install, not only what is missing
    raise ImportError(f"kvpager.hf needs torch and transformers: pip install 'kvpager[torch]' ({e})") from e

from kvpager.hf.beams import Beams, beam_search
from kvpager.hf.captured_steps import CapturedSteps
from kvpager.hf.fp8 import calibrate_kv_scales
from kvpager.hf.generate_call import generate
from kvpager.hf.generation import (
    ATTN_IMPLEMENTATION,
    PagedBatch,
    PagedGeneration,
    check_model,
    kvpager_attention,
    model_geometry,
    paged_attention,
    paged_forward,
    register,
    spec_for_model,
)
from kvpager.hf.graphs import DecodeGraphs, bucket_for
from kvpager.hf.logprobs import Completion
from kvpager.hf.model import check_call, layer_fit, layer_map
from kvpager.hf.paged_cache import PagedCache
from kvpager.hf.salt import default_salt
from kvpager.hf.sampling import Sampling
from kvpager.hf.scoring import Scores, score
from kvpager.hf.switching import OutsidePagedPass
from kvpager.hf.windows import layer_chunks, layer_windows

__all__ = [
    "ATTN_IMPLEMENTATION",
    "Beams",
    "CapturedSteps",
    "Completion",
    "DecodeGraphs",
    "OutsidePagedPass",
    "PagedBatch",
    "PagedCache",
    "PagedGeneration",
    "Sampling",
    "Scores",
    "beam_search",
    "bucket_for",
    "calibrate_kv_scales",
    "check_call",
    "check_model",
    "default_salt",
    "generate",
    "kvpager_attention",
    "layer_chunks",
    "layer_fit",
    "layer_map",
    "layer_windows",
    "model_geometry",
    "paged_attention",
    "paged_forward",
    "register",
    "score",
    "spec_for_model",
]
