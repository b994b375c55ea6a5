"""Rotary embeddings whose frequencies follow the length of each forward pass.

transformers' ``dynamic_rope_update`` rewrites a rotary embedding's
frequencies at every pass from the pass's longest position: dynamic NTK
scaling rescales them to that length once it passes the model's original
context (``original_max_seq_len``); longrope (Phi-3, Phi-3.5, Phi-4-mini)
takes its long factors once it passes ``original_max_position_embeddings``,
and Phi-3's generation then drops its cache and computes every K again with
them. For one sequence alone, transformers' tokens depend on where its
passes end; kvpager packs several sequences (and a cached prefix's tail)
into one pass, so a pass's length is no one sequence's.

What kvpager reproduces exactly, and checks before anything is allocated
(`rope_salt`): a call whose every sequence stays within the original context
to its last token (every pass takes the original frequencies, whatever it
packs), and, for longrope, a call whose every prompt is already past it
(every pass takes the long factors: each one ends past the limit). Their
blocks are cached apart (the long ones under their own salt). A call that
would cross the limit, mix the two, or, with dynamic scaling, pass it is
refused by name: its K/V would not be transformers'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvpager.errors import InvalidArgument

#: What a long-regime call's salt gets appended: its blocks were computed with the long factors.
LONG_SALT = "\x00longrope-long"


def pass_dependent(model: Any) -> tuple[str | None, list[int]]:
    """("dynamic" or "longrope" (dynamic wins where both appear), the position
    counts up to which each such rotary embedding of ``model`` keeps its
    original frequencies); (None, []) for a model without one."""
    kind, limits = None, []
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)
        types = rope_type.items() if isinstance(rope_type, dict) else [(None, rope_type)]
        for layer_type, t in types:
            if not isinstance(t, str):
                continue
            if "dynamic" in t:
                kind = "dynamic"
                limits.append(_original_context(module))
            elif t == "longrope":
                kind = kind or "longrope"
                params = getattr(getattr(module, "config", None), "rope_parameters", None) or {}
                if layer_type is not None:
                    params = params.get(layer_type, {})
                limit = params.get("original_max_position_embeddings")
                limits.append(int(limit) if isinstance(limit, int) else _original_context(module))
    return kind, limits


def _original_context(module: Any) -> int:
    """The positions a rotary embedding keeps its original frequencies up to: its
    ``original_max_seq_len``, else its config's ``max_position_embeddings``; 0
    where neither says (every call past position 0 refused: nothing to go by)."""
    for value in (getattr(module, "original_max_seq_len", None),
                  getattr(getattr(module, "config", None), "max_position_embeddings", None)):
        if isinstance(value, int) and value > 0:
            return value
    return 0


def rope_salt(model: Any, salt: Any, prompt_lens: Sequence[int], most_lens: Sequence[int], what: str,
              passes_from: int | None = None) -> Any:
    """``salt`` for a call of ``model`` over prompts of ``prompt_lens`` tokens whose
    passes end at ``most_lens`` positions at most (a generation's: its prompt and its
    new tokens but the last, which is never fed), after checking that
    kvpager reproduces transformers' rotary frequencies for it (the module
    docstring): unchanged, or, for a longrope call past the limit, with
    `LONG_SALT` appended. ``passes_from``: the fewest tokens a pass over a
    prompt may end at (a call that runs a prompt in parts); None: every pass
    ends at its prompt's end or later. InvalidArgument naming the limit
    otherwise."""
    kind, limits = pass_dependent(model)
    if kind is None or not prompt_lens:
        return salt
    lo, hi = min(limits), max(limits)
    if max(most_lens) <= lo:
        return salt  # every pass of the original frequencies
    if kind == "dynamic":
        raise InvalidArgument(
            f"{what}: the model's dynamic rotary scaling rescales each forward pass by its length past {lo} "
            f"positions, and K/V computed in earlier passes keep the frequencies of theirs: kvpager's passes "
            f"(several sequences packed, cached prefixes) would not give transformers' tokens. Keep prompts "
            f"and new tokens within {lo} (this call reaches {max(most_lens)})")
    if min(prompt_lens) > hi and (passes_from is None or passes_from > hi):
        return salt + (LONG_SALT.encode() if isinstance(salt, bytes) else LONG_SALT)
    crossing = [n for n, m in zip(prompt_lens, most_lens) if n <= hi < m]
    reason = (f"a sequence of {crossing[0]} prompt tokens would pass it as it generates (transformers then "
              "computes its whole cache again with the long factors)" if crossing else
              f"prompts of {min(prompt_lens)} and {max(prompt_lens)} tokens take different factors" if
              min(prompt_lens) <= hi else
              f"parts of {passes_from} tokens would run the first ones with the short factors")
    raise InvalidArgument(
        f"{what}: the model's longrope rotary embedding takes its long factors for a forward pass that ends "
        f"past {hi} positions; {reason}. kvpager runs a call whose sequences all stay within {lo} positions, "
        "or all begin past it (every pass over them longer): split the call, or keep max_new_tokens within "
        "the limit")
