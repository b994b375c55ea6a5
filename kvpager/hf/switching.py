"""Switching a transformers model to kvpager attention for a block (`paged_attention`).

The attention function is chosen by name in the model's (shared) config, so the
switch is counted across threads, and the modules that scale their queries by
position themselves (Llama-4's NoPE layers) have that scaling switched off
meanwhile, for kvpager to apply (`kvpager.hf.attention.write_attend`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from kvpager.errors import OutsidePagedPass  # noqa: F401 - re-exported: its home is kvpager.errors
from kvpager.hf.model import shared_attention, temperature_tuned

ATTN_IMPLEMENTATION = "kvpager"


#: models switched to kvpager attention now, by id of their config: [blocks inside, the name to restore,
#: the modules whose own query scaling by position is off meanwhile (`_untune`)]
_switched: dict[int, list[Any]] = {}
_switch_lock = threading.Lock()


@contextlib.contextmanager
def paged_attention(model: torch.nn.Module) -> Iterator[None]:
    """Switch ``model`` to kvpager attention for the duration of the block. The
    switch lives in the model's (shared) config, so it is counted: threads
    generating with one model at once keep it switched until the last of them
    leaves, which restores the attention it had before the first came in. (While
    any is inside, the model runs kvpager attention for every caller.)"""
    config = model.config
    with _switch_lock:
        entry = _switched.get(id(config))
        if entry is None:
            entry = _switched[id(config)] = [0, config._attn_implementation, _untune(model), _tell_layers(model)]
            if entry[1] != ATTN_IMPLEMENTATION:
                _set_attn(model, ATTN_IMPLEMENTATION)
        entry[0] += 1
    try:
        yield
    finally:
        with _switch_lock:
            entry[0] -= 1
            if not entry[0]:
                del _switched[id(config)]
                if entry[1] != ATTN_IMPLEMENTATION:
                    _set_attn(model, entry[1])
                _retune(entry[2])
                _untell(entry[3])


def attention_before(config: Any) -> str | None:
    """The attention a model of ``config`` had before `paged_attention` switched it, while
    it is switched (None where it is not, or had kvpager attention already)."""
    entry = _switched.get(id(config))
    return None if entry is None or entry[1] == ATTN_IMPLEMENTATION else entry[1]


def _untune(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Switch off the attention modules' own query scaling by position
    (`kvpager.hf.model.temperature_tuned`), which would count positions from
    a cache kvpager's packed row does not have; each remembers its (attn_scale,
    floor_scale) for kvpager to apply (`write_attend`). Returns the modules
    (found at the model's first switch, then kept on it: a walk over an 8B
    model's modules would cost each pass a tenth of a millisecond)."""
    tuned = tuned_modules(model)
    for m in tuned:
        m.attn_temperature_tuning = False
        m._kvpager_tuning = (float(m.attn_scale), float(m.floor_scale))
    return tuned


def tuned_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``model``'s modules that scale their queries by position themselves
    (`kvpager.hf.model.temperature_tuned`: Llama-4's NoPE layers), found at the
    first call and then kept on the model."""
    tuned = model.__dict__.get("_kvpager_tuned")
    if tuned is None:
        tuned = model.__dict__["_kvpager_tuned"] = [m for m in model.modules() if temperature_tuned(m)]
    return tuned


def _retune(modules: list[torch.nn.Module]) -> None:
    """Undo `_untune`."""
    for m in modules:
        m.attn_temperature_tuning = True
        del m._kvpager_tuning


def _tell_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Have each attention module shared by several layers (Zamba's and Zamba2's:
    `kvpager.hf.model.shared_attention`), which transformers tells its layer at
    each call, pass that layer on to kvpager's attention (the keyword
    ``kvpager_layer``, which its forward hands to the attention function with its
    other keywords). Returns the modules (found at the model's first switch, then
    kept on it)."""
    shared = model.__dict__.get("_kvpager_shared")
    if shared is None:
        shared = model.__dict__["_kvpager_shared"] = [
            (m, _telling(m.forward, at)) for m in model.modules() if (at := shared_attention(m)) is not None]
    for m, told in shared:
        m.forward = told
    return [m for m, _ in shared]


def _telling(forward: Any, at: int) -> Any:
    """``forward`` (a shared attention module's, its layer the argument at ``at`` or
    the keyword ``layer_idx``) passing that layer on as ``kvpager_layer``."""

    def told(*args: Any, **kwargs: Any) -> Any:
        layer = kwargs["layer_idx"] if "layer_idx" in kwargs else args[at]
        return forward(*args, kvpager_layer=layer, **kwargs)

    return told


def _untell(modules: list[torch.nn.Module]) -> None:
    """Undo `_tell_layers`."""
    for m in modules:
        del m.forward


def _set_attn(model: torch.nn.Module, name: str) -> None:
    """Switch the attention function. The attention modules read it from the
    (shared) config at call time, so the config's setter, which also reaches
    sub-configs, is enough: ``set_attn_implementation`` walks every module and
    costs about a millisecond a switch, twice per forward pass."""
    model.config._attn_implementation = name
