"""A `PagedCache` pass's ``attention_mask``, read against what the cache holds.

A `PagedCache` stores each row's tokens (mask 1) and no padding (mask 0), and
its attention reads every token a row holds; transformers' reads the columns
its mask keeps, counting sliding windows and attention chunks in columns,
padding included. The two agree where

- the mask's columns before a pass keep exactly the tokens the cache holds. A
  later call whose mask drops a row's last tokens (a conversation's next turn
  masking the padding a row was fed after its end token) has them cut from the
  row first (`dropped_tails`); any other change is refused;
- on a model with sliding windows or attention chunks, each row's tokens sit in
  consecutive columns: padding only before a row's first token (left padding).
  A pass that leaves padding between a row's tokens is refused there (`Spans`);
- the logits a pass keeps are its rows' tokens', not padding after them (right
  padding): kvpager computes no query for padding, and warns where a pass keeps
  such logits (`right_padding`; not refused: a chunk of a prefill in parts may
  end at padding between a row's tokens, whose logits no one reads).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvpager.errors import InvalidArgument


@dataclass
class PassMask:
    """What a pass's inputs say: ``real`` (bool [rows, width]: the pass's own tokens),
    ``held`` (per row, the 1s of the mask's columns before the pass; None where the
    mask spans more than those columns and the pass's: a narrower one is refused), ``tokens`` (its input
    ids, int [rows, width]) and ``positions`` (its ``position_ids`` where they are
    [rows, width] on the ids' device; None: not read)."""

    real: np.ndarray
    held: np.ndarray | None
    tokens: np.ndarray
    positions: np.ndarray | None = None


def read(attention_mask: Any, input_ids: torch.Tensor, position_ids: Any, columns: int) -> PassMask:
    """A pass of ``input_ids`` [rows, width] after ``columns`` cached ones: its mask's
    last ``width`` columns as bool, the row sums of those before them, the ids and
    the positions (where [rows, width] on the ids' device), in one read from the
    device. No mask: every token the row's, nothing to compare."""
    return read_later(attention_mask, input_ids, position_ids, columns)()


def read_later(attention_mask: Any, input_ids: torch.Tensor, position_ids: Any,
               columns: int) -> Callable[[], PassMask]:
    """`read`, its copy from the device queued now (into pinned memory, on the
    current stream) and waited for by the function it gives, which makes the
    `PassMask`: work queued after this call (a replayed step) runs meanwhile."""
    rows, width = input_ids.shape
    ids = input_ids.detach()
    pos = position_ids.detach() if isinstance(position_ids, torch.Tensor) and position_ids.shape == (rows, width) \
        and position_ids.device == ids.device else None
    mask = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2 \
                or attention_mask.shape[0] != rows or attention_mask.shape[1] < width:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise InvalidArgument(f"PagedCache takes a 2-D attention_mask [rows, tokens so far] of 0s and 1s "
                                  f"(a tokenizer's); got {shape} for input_ids [{rows}, {width}]")
        if attention_mask.shape[1] < columns + width:
            raise InvalidArgument(
                f"PagedCache: this pass's attention_mask has {attention_mask.shape[1]} columns, and the cache "
                f"was fed {columns} before its {width}: give the mask of every column so far (the earlier "
                "passes' and this one's, as generate does); a pass that feeds the held tokens again "
                "(use_cache=False) or a cache reused for other prompts is not taken (start a new PagedCache)")
        mask = attention_mask.detach()
    spans = bool(columns) and mask is not None and mask.shape[1] == columns + width
    real = held = None
    if mask is not None and mask.device.type == "cpu":  # (NumPy's sum: torch's CPU reduction wakes its thread pool)
        whole = mask.numpy()
        real, held = whole[:, -width:], whole[:, :columns].sum(axis=1, dtype=np.int64) if spans else None
    onto = False
    if ids.device.type == "cpu":
        tokens, positions = ids.numpy(), None if pos is None else pos.numpy()
        got = done = None
    else:  # one read from the device: ids, positions, the mask's columns and sums where on the same device
        parts = [ids] if pos is None else [ids, pos.to(ids.dtype)]
        onto = mask is not None and real is None and mask.device == ids.device
        if onto:
            parts.append(mask[:, -width:].to(ids.dtype))
            if spans:
                parts.append(mask[:, :columns].sum(1, keepdim=True, dtype=ids.dtype))
        device = torch.cat(parts, 1) if len(parts) > 1 else ids
        got = torch.empty(device.shape, dtype=device.dtype, pin_memory=True)
        got.copy_(device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(ids.device))

    def finish() -> PassMask:
        nonlocal real, held, tokens, positions
        if got is not None:
            done.synchronize()
            host = got.numpy()
            at = width if pos is None else 2 * width
            tokens, positions = host[:, :width], None if pos is None else host[:, width:at]
            if onto:
                real, held = host[:, at:at + width], host[:, at + width] if spans else None
        if mask is None:
            real = np.ones((rows, width), dtype=bool)
        elif real is None:  # (a mask on another device than the ids)
            real = mask[:, -width:].cpu().numpy()
            held = mask[:, :columns].sum(1).cpu().numpy() if spans else None
        if real.dtype != bool and not ((real == 0) | (real == 1)).all():  # (not np.isin: 10x the time)
            raise InvalidArgument("PagedCache: attention_mask must hold 0s and 1s")
        return PassMask(real.astype(bool, copy=False), held, tokens, positions)

    return finish


@dataclass
class Spans:
    """Where each row's tokens fall in a pass (``real``, bool [rows, width]):
    ``first`` (its first token's column, ``width`` where none), ``end`` (after its
    last, 0 where none) and ``holes`` (padding between its tokens)."""

    first: np.ndarray
    end: np.ndarray
    holes: np.ndarray
    gaps: np.ndarray | None = None  # per row, padding between its tokens (`gap_rows`, set by `checked`)

    @classmethod
    def of(cls, real: np.ndarray, every: bool = False) -> Spans:
        """``every``: each column of ``real`` is a token (a decode pass's): no search."""
        rows, width = real.shape
        if every:
            return cls(np.zeros(rows, np.int64), np.full(rows, width, np.int64), np.zeros(rows, dtype=bool))
        any_ = real.any(axis=1)
        first = np.where(any_, real.argmax(axis=1), width)
        end = np.where(any_, width - real[:, ::-1].argmax(axis=1), 0)
        holes = any_ & (end - first != real.sum(axis=1))
        return cls(first, end, holes)

    def gap_rows(self, lens: np.ndarray, ends: np.ndarray, columns: int) -> np.ndarray:
        """Rows whose tokens the pass leaves apart in columns: padding between its own
        tokens, or between a row's tokens held (ending at column ``ends[r]``) and its
        first in the pass (at ``columns`` + first)."""
        return self.holes | ((lens > 0) & (self.end > 0) & (columns + self.first != ends))


def right_padding(real: np.ndarray, lens: np.ndarray, keep: int | None) -> np.ndarray:
    """Rows whose kept positions (the last ``keep`` columns) hold padding after a
    token of theirs, in the pass or held before it (``lens``)."""
    if keep is None:
        return np.zeros(len(real), dtype=bool)
    after = (np.cumsum(real, axis=1) > 0) | (lens > 0)[:, None]
    return (~real[:, -keep:] & after[:, -keep:]).any(axis=1)


def warn_right_padding(rows: np.ndarray) -> None:
    """Warned, not refused: a chunk of a prefill in parts may end at padding between a
    row's tokens, whose logits no one reads (a pass cannot tell it from right padding)."""
    warnings.warn(
        f"PagedCache: the logits this pass keeps are at padding after row {int(rows[0])}'s tokens (right "
        "padding): kvpager computes no query for padding, so they are not transformers'; pad on the left "
        "(a tokenizer's padding_side='left')", UserWarning, stacklevel=2)


def refuse_gaps(rows: np.ndarray) -> None:
    raise InvalidArgument(
        f"PagedCache: this pass's attention_mask leaves padding between row {int(rows[0])}'s tokens; this "
        "model's sliding windows (or attention chunks) count cache columns, padding included, while a "
        "PagedCache holds tokens alone, so its attention would read other positions: pad only before a "
        "row's first token (left padding)")


def fed_apart(rows: Any) -> np.ndarray:
    """The rows of ``rows`` (a `CacheRows`) fed columns they do not hold: padding,
    or tails a mask dropped."""
    return np.flatnonzero(rows.lens < rows.columns) if rows.columns and len(rows.lens) else np.zeros(0, np.int64)


def refuse_maskless(rows: Any) -> None:
    """InvalidArgument for a pass without a mask where a row was fed columns that it
    does not hold (padding, or tails a mask dropped): transformers takes no mask as
    every column a token and attends the K/V its cache holds for them, where a
    PagedCache holds tokens alone, so the row's logits were other ones, silently.
    (`generate` drops a mask of all 1s before its first pass: a second turn given
    one after a padded first ran so.)"""
    short = fed_apart(rows)
    if len(short):
        r = int(short[0])
        raise InvalidArgument(
            f"PagedCache: a pass without attention_mask takes every column so far as a token, and row {r} was "
            f"fed {rows.columns} columns of which the cache holds {int(rows.lens[r])} tokens (the others padding, "
            "or dropped by a mask): pass the mask of every column so far (the earlier passes' 0s included; "
            "transformers' generate drops a mask of all 1s, so give the padded columns 0s)")


def dropped_tails(attention_mask: torch.Tensor, held: np.ndarray, rows: Any) -> np.ndarray:
    """Per row of ``rows`` (a `CacheRows`), how many of its last tokens the mask's
    columns before the pass drop (0: none); the mask read again whole where any
    row's count differs. A row whose mask keeps other columns than its tokens but
    for a drop of its last ones is refused."""
    lens, columns = rows.lens, rows.columns
    drop = lens - held
    if not drop.any():
        return drop
    bad = np.flatnonzero(drop < 0)
    if len(bad):
        r = int(bad[0])
        raise InvalidArgument(
            f"PagedCache: attention_mask keeps {int(held[r])} columns of row {r} before this pass, and the cache "
            f"holds {int(lens[r])} tokens of it: it marks as tokens columns the cache was fed as padding; pass the "
            "mask the earlier passes were given, extended")
    mask = attention_mask.detach()[:, :columns].cpu().numpy().astype(bool)
    for r in np.flatnonzero(drop).tolist():
        fed, cut = rows.columns_of(r), int(drop[r])
        want = np.zeros(columns, dtype=bool)
        want[fed[:len(fed) - cut]] = True
        if not np.array_equal(mask[r], want):
            raise InvalidArgument(
                f"PagedCache: attention_mask masks {cut} of the {int(lens[r])} tokens row {r} holds, not its "
                "last ones: a PagedCache attends every token it holds (it can cut a row's last tokens, not "
                "others); start a new cache for this mask")
    return drop


def checked(mask: PassMask, attention_mask: Any, keep: Any, every: bool, rows: Any, by_columns: bool) -> Spans:
    """Where a pass's tokens fall (`Spans`, with ``gaps`` per row), its mask checked
    against the cache's ``rows`` (a `CacheRows`): refused where transformers would
    attend other tokens (where ``by_columns``, a model of sliding windows or chunks,
    padding between a row's tokens; a mask dropping held tokens other than a row's
    last), kept logits at right padding warned of; a drop of a row's last tokens cut
    from it. Nothing else changes. ``every``: each column a token."""
    lens, ends = (rows.lens, rows.ends) if len(rows.lens) else (np.zeros(len(mask.real), np.int64),) * 2
    if attention_mask is None:
        refuse_maskless(rows)
    drop = None
    if mask.held is not None and len(rows.lens):
        drop = dropped_tails(attention_mask, mask.held, rows)
        if drop.any():  # (each dropping row's end after its drop: its last kept token's column + 1)
            ends = ends.copy()
            for r in np.flatnonzero(drop).tolist():
                fed = rows.columns_of(r)[:int(lens[r] - drop[r])]
                ends[r] = fed[-1] + 1 if len(fed) else 0
            lens = lens - drop
    spans = Spans.of(mask.real, every)
    spans.gaps = spans.gap_rows(lens, ends, rows.columns)
    if by_columns and spans.gaps.any():
        refuse_gaps(np.flatnonzero(spans.gaps))
    if type(keep) is int and keep > 0 and not every:
        right = right_padding(mask.real, lens, keep)
        if right.any():
            warn_right_padding(np.flatnonzero(right))
    if drop is not None and drop.any():
        rows.drop_tails(drop)
    return spans
