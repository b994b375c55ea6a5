"""Padded prompts: a tokenizer's ``attention_mask`` applied to its ``input_ids``.

``tok(texts, padding=True, return_tensors="pt")`` gives every prompt the
length of the longest, filled with pad tokens on the left or the right, and an
``attention_mask`` with 1 for the real tokens and 0 for the pads. kvpager packs
each prompt's own tokens into its pass (no padding), so `strip_padding` cuts
each row to the run where its mask is 1. Only padding is stripped: a mask whose
1s are not one run in a row (a 0 between them), a row of 0s, a mask of another
shape than the prompts or values other than 0 and 1 are refused by name.
`warn_if_padded` warns where a batch without a mask looks padded.
`token_lists` turns what a caller passes as prompts into lists of token ids
(in their order: a set's or a dict's, `unordered`, refused),
`new_token_limits` its ``max_new_tokens`` into one a prompt, `stop_sequences`
its stop sequences by their last token; `prompts_given` takes the prompts under
either of their names.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import torch

from kvpager.errors import InvalidArgument
from kvpager.validate import all_type, described, integer, is_int

__all__ = ["new_token_limits", "pad_token_ids", "prompts_given", "stop_sequences", "strip_padding", "token_lists",
           "unordered", "warn_if_padded"]

_MASK_KINDS = "biuf"  # bool, int, unsigned, float dtypes: their values are checked to be 0 or 1


def _shape(x: Any) -> tuple[int, ...] | None:
    shape = getattr(x, "shape", None)
    return tuple(shape) if isinstance(x, (np.ndarray, torch.Tensor)) and shape is not None else None


def _scalar(v: Any) -> bool:
    return (isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim == 0) or isinstance(v, (bool, int, float, np.generic))


def _zero_or_one(v: Any) -> bool:
    return isinstance(v, (bool, int, float, np.number)) and not isinstance(v, np.complexfloating) and v in (0, 1)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor on the host as NumPy (a floating one as float32 or float64: bfloat16 has no NumPy type)."""
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() and t.dtype != torch.float64 else t).numpy()


def _mask_row(row: Any, i: int, name: str) -> np.ndarray:
    try:
        arr = _numpy(row) if isinstance(row, torch.Tensor) else np.asarray(row)
    except (ValueError, TypeError) as e:  # a ragged row of rows
        raise InvalidArgument(f"{name}[{i}] must be a row of 0s and 1s ({e})") from None
    if arr.ndim != 1:
        what = f"{arr.item()!r}, not a row" if arr.ndim == 0 else f"a {arr.ndim}-D row"
        raise InvalidArgument(f"{name}[{i}] is {what}: {name} must have the prompts' shape, one row of 0s "
                              "and 1s for each prompt")
    if arr.dtype.kind in _MASK_KINDS:
        bad = [] if arr.dtype.kind == "b" else arr[(arr != 0) & (arr != 1)][:1].tolist()
    else:  # an object or string array: each value must be a number that is 0 or 1
        bad = [v for v in arr.tolist() if not _zero_or_one(v)][:1]
        arr = np.asarray([float(v) for v in arr.tolist()]) if not bad else arr
    if bad:
        raise InvalidArgument(f"{name}[{i}] holds {bad[0]!r}: its values must be 0 or 1 (1 for a prompt's tokens, "
                              "0 for padding)")
    return arr


def strip_padding(rows: list[list[int]], prompts: Any, mask: Any, name: str = "attention_mask") -> list[list[int]]:
    """Each row of ``rows`` (the prompts, as lists) cut to its tokens where ``mask``
    is 1. ``mask`` (a torch tensor, NumPy array or list of rows of 0s and 1s, or of
    bools) must have the prompts' shape: a row per prompt, as long as it. Padding
    on the left, on the right or both is stripped; InvalidArgument (a ValueError),
    naming the row, for a mask of another shape or with values other than 0 and 1,
    a row of 0s (that prompt would have no tokens) and a 0 between a row's 1s (a
    prompt cannot skip tokens in its middle: that is no padding). ``prompts`` (the
    caller's object) only names shapes in errors. An empty row stays empty for the
    caller's own error."""
    shapes = ""
    if _shape(prompts) is not None and _shape(mask) is not None:
        shapes = f" ({name} {_shape(mask)}, prompts {_shape(prompts)})"
    if isinstance(mask, (str, bytes)) or not hasattr(mask, "__iter__") or _shape(mask) == ():
        raise InvalidArgument(f"{name} must be a tensor, array or list of rows of 0s and 1s, the prompts' shape; "
                              f"got {type(mask).__name__}")
    mask_rows = list(_numpy(mask) if isinstance(mask, torch.Tensor) else mask)  # a CUDA mask to the host once
    if mask_rows and all(_scalar(v) for v in mask_rows):
        raise InvalidArgument(f"{name} is one flat row of {len(mask_rows)}: it must have the prompts' shape, a row "
                              f"for each prompt ([mask] for one prompt){shapes}")
    if len(mask_rows) != len(rows):
        raise InvalidArgument(f"{name} has {len(mask_rows)} row{'s' * (len(mask_rows) != 1)} for {len(rows)} "
                              f"prompt{'s' * (len(rows) != 1)}: it must have the prompts' shape{shapes}")
    out = []
    for i, (tokens, row) in enumerate(zip(rows, mask_rows)):
        arr = _mask_row(row, i, name)
        if len(arr) != len(tokens):
            raise InvalidArgument(f"{name}[{i}] has {len(arr)} entries for the {len(tokens)} tokens of prompts[{i}]: "
                                  f"it must have the prompts' shape{shapes}")
        if not tokens:
            out.append(tokens)
            continue
        ones = np.flatnonzero(arr)
        if not ones.size:
            raise InvalidArgument(f"{name}[{i}] is all 0: prompts[{i}] would have no tokens")
        start, stop = int(ones[0]), int(ones[-1]) + 1
        if stop - start != ones.size:
            hole = start + int(np.flatnonzero(arr[start:stop] == 0)[0])
            raise InvalidArgument(f"{name}[{i}] has a 0 at column {hole}, between its 1s: padding (0s before or after "
                                  f"a prompt's tokens) is stripped, but a prompt cannot skip tokens in its middle")
        out.append(tokens[start:stop])
    return out


def pad_token_ids(model: Any) -> set[int]:
    """The pad token ids ``model`` names: its (text) config's and its generation
    config's ``pad_token_id``, where they are ints."""
    config = getattr(model, "config", None)
    try:
        get = getattr(config, "get_text_config", None)
        text = get() if callable(get) else config
    except Exception:  # noqa: BLE001 - a config without a text config: its own fields
        text = config
    sources = (text, config, getattr(model, "generation_config", None))
    return {int(p) for p in (getattr(s, "pad_token_id", None) for s in sources) if is_int(p)}


def _run(tokens: list[int], token: int) -> tuple[int, int]:
    """How many times ``token`` leads and ends ``tokens``."""
    lead = next((k for k, t in enumerate(tokens) if t != token), len(tokens))
    trail = next((k for k, t in enumerate(reversed(tokens)) if t != token), len(tokens))
    return lead, trail


def _outside_kvpager_hf() -> int:
    """The stacklevel of the first frame outside kvpager.hf: the caller's line."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("kvpager.hf", "clients.kvpager")):
        level, frame = level + 1, frame.f_back
    return level


def warn_if_padded(rows: list[list[int]], model: Any) -> bool:
    """Warn (a UserWarning, once per calling line under Python's default filters)
    where prompts given without a mask look like a padded batch: two or more rows
    of one length, and a pad token id of ``model`` leads (or ends) some rows more
    times than others. Unpadded prompts of one length do not: they would have to
    differ in how often the pad token starts or ends them (a pad id that is also
    the BOS token starts each row once). Returns whether it warned."""
    if len(rows) < 2 or len({len(r) for r in rows}) != 1 or not rows[0]:
        return False
    for pad in sorted(pad_token_ids(model)):
        leads, trails = zip(*(_run(r, pad) for r in rows))
        if len(set(leads)) > 1 or len(set(trails)) > 1:
            side = "lead" if len(set(leads)) > 1 else "end"
            warnings.warn(
                f"kvpager.hf: these prompts look padded: rows of one length that the model's pad token id {pad} "
                f"{side}s a different number of times. Each row is taken whole as its prompt, pads included. "
                "Pass the tokenizer's attention_mask (generate(model, pool, **enc, max_new_tokens=n)) to strip "
                "the padding, or the prompts as lists without it.",
                UserWarning, stacklevel=_outside_kvpager_hf())
            return True
    return False


def unordered(value: Any) -> bool:
    """Whether ``value`` holds its items in no order a caller gave them: a set, a
    frozenset, a dict or a dict's keys or items (iterated, a set's order is its hashes',
    a repeated token is there once; a dict's, its keys'). Token ids and prompts must
    come in their order; a generator, iterated once in order, is taken."""
    return isinstance(value, (AbstractSet, Mapping))


def token_lists(prompts: Any, model: Any, attention_mask: Any = None) -> list[list[int]]:
    """``prompts`` as lists of ints, each an id of ``model``'s input embeddings
    (ValueError for anything else: a float is not truncated into an id, and an
    id past the vocabulary is refused here rather than by an index error deep in
    the model's embedding, after the prompts were allocated). With an
    ``attention_mask`` of the prompts' shape (a tokenizer's, for a padded batch),
    each prompt is its tokens where the mask is 1 (`kvpager.hf.padding.strip_padding`:
    left or right padding; a mask that is not padding is refused); without one, a
    batch that looks padded warns (`warn_if_padded`). The vocabulary is checked
    after the padding is stripped: a pad id past the model's embeddings is no token."""
    if isinstance(prompts, Mapping) and "input_ids" in prompts:
        raise InvalidArgument("prompts is a tokenizer's output (a mapping with input_ids): pass it as keywords, "
                              "generate(model, pool, **enc, max_new_tokens=n), or enc['input_ids'] with "
                              "attention_mask=enc['attention_mask']")
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise InvalidArgument("prompts must be a non-empty list of non-empty token-id lists")
    if unordered(prompts):
        raise InvalidArgument(f"prompts must come in an order (a list, a tuple, an array, a tensor or a generator), "
                              f"got a {type(prompts).__name__}: the outputs follow the prompts' order")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not hasattr(p, "__iter__"):
            raise InvalidArgument(f"prompts[{i}] must be a list of token ids, got {type(p).__name__}")
        if unordered(p):
            raise InvalidArgument(f"prompts[{i}] must be token ids in their order (a list, a tuple, a 1-D array or "
                                  f"tensor), got a {type(p).__name__}: it gives its ids in no prompt's order, each "
                                  "once")
        if isinstance(p, (np.ndarray, torch.Tensor)) and p.ndim != 1:  # a 0-d one: one flat tensor's id
            raise InvalidArgument(f"prompts[{i}] must be a list of token ids, got a {p.ndim}-D {type(p).__name__} "
                                  "(pass [ids] for one prompt)")
        try:
            ids = list(p.tolist() if isinstance(p, (np.ndarray, torch.Tensor)) else p)
        except (NotImplementedError, RuntimeError) as e:  # (a meta tensor's, one whose device cannot be read)
            raise InvalidArgument(f"prompts[{i}]: its token ids cannot be read ({type(e).__name__}: {e})") from e
        if all_type(ids, int):  # (plain ints, as most prompts are: checked at C speed, kept as they are)
            out.append(ids)
            continue
        if not all(is_int(t) for t in ids):
            bad = next(t for t in ids if not is_int(t))
            raise InvalidArgument(f"prompts[{i}] holds {bad!r}: token ids must be ints")
        out.append([int(t) for t in ids])
    if attention_mask is not None:
        out = strip_padding(out, prompts, attention_mask)
    else:
        warn_if_padded(out, model)
    if not out or any(not p for p in out):
        raise InvalidArgument("prompts must be a non-empty list of non-empty token-id lists")
    try:
        vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    except (AttributeError, NotImplementedError):  # a model without one: its own error, if any, stands
        vocab = None
    if isinstance(vocab, int):
        for i, p in enumerate(out):
            if min(p) < 0 or max(p) >= vocab:
                bad = min(p) if min(p) < 0 else max(p)
                raise InvalidArgument(f"prompts[{i}] holds token id {bad}, outside the model's vocabulary [0, {vocab})")
    return out


def new_token_limits(most: Any, n: int) -> list[int]:
    """The most new tokens of each of ``n`` prompts: ``most`` an int >= 1 for all of
    them, or a list (a 1-D array or tensor) of one a prompt; ValueError naming
    what is wrong."""
    one = integer(most)  # (a NumPy integer or a 0-d integer tensor: the int it holds)
    if one is not None:
        if one >= 1:
            return [one] * n
    elif hasattr(most, "__len__") and getattr(most, "ndim", 1) == 1 and not isinstance(most, (str, bytes, Mapping)):
        values = [integer(v) for v in (most.tolist() if hasattr(most, "tolist") else most)]
        if len(values) != n or not all(v is not None and v >= 1 for v in values):
            raise InvalidArgument(f"max_new_tokens as a list must hold an int >= 1 for each of the {n} prompts, "
                                  f"got {most!r}")
        return values
    raise InvalidArgument(f"max_new_tokens must be an int >= 1, got {described(most)} (or a list of one a prompt)")


def prompts_given(prompts: Any, input_ids: Any) -> Any:
    """The prompts, given as ``prompts`` or under a tokenizer's name, ``input_ids``;
    ValueError where both or neither are."""
    if input_ids is None:
        if prompts is None:
            raise InvalidArgument("no prompts: give them as prompts (the third argument) or input_ids=")
        return prompts
    if prompts is not None:
        raise InvalidArgument("prompts and input_ids were both given: they are two names for the prompts, give one")
    return input_ids


def stop_sequences(stops: Any) -> dict[int, list[tuple[int, ...]]]:
    """``stops`` (None, or a list of non-empty token-id lists) by their last token;
    ValueError naming what is wrong."""
    if stops is None:
        return {}
    if isinstance(stops, (str, bytes, Mapping)) or not hasattr(stops, "__iter__"):
        raise InvalidArgument(f"stop_sequences must be a list of token-id lists, got {stops!r}")
    out: dict[int, list[tuple[int, ...]]] = {}
    for k, seq in enumerate(stops):
        if hasattr(seq, "tolist"):
            seq = seq.tolist()
        if isinstance(seq, (str, bytes)) or not hasattr(seq, "__iter__") or unordered(seq):
            raise InvalidArgument(f"stop_sequences[{k}] must be a list of token ids in their order, got "
                                  f"a {type(seq).__name__}: {seq!r}")
        seq = list(seq)
        if not seq or not all(is_int(t) and t >= 0 for t in seq):
            raise InvalidArgument(f"stop_sequences[{k}] must be a non-empty list of token ids (ints >= 0), got {seq!r}")
        out.setdefault(int(seq[-1]), []).append(tuple(int(t) for t in seq))
    return out
