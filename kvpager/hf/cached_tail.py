"""A `PagedCache` pass that runs only its rows' uncached tails.

transformers' ``generate`` feeds a prompt whole. Where a row's prompt starts
with blocks the pool already holds (a prefix-cache hit, or blocks an earlier
row of the same batch fills), the K/V of those tokens is there: only the
queries of the tokens after them are needed, and of those only the last
``logits_to_keep`` give logits. So a first pass that keeps the last ``k``
positions' logits runs the model over each row's last ``max(uncached, k)``
real tokens, left-padded to the longest such tail, at the positions the
whole pass would have given them: the kept logits are the same, and the
prefill's compute drops by the cached share (`generate` of `kvpager.hf`
runs only the uncached tail too).

Only passes whose outputs are the kept logits alone are cut: a keyword the
cut would have to follow (``inputs_embeds``, ``labels``, per-token inputs of
a model's own, hidden states or attentions asked for) leaves the pass whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: a pass's keywords a cut pass carries (rewritten or as they are); any other keeps the pass whole
_CARRIED = frozenset({"input_ids", "attention_mask", "position_ids", "cache_position", "cache", "past_key_values",
                      "logits_to_keep", "use_cache", "return_dict", "output_attentions", "output_hidden_states"})


def kept_logits(named: dict[str, Any], takes_positions: bool) -> int | None:
    """The positions a pass keeps logits for (``logits_to_keep``, an int >= 1)
    where a pass of these arguments may be cut to its rows' tails; None where not."""
    keep = named.get("logits_to_keep")
    if type(keep) is not int or keep < 1 or not takes_positions:
        return None
    if any(k not in _CARRIED for k, v in named.items() if v is not None and k != "self"):
        return None
    if named.get("output_attentions") or named.get("output_hidden_states"):
        return None
    return keep


@dataclass
class Cut:
    """A pass cut to its rows' tails."""

    fed: np.ndarray  # per row, the real tokens it feeds (its last ones)
    real: np.ndarray  # bool [rows, W]: the cut columns that hold a row's token
    columns: torch.Tensor  # int [rows, W] on the pass's device: the whole pass's column each cut column takes
    inputs: dict[str, Any]  # the pass's keywords for the cut columns


def cut(named: dict[str, Any], real: np.ndarray, counts: np.ndarray, cached: np.ndarray, keep: int | None,
        columns: int, lens: np.ndarray) -> Cut | None:
    """The pass of ``named`` keywords (its real tokens ``real``, bool [rows, width];
    ``counts`` a row, ``cached`` of them in the pool) cut to its rows' tails where it
    keeps ``keep`` positions' logits (`kept_logits`); None where nothing is cut: no
    cached token, a row whose kept positions are not its last real tokens (right
    padding), a row that feeds every column, or no ``position_ids`` given where
    padding puts a token at a column other than its index (`at_their_columns`).
    ``columns``: the cache's before it; ``lens``: the tokens each row held."""
    if keep is None or not cached.any() or not real[:, -keep:].all():
        return None
    if named.get("position_ids") is None and not at_their_columns(real, lens, columns):
        return None
    fed = tails(counts, cached, keep)
    if fed.max() == real.shape[1]:
        return None
    take, kept = layout(real, fed)
    index = torch.as_tensor(take, device=named["input_ids"].device)
    return Cut(fed, kept, index, cut_inputs(named, index, kept, real.shape[1], columns))


def at_their_columns(real: np.ndarray, lens: np.ndarray, columns: int) -> bool:
    """Whether each token of a pass (``real``, bool [rows, width], after ``lens``
    tokens a row and ``columns`` cache columns) sits at the column its index in its
    row names. Where padding moves one, a model given no ``position_ids`` counts its
    position its own way (cache columns, pads included: Llama's; its row's tokens
    alone, from the mask: OPT's, BioGPT's), which a cut pass, whose mask and columns
    are not the whole pass's, could not give it: such a pass runs whole."""
    index = lens[:, None] + np.cumsum(real, axis=1) - 1
    return bool(((index == columns + np.arange(real.shape[1])) | ~real).all())


def tails(counts: np.ndarray, cached: np.ndarray, keep: int) -> np.ndarray:
    """Per row, the real tokens a cut pass feeds: the last ``max(uncached, keep)``
    (a row wholly cached still feeds its kept positions, writing nothing there)."""
    return np.minimum(counts, np.maximum(counts - cached, keep))


def layout(real: np.ndarray, fed: np.ndarray, ends: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the pass's column each cut column takes, int [rows, W]; its real tokens, bool
    [rows, W]) for rows that feed the last ``fed[r]`` of their real tokens (of their
    first ``ends[r]`` where given), left-padded to W = max(fed) (a pad takes column 0,
    unread)."""
    rows = real.shape[0]
    width = int(fed.max())
    take = np.zeros((rows, width), dtype=np.int64)
    kept = np.zeros((rows, width), dtype=bool)
    for r in range(rows):
        n = int(fed[r])
        if n:
            columns = np.flatnonzero(real[r])
            end = len(columns) if ends is None else int(ends[r])
            take[r, width - n:] = columns[end - n:end]
            kept[r, width - n:] = True
    return take, kept


def rows_of(named: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """A pass's keywords for some of its rows (``rows``: indices on its device)."""
    out = {k: v for k, v in named.items() if k != "self"}
    for k in ("input_ids", "attention_mask"):
        if out.get(k) is not None:
            out[k] = out[k].index_select(0, rows)
    positions = out.get("position_ids")
    if positions is not None and positions.shape[-2] != 1:  # [rows, T] or [axes, rows, T]; [.., 1, T]: every row's
        out["position_ids"] = positions.index_select(-2, rows)
    return out


def cut_inputs(named: dict[str, Any], index: torch.Tensor, kept: np.ndarray, width: int,
               columns: int) -> dict[str, Any]:
    """The pass's keywords for its cut columns: ``input_ids``, ``attention_mask``
    (its columns before the pass kept), ``position_ids`` (the whole pass's, or
    the cache columns a model counts without them) and ``cache_position`` gathered
    at ``index`` (`layout`'s columns, on the pass's device); the others as they are. ``width``: the whole pass's columns;
    ``columns``: the cache's before it."""
    out = {k: v for k, v in named.items() if k != "self"}
    ids = named["input_ids"]
    out["input_ids"] = ids.gather(1, index)
    mask = named.get("attention_mask")
    new_mask = torch.as_tensor(kept, device=ids.device, dtype=mask.dtype if mask is not None else torch.long)
    out["attention_mask"] = new_mask if mask is None else torch.cat([mask[:, :mask.shape[1] - width], new_mask], 1)
    positions = named.get("position_ids")
    if positions is None:
        out["position_ids"] = index + columns
    else:
        whole = positions.expand(*positions.shape[:-2], index.shape[0], width)
        out["position_ids"] = whole.gather(-1, index.expand(*whole.shape[:-2], *index.shape))
    if named.get("cache_position") is not None:
        out["cache_position"] = torch.arange(columns, columns + index.shape[1], device=ids.device)
    return out
