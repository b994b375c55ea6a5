"""A transformers ``Cache`` whose K/V live in a kvpager pool: transformers' own ``generate`` on kvpager.

::

    from kvpager.hf import PagedCache

    with PagedCache(model, pool) as cache:                      # pool: a KVPool or a daemon Client
        out = model.generate(**enc, cache=cache, max_new_tokens=64, streamer=streamer)

Everything ``generate`` does through its cache runs unchanged: greedy and
sampled decoding, logits processors, stopping criteria, streamers,
``num_return_sequences``, beam search (`PagedCache.reorder_cache`: each beam a
fork of the one it continues, sharing its blocks), assisted decoding's
rollback (`crop`). Each forward pass over the cache (`kvpager.hf.cache_forward`)

1. allocates (a row's first tokens: those where its ``attention_mask`` is 1,
   sharing the blocks of any cached prefix under the model's salt) or appends
   (later passes) each row's new tokens in the pool, and makes one step plan
   (a decode pass over the rows of the last refills its plan in place:
   `kvpager.hf.decode_plans`);
2. runs the model with kvpager attention (`kvpager.hf.attention`): each layer
   writes its new K/V at the plan's slots and attends over the pool, padding
   neither stored nor read;
3. commits the blocks it filled, so other callers' prompts match them, and, in
   a model whose every layer has a sliding window, gives back the blocks
   behind every row's window (`PagedCache.release_margin` tokens kept for crops).

A prompt pass that keeps only its last positions' logits (what ``generate``
asks) runs less than it is fed: on prefix hits only each row's uncached tail
(`kvpager.hf.cached_tail`); rows that repeat others (beams, returned
sequences) once, their repeats forks (`kvpager.hf.repeated_rows`); a shared
prompt not yet cached once, in a pass of its own before the rows' tails
(`kvpager.hf.early_prefix`). The logits are the whole pass's.

A pass that raises leaves the sequences as they were before it (the first
pass's freed, later ones' appended tokens cut off), but for a row's last
tokens its mask dropped (`kvpager.hf.cache_mask`: cut before the pass runs).
The model is switched to kvpager attention for each pass alone
(`paged_attention`): between passes it
attends as before (during one, as with `paged_attention`, other threads'
calls of the same model object get kvpager attention too).

The switch needs the forward pass to come through the model the cache was
made for: the cache takes over that model's ``forward`` (an instance
attribute, a pass-through for calls without a `PagedCache`) while any of its
caches is open, and gives it back when the last is closed. Close a cache
(``with``, or `close`) to free its sequences: they hold their blocks until then.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvpager.errors import InvalidArgument, SessionLost, UnsupportedConfiguration, UnsupportedModel
from kvpager.hf.cache_ahead import PassAhead
from kvpager.hf.cache_forward import CacheForward
from kvpager.hf.cache_graphs import CacheGraphs
from kvpager.hf.cache_rows import CacheRows, Step, selected_rows
from kvpager.hf.captured_steps import CapturedSteps
from kvpager.hf.checks import check_model, check_model_and_pool
from kvpager.hf.decode_plans import DecodePlans
from kvpager.hf.eager import TORCH_DTYPES
from kvpager.hf.fed_positions import own_salt
from kvpager.hf.graphs import check_graph_options
from kvpager.hf.held_session import check_session, free_dropped, pool_session, sequences_gone
from kvpager.hf.model import has_recurrent_layers, layer_fit, layer_map, text_config
from kvpager.hf.paged_layer import PagedLayer
from kvpager.hf.rope import pass_dependent
from kvpager.hf.salt import call_salt
from kvpager.hf.switching import tuned_modules
from kvpager.hf.taken_forward import give_forward, open_caches, take_forward  # noqa: F401
from kvpager.hf.windows import layer_chunks
from kvpager.spec import dtype_name

try:  # transformers 4.56 on: a cache is a list of layers
    from transformers.cache_utils import Cache
except ImportError:  # pragma: no cover - older releases
    Cache = None


class PagedCache(CacheForward, Cache if Cache is not None else object):  # type: ignore[misc]
    """A transformers ``Cache`` over ``pool`` for ``model``: pass it to
    ``model.generate(..., cache=cache)`` (``past_key_values=`` on releases that
    name it so) or to the model's forward passes (``use_cache=True``). One
    batch's generation: its rows are the batch's, beam search and
    ``num_return_sequences`` forking them. ``salt``: the prefix cache's tenant
    (None: the model's `default_salt`; a model whose rotary frequencies follow
    each pass's length gets a salt of its own cache's, matched by no other).
    ``cuda_graphs`` (a GPU pool): decode passes replayed from CUDA graphs
    (`kvpager.hf.cache_graphs`; True: this cache's own, captured at its first
    decode pass; a `CapturedSteps`: kept across caches)."""

    #: a model's forward taken over (`kvpager.hf.taken_forward`) runs a pass given this cache through `_run`
    runs_passes = True

    #: tokens held past what the windows read, so that a crop of up to as many (assisted decoding's
    #: rejected drafts) leaves the next query's window held
    release_margin = 256

    def __init__(self, model: Any, pool: Any, *, salt: str | bytes | None = None, cuda_graphs: Any = False) -> None:
        if Cache is None:
            import transformers

            raise UnsupportedConfiguration(
                f"PagedCache needs transformers 4.56 or later (caches made of layers); this is "
                f"{transformers.__version__}: use kvpager.hf.generate")
        check_model_and_pool(model, pool)
        if has_recurrent_layers(model):
            raise UnsupportedModel(
                f"{type(model).__name__} has recurrent layers, whose states transformers keeps in its own cache "
                "classes: use kvpager.hf.generate, which holds them (kvpager.hf.recurrent)")
        windows = check_model(model, pool)
        salt = call_salt(model, salt, "PagedCache")
        kept = isinstance(cuda_graphs, CapturedSteps)
        if not kept:
            check_graph_options(model, pool, cuda_graphs, False)
        # (K/V of frequencies that depend on the passes that computed them: this cache's own, and
        # no pass split in two, whose first would compute other frequencies: `early_prefix`)
        self._splits = pass_dependent(model)[0] is None
        if not self._splits:
            salt = own_salt(salt)
        layers = text_config(model).num_hidden_layers
        super().__init__(layers=[PagedLayer(self, windows[i] is not None) for i in range(layers)])
        self.model, self.pool, self.salt = model, pool, salt
        self._windows = windows
        self._layer_map = layer_map(model)
        self._chunks = layer_chunks(model, pool.spec.block_size)
        # layers whose windows or chunks transformers counts in cache columns (`cache_mask`)
        self._by_columns = any(w is not None for w in windows) or any(c is not None for c in self._chunks)
        self._fit = layer_fit(model)
        # layers that scale their queries by position (Llama-4's NoPE layers) read each pass's positions
        self._tuned = bool(tuned_modules(model))
        # layers that reuse an earlier layer's K/V attend with every query of the plan: a forward
        # that would cut their inputs to the kept logits' positions (Gemma-4's, for an int
        # logits_to_keep) is handed those positions as indices instead, which it does not cut by
        self._keeps_all = self._layer_map is not None and any(p >= 0 and not s for p, s in self._layer_map)
        self._plans = DecodePlans(pool, text_config(model).num_attention_heads)
        self._signature = inspect.signature(type(model).forward)
        self._takes_positions = "position_ids" in self._signature.parameters
        self._dtype = TORCH_DTYPES[dtype_name(pool.spec.dtype)]
        self._device = torch.device(str(getattr(pool, "device", "cpu")))
        # a model whose every layer has a sliding window: each row's blocks before the positions no
        # later query reads (past `release_margin` tokens more, for crops) given back after each pass
        reach = max(windows) if windows and None not in windows and hasattr(pool, "release_before") else None
        self._rows = CacheRows(pool, reach)
        self._rows.session = pool_session(pool)  # (the one its sequences are held in: `held_session`)
        self._step: Step | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._graphs = CacheGraphs(self, cuda_graphs) if kept or cuda_graphs else None
        self._ahead = PassAhead(self)  # the next decode pass's slots and plan, taken while one runs
        take_forward(model)
        # a cache dropped without `close` (as transformers' own caches are): its sequences freed at
        # the pool's next call, the model's forward given back (`_dropped`)
        self._finalizer = weakref.finalize(self, _dropped, pool, self._rows, model)

    # -- what transformers asks of a cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The tokens each row was fed, pads included (what a DynamicCache's length counts)."""
        return self._rows.columns

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        # (before transformers 5.10 the pass's cache positions, whose count is its length)
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self._rows.columns + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # (its name before transformers 5.15)
        return -1

    @property
    def seq_ids(self) -> list[int | None]:
        """Each row's sequence in the pool (None: a row not yet fed a token)."""
        return self._rows.seq_ids

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids) if self.seq_ids else -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return True

    def reorder_cache(self, beam_idx: Any) -> None:
        """Beam search: row i continues row ``beam_idx[i]`` (a fork of it where
        another row continues it too); rows none continues are freed."""
        self._select(beam_idx, "reorder_cache")

    def batch_select_indices(self, indices: Any) -> None:
        """Keep the rows ``indices`` selects, as a tensor index does: row indices
        (repeats forks), or a bool mask of one entry a row (its True rows)."""
        self._select(selected_rows(indices, len(self.seq_ids)), "batch_select_indices")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if type(repeats) is not int or repeats < 1:
            raise InvalidArgument(f"batch_repeat_interleave: repeats must be an int >= 1, got {repeats!r}")
        self._select([r for r in range(len(self.seq_ids)) for _ in range(repeats)], "batch_repeat_interleave")

    def crop(self, tokens_to_remove: int) -> None:
        """Cut the last ``-tokens_to_remove`` tokens of every row (assisted
        decoding's rollback). As transformers' caches take it: a negative count
        removes; a positive one is the length to keep (what transformers before
        5.15 pass; nothing cut where the rows hold no more); 0 cuts nothing. An
        integer 0-d tensor or NumPy integer counts as its int (prompt-lookup decoding
        on a GPU passes a device tensor)."""
        given = tokens_to_remove
        if isinstance(given, (bool, np.bool_)) or isinstance(given, torch.Tensor) and (
                given.ndim or given.dtype == torch.bool or given.is_floating_point()):
            tokens_to_remove = None
        else:
            try:
                tokens_to_remove = operator.index(given)
            except TypeError:
                tokens_to_remove = None
        if tokens_to_remove is None:
            raise InvalidArgument(f"crop: pass an int (negative: the tokens to remove from every row; positive: "
                                  f"the length to keep), got {given!r}")
        cut = -tokens_to_remove if tokens_to_remove <= 0 else max(self._rows.columns - tokens_to_remove, 0)
        if not cut:
            return
        with self._lock:
            self._check_open("crop")
            self._ahead.drop()
            self._rows.crop(cut, self.release_margin)

    def reset(self) -> None:
        """Free every row's sequence: the cache is empty again (open), also after
        its client's session was lost (its sequences went with it)."""
        with self._lock:
            if self._closed:
                self._check_open("reset")
            self._free_rows()

    def __deepcopy__(self, memo: dict[int, Any]) -> PagedCache:
        """A new open cache over the same model and pool whose rows continue this
        one's, each row's sequence forked (its blocks shared, its last one copied on
        write): transformers' prompt-reuse recipe (``copy.deepcopy(prompt_cache)``
        for each continuation) without copying any K/V. Close it as any cache. A
        model whose K/V follow each pass's length gets a salt of the copy's own;
        a cache replaying `CapturedSteps` (one cache at a time) gives its copy
        steps of its own (``cuda_graphs=True``)."""
        with self._lock:
            self._check_open("deepcopy")
            self._ahead.drop()
            other = PagedCache(self.model, self.pool, cuda_graphs=self._graphs is not None)
            other.salt = self.salt if self._splits else own_salt(self.salt)
            other.release_margin = self.release_margin
            held = [s for s in self.seq_ids if s is not None]
            forks = iter(self.pool.fork(held) if held else [])
            try:
                self._rows.copy_onto(other._rows, [None if s is None else next(forks)[0] for s in self.seq_ids])
            except BaseException:
                other.close()
                raise
            memo[id(self)] = other
            return other

    # -- lifetime

    def close(self) -> None:
        """Free the sequences (their committed blocks stay matchable) and give the
        model's ``forward`` back if no other cache of it is open. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._finalizer.detach()
            try:
                self._free_rows()
                if self._graphs is not None:
                    self._graphs.close()
            finally:
                give_forward(self.model)

    def __enter__(self) -> PagedCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.seq_ids)} rows, {self._rows.columns} tokens a row"
        return f"PagedCache({type(self.model).__name__}, {state})"

    # -- rows (a pass's own: `kvpager.hf.cache_forward`)

    def _select(self, parents: Any, what: str) -> None:
        """Row i becomes a continuation of row ``parents[i]``: the first row that
        continues a sequence takes it, the others fork it, the sequences no row
        continues are freed."""
        if isinstance(parents, torch.Tensor):
            parents = parents.tolist()
        if isinstance(parents, (list, tuple, np.ndarray)) and any(isinstance(p, (bool, np.bool_)) for p in parents):
            raise InvalidArgument(f"{what}: rows must be ints (a row a continuing row), not a bool mask")
        parents = [int(p) for p in parents] if isinstance(parents, (list, tuple, np.ndarray)) else parents
        with self._lock:
            self._check_open(what)
            n = len(self.seq_ids)
            if not isinstance(parents, list) or any(not 0 <= p < n for p in parents) or (n and not parents):
                raise InvalidArgument(f"{what}: rows must be a 1-D list or tensor of ints in [0, {n})")
            if parents != list(range(n)):
                self._ahead.drop()
                self._rows.reorder(parents)

    def _free_rows(self) -> None:
        self._ahead.forget()
        self._plans.drop()
        if sequences_gone(self.pool, self._rows.session):
            self._rows.clear()
            self._rows.session = pool_session(self.pool)
            return
        with contextlib.suppress(SessionLost):  # (the client closed, or its session ended: the daemon freed them)
            self._rows.free()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise InvalidArgument(f"{what}: this PagedCache is closed (its sequences were freed); make a new one")
        if self._rows.session != pool_session(self.pool):
            if any(s is not None for s in self._rows.seq_ids):
                check_session(self.pool, self._rows.session, what, "PagedCache")
            self._rows.session = pool_session(self.pool)  # (no sequence held yet: it moves to the new session)


def _dropped(pool: Any, rows: CacheRows, model: Any) -> None:
    """A cache collected without `close`: its sequences held their blocks until the
    pool (or the client's session) closed, so a loop that gave each ``generate`` a
    new cache and dropped it filled the pool. They are freed at the pool's next
    call (`KVPool.free_later`, `Client.free_later`: the collector may run in the
    middle of one, on any thread), unless its client's session changed since
    (they went with it), and the model's forward is given back."""
    ids = [s for s in rows.seq_ids if s is not None]
    rows.seq_ids = []
    free_dropped(pool, ids, rows.session)
    give_forward(model)


__all__: Sequence[str] = ["PagedCache", "open_caches"]  # (open_caches: `kvpager.hf.taken_forward`)
