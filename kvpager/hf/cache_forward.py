"""A `PagedCache`'s forward passes (`kvpager.hf.paged_cache`): the model's own
``forward``, taken over while the cache is open (`kvpager.hf.taken_forward`),
hands each call given the cache to `CacheForward._run`, which makes it one
pass over the cache's rows.

A pass is begun (`kvpager.hf.cache_pass`: its inputs read against the rows,
its rows allocated or appended, its plan made or its replay named), launched
(its early part first where it is split, `kvpager.hf.early_prefix`; replayed
from captured steps, `kvpager.hf.cache_graphs`, or run eagerly with kvpager
attention switched on for it alone), then done (`CacheRows.done`: the blocks
it filled committed). The decode pass taken ahead (`kvpager.hf.cache_ahead`)
is launched before its inputs reach the host and confirmed against them
after, or undone and begun again. A pass that raises is undone: the rows as
they were before it. A first pass whose rows repeat others runs over its
distinct rows (`kvpager.hf.repeated_rows`), the repeats forks of them. A
layer's ``update`` (`kvpager.hf.paged_layer`) hands its K/V on as they are
(`CacheForward._update`): kvpager attention stores them itself, at the
plan's slots.
"""

from __future__ import annotations

from typing import Any

import torch

from kvpager.errors import InvalidArgument, UnsupportedModel
from kvpager.hf import cache_pass, cached_tail, repeated_rows
from kvpager.hf.attention import PagedBatch
from kvpager.hf.cache_rows import Step
from kvpager.hf.checks import check_layers_ran, refused_pass
from kvpager.hf.compiled import running
from kvpager.hf.switching import paged_attention


class CacheForward:
    """The passes of `PagedCache` (mixed into it): needs ``model``, ``pool``,
    ``seq_ids``, ``release_margin``, ``_lock`` (one pass or call at a time),
    ``_signature`` and ``_takes_positions`` (the model's forward's), ``_rows``,
    ``_ahead``, ``_graphs``, ``_keeps_all``, ``_step`` (the pass under way, which
    its layers' ``update`` checks), ``_check_open`` and ``_free_rows``."""

    def _run(self, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``forward(*args, **kwargs)`` (the model's own) as one pass over the cache."""
        if not self._lock.acquire(blocking=False):
            raise InvalidArgument("PagedCache: another call on this cache is under way (one pass at a time: "
                                  "a cache is one batch's)")
        try:
            self._check_open("a forward pass")
            # (generate passes keywords; a caller's positional arguments bound by the forward's names)
            named = kwargs if not args else self._signature.bind_partial(self.model, *args, **kwargs).arguments
            _check_outputs(self.model, kwargs.get("output_attentions", named.get("output_attentions")))
            input_ids = named.get("input_ids")
            keep = cached_tail.kept_logits(named, self._takes_positions)
            # (a first pass whose rows repeat others, beams' or returned sequences': its distinct rows)
            again = None if self.seq_ids else repeated_rows.repeats(named, keep, self.model.config)
            if again is not None:
                named, args, kwargs = again.named, (), again.named
            # (the decode pass taken ahead: launched first, its inputs read meanwhile)
            step = cache_pass.ahead_pass(self, named, keep) if again is None else None
            if step is not None:
                out = self._launch(forward, args, kwargs, step, 1, input_ids.device)
                try:
                    confirmed = cache_pass.confirm(self, step, named)
                except BaseException:
                    self._rows.undo(step, launched_on=input_ids.device)
                    raise
                if not confirmed:  # (its slots given back: the pass runs again, its inputs read first)
                    self._rows.undo(step, launched_on=input_ids.device)
                    self._ahead.decodes, step = 0, None
            if step is None:
                step = cache_pass.begin(self, named, keep)
                width = step.columns
                if step.cut is not None:
                    args, kwargs, width = (), step.cut, step.cut["input_ids"].shape[1]
                out = self._launch(forward, args, kwargs, step, width, input_ids.device)
            self._rows.done(step, self.release_margin)
            self._ahead.after(step.decode, step.replay is not None)
            return out if again is None else self._repeat(out, again)
        finally:
            self._lock.release()

    def _launch(self, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any], step: Step, width: int,
                device: torch.device) -> Any:
        """Run a begun pass (its first part first, where split; replayed, where it
        names a captured step); one that raises is undone."""
        try:
            self._step = step
            if step.early is not None:  # (its blocks' K/V, for the cut pass's rows to read)
                early, inputs = step.early
                self._forward(forward, (), inputs, inputs["input_ids"].shape[1], early, device)
            if step.replay is not None:
                out = self._graphs.run(*step.replay)
            else:
                out = self._forward(forward, args, kwargs, width, step.batch, device)
            if step.record is not None:  # (the ids of slots taken ahead, while the pass runs)
                self.pool.record_tokens(*step.record)
            return out
        except BaseException:
            self._rows.undo(step, launched_on=device)
            raise
        finally:
            self._step = None

    def _forward(self, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any], width: int,
                 batch: PagedBatch, device: torch.device) -> Any:
        """The model's ``forward`` over a pass of ``width`` columns (its inputs on ``device``),
        with kvpager attention through ``batch``."""
        keep = kwargs.get("logits_to_keep")
        if self._keeps_all and type(keep) is int and 0 < keep < width:
            kwargs = {**kwargs, "logits_to_keep": torch.arange(width - keep, width, device=device)}
        with paged_attention(self.model), running(batch):
            try:
                out = forward(*args, **kwargs)
            except Exception as e:  # (MPT's own code failed on the mask kvpager does not build: an AttributeError)
                refusal = refused_pass(self.model, batch, e)
                if refusal is None:
                    raise
                raise refusal from e
        check_layers_ran(self.model, batch)
        return out

    def _update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's ``update``: kvpager attention stores the new K/V itself, at the
        plan's slots (`kvpager.hf.attention.kvpager_attention`), so they are handed
        on as they are; refused outside a pass of the cache's model (and once closed:
        its model's forward given back, a pass reaches its layers straight)."""
        if self._step is None:
            self._check_open("a forward pass")
            raise InvalidArgument(
                "PagedCache: a layer was called outside a forward pass of the model this cache was made for "
                f"({type(self.model).__name__}); pass the cache to that model's forward or generate (not to one "
                "of its submodules, nor to another model)")
        return key, value

    def _repeat(self, out: Any, again: repeated_rows.Repeats) -> Any:
        """A first pass run over its distinct rows (`repeated_rows`): each row of the
        pass continues its distinct row (forks of it) and gets its logits."""
        try:
            self._rows.reorder(again.parents)
        except BaseException:
            self._free_rows()
            raise
        return repeated_rows.repeated(out, again.index)


def _check_outputs(model: Any, asked: Any) -> None:
    """A pass asking for attention weights (``asked``: its ``output_attentions``,
    None: its config's) refused by name before anything changes: kvpager's kernels compute
    none, and where a model's layers do not pass the flag on to the attention
    function (GPT-2's, OPT's, StableLM's, Falcon's) transformers returned empty
    or None weights without a word (others' refused it a layer at a time)."""
    if asked is None:
        asked = getattr(model.config, "output_attentions", False)
    if asked:
        raise UnsupportedModel(f"PagedCache: {type(model).__name__} asked for attention weights "
                               "(output_attentions=True): kvpager's attention computes none; run this pass "
                               "with another cache (or attn_implementation) to get them")
