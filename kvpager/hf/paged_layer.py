"""One layer of a `kvpager.hf.PagedCache`: its K/V are in the pool, so it keeps
nothing and answers transformers' questions from the cache."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from kvpager.errors import InvalidArgument

try:  # transformers 4.56 on: a cache is a list of layers
    from transformers.cache_utils import CacheLayerMixin
except ImportError:  # pragma: no cover - older releases (PagedCache refuses them)
    CacheLayerMixin = object


class PagedLayer(CacheLayerMixin):
    """One layer's view of a `PagedCache`: its K/V are in the pool, so it keeps
    nothing and answers from the cache."""

    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, cache: Any, sliding: bool) -> None:
        super().__init__()
        # weakly: the cache holds its layers, and a cycle lived (its sequences held) until a cycle
        # collection, so a loop of `generate` calls each given a new cache ran out of blocks
        self._cache_ref = weakref.ref(cache)
        self.is_sliding = sliding
        self.is_initialized = True
        # nothing held here (the pool holds it): what a model that looks into its cache's layers
        # sees (Mllama asks whether a cross-attention layer holds states: none, text only)
        self.keys = self.values = torch.empty(0)

    @property
    def _cache(self) -> Any:
        cache = self._cache_ref()
        if cache is None:
            raise InvalidArgument("this PagedCache layer's cache was dropped (collected, its sequences freed): "
                                  "keep the cache, not its layers")
        return cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cache._update(key_states, value_states)

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        return self._cache.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self._cache.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # (its name before transformers 5.15)
        return -1

    def reset(self) -> None:
        return None

    def offload(self) -> None:
        return None

    def prefetch(self) -> None:
        return None
