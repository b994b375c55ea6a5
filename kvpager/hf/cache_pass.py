"""A `PagedCache` pass begun: its rows' tokens allocated or appended, and its plan.

`begin` reads the pass's inputs against what the cache holds (`cache_mask`),
allocates the rows it brings first tokens (sharing a cached prefix's blocks,
each row's fed elsewhere than at its indices under a salt of its own),
appends the others' (a decode pass: one packed call, or the slots taken
ahead, `cache_ahead`), and makes the pass's plan (`decode_plans`), or says
what replays it (`cache_graphs`); a first pass on prefix hits is cut to its
rows' uncached tails (`cached_tail`), a first pass whose rows share blocks it
fills itself split in two (`early_pass`, `early_prefix`). The `Step` it
gives is what `CacheRows.done` counts and `CacheRows.undo` takes back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvpager.errors import InvalidArgument
from kvpager.hf import cache_mask, cached_tail, early_prefix
from kvpager.hf.attention import PagedBatch
from kvpager.hf.cache_rows import Step
from kvpager.hf.fed_positions import own_salt, placed


def begin(cache: Any, named: dict[str, Any], keep: int | None) -> Step:
    """The pass's sequences allocated or appended, and its plan. ``keep``: the
    positions whose logits the pass keeps, where it may be cut to its rows'
    uncached tails (`cached_tail`: done where a row of it has cached tokens)."""
    input_ids, attention_mask = named.get("input_ids"), named.get("attention_mask")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise InvalidArgument(
            "PagedCache needs each pass's input_ids (token ids [rows, tokens]: the prefix cache keys "
            f"blocks by them); got {type(input_ids).__name__ if input_ids is None else tuple(input_ids.shape)} "
            "(inputs_embeds alone are not taken)")
    rows, width = input_ids.shape
    if width < 1:
        raise InvalidArgument("PagedCache: a pass of no tokens")
    first = not cache.seq_ids
    if not first and rows != len(cache.seq_ids):
        raise InvalidArgument(f"PagedCache holds {len(cache.seq_ids)} rows, and this pass has {rows} "
                              "(rows change between passes through reorder_cache / batch_select_indices)")
    mask = cache_mask.read(attention_mask, input_ids, named.get("position_ids"), cache._rows.columns)
    real = mask.real  # bool [rows, width]
    every = bool(real.all())
    spans = cache_mask.checked(mask, attention_mask, named.get("logits_to_keep"), every, cache._rows,
                               cache._by_columns)
    if first:  # a row a sequence, allocated with the pass that brings its first tokens
        cache._rows.start(rows)
    tokens = mask.tokens
    counts = real.sum(axis=1)
    live = np.flatnonzero(counts)
    # (a pass after the first whose every row holds a sequence and gets every column: a decode
    # pass; one packed append, no per-row work)
    uniform = not first and None not in cache.seq_ids and every
    fresh = [] if uniform else [int(r) for r in live if cache.seq_ids[r] is None]
    at = placed(named.get("position_ids"), real, cache._rows.lens, cache._rows.columns, cache._takes_positions,
                mask.positions)
    step = Step(None, live, counts[live], width, first, fresh, at, spans=spans, real=real)
    try:
        if not len(live):
            raise InvalidArgument("PagedCache: a pass whose every token is padding (attention_mask 0)")
        ahead = cache._ahead.take(width, mask)  # (slots taken for a decode pass, else given back)
        step.appended = ahead is not None  # (a failure from here on truncates the rows, its slots with them)
        parts: dict[int, np.ndarray] = {}
        cached = np.zeros(rows, dtype=np.int64)
        if fresh:
            # a row fed its tokens elsewhere than at their indices: a salt of its own (no prefix
            # hit, no block shared with another row: their K/V would be other positions')
            salts = [cache.salt if step.placed[r] else own_salt(cache.salt) for r in fresh]
            allocs = cache.pool.allocate([tokens[r][real[r]].tolist() for r in fresh], salts,
                                        share_in_batch=True)
            for r, a in zip(fresh, allocs):
                cache.seq_ids[r] = a.seq_id
                cached[r] = a.num_cached_tokens
                # a cached prefix's tokens (transformers feeds the whole prompt) write nothing; their
                # queries attend over the cached K/V where the pass is not cut to the tails
                parts[r] = np.concatenate([np.full(a.num_cached_tokens, -1, dtype=np.int64),
                                           np.asarray(a.slots, dtype=np.int64)])
        if first and keep is not None and cache._splits and len(fresh) > 1:
            early = early_pass(cache, named, real, counts, cached, parts, fresh, keep)
            if early is not None:
                step.early, cached = early
        if uniform:
            ids = list(cache.seq_ids)
            step.appended = True
            if ahead is None:
                flat = cache.pool.append_flat(ids, width, tokens)
            else:
                step.record = (ids, tokens)  # (recorded once the pass is launched: `PagedCache._launch`)
                flat = ahead.slots
            step.decode = width == 1
            if cache._graphs is not None and keep == 1 and width == 1:
                positions = named.get("position_ids")
                if positions is None or positions.ndim == 2:  # (a row's positions on one axis)
                    positions = torch.full((rows, 1), cache._rows.columns, device=input_ids.device) \
                        if positions is None else positions
                    step.replay = (ids, input_ids, positions, flat, int(cache._rows.lens.max()) + 1,
                                   None if ahead is None else ahead.graph)
                    return step
            cut = None  # (no row holds cached tokens it is fed again)
            plan = ahead.plan if ahead is not None and ahead.plan is not None else \
                cache._plans.plan(ids, counts, flat, int(cache._rows.lens.max()) + width)
        else:
            held = [int(r) for r in live if r not in parts]
            if held:
                appended = cache.pool.append([cache.seq_ids[r] for r in held], counts[held].tolist(),
                                            [tokens[r][real[r]].tolist() for r in held])
                step.appended = True
                parts.update(zip(held, appended))
            cut = cached_tail.cut(named, real, counts, cached, keep, cache._rows.columns, cache._rows.lens)
            fed = counts if cut is None else cut.fed
            step.cut = None if cut is None else cut.inputs
            plan = cache._plans.plan([cache.seq_ids[r] for r in live], fed[live],
                                    np.concatenate([parts[r][len(parts[r]) - fed[r]:] for r in live]),
                                    int((cache._rows.lens[live] + counts[live]).max()))
        step.batch = pass_batch(cache, plan, real, torch.arange(width, device=input_ids.device).expand(rows, width)) \
            if cut is None else pass_batch(cache, plan, cut.real, cut.columns)
    except BaseException:
        cache._rows.undo(step)
        raise
    return step


def ahead_pass(cache: Any, named: dict[str, Any], keep: int | None) -> Step | None:
    """The decode pass whose slots and plan (or captured step) were taken ahead
    (`cache_ahead`), begun before its inputs reach the host: their read is queued
    now and waited for once the pass is launched (`confirm`), so the device runs
    the pass meanwhile. None where the pass's shapes say it is not that pass (then
    `begin` reads them first, and gives the slots back)."""
    a, rows = cache._ahead.ahead, cache._rows
    input_ids = named.get("input_ids")
    if a is None or not isinstance(input_ids, torch.Tensor) or input_ids.shape != (len(a.seq_ids), 1) \
            or a.seq_ids != rows.seq_ids:
        return None
    positions = named.get("position_ids")
    replay = cache._graphs is not None and keep == 1 and (positions is None or positions.ndim == 2)
    if not replay and a.plan is None:
        return None
    later = cache_mask.read_later(named.get("attention_mask"), input_ids, positions, rows.columns)
    n = len(a.seq_ids)
    real = np.ones((n, 1), dtype=bool)
    step = Step(None, np.arange(n), np.ones(n, dtype=np.int64), 1, False, [], np.ones(n, dtype=bool),
                appended=True, real=real, decode=True)
    step.confirm = later
    cache._ahead.ahead = None  # (the pass's own now: a failure from here on truncates its rows)
    try:
        if replay:
            positions = torch.full((n, 1), rows.columns, device=input_ids.device) if positions is None else positions
            step.replay = (list(a.seq_ids), input_ids, positions, a.slots, a.longest, a.graph)
        else:
            step.batch = pass_batch(cache, a.plan, real, torch.zeros((n, 1), dtype=torch.long,
                                                                     device=input_ids.device))
    except BaseException:
        cache._rows.undo(step)
        raise
    return step


def confirm(cache: Any, step: Step, named: dict[str, Any]) -> bool:
    """Whether a pass begun by `ahead_pass`, now launched, is the decode pass its
    slots were taken for: its inputs read (each row's token real, its mask keeping
    the tokens the row holds, no row's tokens apart where a model counts windows or
    chunks in columns), its token ids recorded and where its tokens sit noted, as
    `begin` does. False: the caller undoes it and runs it again through `begin`,
    which takes it as any pass (or refuses it by name)."""
    mask = step.confirm()
    rows = cache._rows
    if not mask.real.all() or (mask.held is not None and not np.array_equal(mask.held, rows.lens)):
        return False
    if named.get("attention_mask") is None and len(cache_mask.fed_apart(rows)):
        return False  # (`begin` refuses it: `cache_mask.refuse_maskless`)
    spans = cache_mask.Spans.of(mask.real, True)
    spans.gaps = spans.gap_rows(rows.lens, rows.ends, rows.columns)
    if cache._by_columns and spans.gaps.any():
        return False
    step.spans = spans
    step.placed = placed(named.get("position_ids"), mask.real, rows.lens, rows.columns, cache._takes_positions,
                         mask.positions)
    cache.pool.record_tokens(step.replay[0] if step.replay is not None else rows.seq_ids, mask.tokens)
    return True


def pass_batch(cache: Any, plan: Any, real: np.ndarray, columns: torch.Tensor) -> PagedBatch:
    """A pass's `PagedBatch` over ``plan``: its real tokens (bool [rows, W]) and the
    column of the whole pass each of its columns takes (int [rows, W] on its device)."""
    flat = real.reshape(-1)
    index = None if flat.all() else torch.as_tensor(np.flatnonzero(flat), device=columns.device)
    batch = PagedBatch(plan, cache._dtype, cache._device, cache._windows, chunks=cache._chunks,
                       layers=cache._layer_map, fit=cache._fit, real=index)
    if cache._tuned:  # (positions as transformers counts them there: cache columns, pads included)
        positions = (columns + cache._rows.columns).reshape(-1)
        batch.positions = (positions if index is None else positions.index_select(0, index)).unsqueeze(0)
    return batch


def early_pass(cache: Any, named: dict[str, Any], real: np.ndarray, counts: np.ndarray, cached: np.ndarray,
           parts: dict[int, np.ndarray], fresh: list[int], keep: int) -> Any:
    """A first pass's shared blocks written by a pass of their own before it, where
    that spares enough (`early_prefix`): (its batch and keywords, each row's cached
    tokens after it); None where the pass runs as one."""
    size = cache.pool.spec.block_size
    written = np.concatenate([parts[r][parts[r] >= 0] for r in fresh]) // size
    upto = cached.copy()
    upto[fresh] = early_prefix.early_tokens(cache.pool.tables([cache.seq_ids[r] for r in fresh])[0],
                                            cached[fresh], written, size)
    early = upto - cached
    if named.get("position_ids") is None and not cached_tail.at_their_columns(real, np.zeros(len(real), np.int64), 0):
        return None  # (a pass of its own would have to give positions the model counts its own way)
    if not early.any() or not real[:, -keep:].all() or not early_prefix.worth_it(
            len(real), early, cached_tail.tails(counts, upto, keep), cached_tail.tails(counts, cached, keep)):
        return None
    rows, inputs, kept, columns = early_prefix.first_pass(named, real, cached, upto)
    plan = cache._plans.plan([cache.seq_ids[r] for r in rows], early[rows],
                            np.concatenate([parts[r][cached[r]:upto[r]] for r in rows]), 0,
                            context_lens=upto[rows])
    for r in rows:  # (the cut pass writes none of them again)
        parts[r][:upto[r]] = -1
    return (pass_batch(cache, plan, kept, columns), inputs), upto
