"""A model's ``forward`` taken over while a `kvpager.hf.PagedCache` of it is open.

transformers' ``generate`` calls the model itself, so a cache that must run each
pass its own way (allocate, plan, switch the attention, commit) sees the passes
through the model's forward: an instance attribute bound to the model (a deep
copy rebinds it to the copy), with the model's own signature (``generate`` reads
it), which hands a pass given such a cache (a class with ``runs_passes``) to
its ``_run`` and any other call to the model's forward as before. Counted: the
first open cache of a model takes it, the last closed gives it back.
"""

from __future__ import annotations

import inspect
import threading
import types
from typing import Any

import torch

from kvpager.errors import InvalidArgument

# (re-entrant: a cache collected without `close` gives the forward back from the collector,
# which may run in this module's own calls)
_taken_lock = threading.RLock()
_OPEN = "_kvpager_paged_caches"  # open caches of the model
_BEFORE = "_kvpager_forward_before"  # an instance forward the model had (accelerate's hooks), or None


def _forward_before(model: Any) -> Any:
    """The forward ``model`` had before a cache took it over."""
    before = model.__dict__.get(_BEFORE)
    return before if before is not None else type(model).forward.__get__(model)


def _paged_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The model's forward while a `PagedCache` of it is open: a pass given one
    runs through it (`PagedCache._run`), any other as before."""
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    if cache is None and args:  # (given positionally: ``model(ids, mask, None, cache)``)
        cache = next((a for a in args if getattr(type(a), "runs_passes", False)), None)
    if getattr(type(cache), "runs_passes", False):
        return _cache_pass(self, cache, args, kwargs)
    return _forward_before(self)(*args, **kwargs)


@torch.compiler.disable
def _cache_pass(model: Any, cache: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A pass of ``model`` through ``cache``, never traced: a ``torch.compile(model)``
    called with the cache ran the pass's bookkeeping (NumPy mask checks) through the
    compiler, which failed (a bool ``cumsum``), and handed the pass the taken-over
    forward again (the cache's lock refused it). It runs as an eager call of the
    model, its attention kvpager's (compile ``model.forward`` instead: the call this
    makes)."""
    if cache.model is not model:
        raise InvalidArgument(f"PagedCache was made for another model ({type(cache.model).__name__} at "
                              f"{id(cache.model):#x}) than this one ({type(model).__name__} at {id(model):#x})")
    return cache._run(_forward_before(model), args, kwargs)


def take_forward(model: Any) -> None:
    """Count an open cache of ``model``; the first takes over its ``forward``
    (bound as a method: a deep copy of the model rebinds it to the copy)."""
    with _taken_lock:
        state = model.__dict__
        if state.get(_OPEN, 0) == 0:
            state[_BEFORE] = state.get("forward")

            def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
                return _paged_forward(self, *args, **kwargs)

            # the model's own signature: generate reads it (whether to pass logits_to_keep, which
            # keyword arguments the model takes)
            forward.__signature__ = inspect.signature(type(model).forward)  # type: ignore[attr-defined]
            forward.__doc__ = type(model).forward.__doc__
            model.forward = types.MethodType(forward, model)
        state[_OPEN] = state.get(_OPEN, 0) + 1


def give_forward(model: Any) -> None:
    """Undo `take_forward`: the last open cache gives the model's forward back."""
    with _taken_lock:
        state = model.__dict__
        state[_OPEN] = state.get(_OPEN, 1) - 1
        if state[_OPEN] > 0:
            return
        del state[_OPEN]
        before = state.pop(_BEFORE, None)
        if before is not None:
            model.forward = before
        else:
            state.pop("forward", None)


def open_caches(model: Any) -> int:
    """How many `PagedCache`s of ``model`` are open (its forward taken over while any is)."""
    return model.__dict__.get(_OPEN, 0)
