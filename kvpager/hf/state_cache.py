"""Recurrent states held across generations (`kvpager.hf.recurrent`): one
`StateCache` a model, holding a sequence's states at block boundaries of the
tokens before them (prompts seen before, and where generations ended), under
keys of those tokens (`prefix_keys`, `prefix_key`, `PrefixKeys`), so a prompt
whose leading blocks are cached resumes there instead of running its recurrent
layers from its first token. The states themselves, and a batch's, are laid out
as `kvpager.hf.recurrent_states` takes them apart and puts them together.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvpager.errors import InvalidArgument
from kvpager.hf.recurrent_states import Layout, Rows, by_dtype
from kvpager.remote_format import format_id

#: what a state cache may hold by default, in bytes (`StateCache.max_bytes`)
STATE_CACHE_BYTES = 1 << 30


def prefix_keys(salt: Any, tokens: Sequence[int], block_size: int, upto: int) -> list[bytes]:
    """The keys of ``tokens``' prefixes of 1, 2, ... whole blocks, up to ``upto`` tokens:
    SHA-256 over the salt and the ids, extended a block at a time."""
    h = _salted(salt)
    ids = memoryview(np.asarray(tokens[:upto], dtype=np.int64).tobytes())
    step = 8 * block_size
    out = []
    for start in range(0, (upto - upto % block_size) * 8, step):
        h.update(ids[start : start + step])
        out.append(h.copy().digest())
    return out


def prefix_key(salt: Any, tokens: Sequence[int], upto: int) -> bytes:
    """The key of ``tokens``' first ``upto`` tokens (whole blocks): `prefix_keys`' last,
    in one pass over the ids."""
    h = _salted(salt)
    h.update(np.asarray(tokens[:upto], dtype=np.int64).tobytes())
    return h.digest()


class PrefixKeys:
    """`prefix_keys`, made when asked: the longest prefix's key alone first (one pass
    over the ids, what a prompt resumed where its cached blocks end asks for: a
    conversation's next turn), every key at the first ask for a shorter one. A
    sequence of ``upto // block_size`` keys, as `StateCache.longest` and `best`
    read them (8 prompts of 2,304 cached tokens: 1,152 digests before, 8 now)."""

    def __init__(self, salt: Any, tokens: Sequence[int], block_size: int, upto: int):
        self._args = (salt, tokens, block_size, upto)
        self._n = upto // block_size
        self._last: bytes | None = None
        self._all: list[bytes] | None = None

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> bytes:
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"prefix key {i} of {self._n}")
        if self._all is None:
            salt, tokens, block_size, _ = self._args
            if i == self._n - 1:
                if self._last is None:
                    self._last = prefix_key(salt, tokens, self._n * block_size)
                return self._last
            self._all = prefix_keys(*self._args)
        return self._all[i]


def held_key(salt: Any, model: Any, pool: Any) -> str:
    """What a call's held states are keyed under besides their tokens: the blocks'
    salt, the model's dtype, and the pool's storage format (`remote_format.format_id`:
    its dtype, and an FP8 pool's format and scales). A state depends on the K/V the
    attention layers before its recurrent layers read back: a bfloat16 pool resumed
    from a state computed over an FP8 pool's K/V, and gave other log-probabilities."""
    return f"{salt}|{next(model.parameters()).dtype}|{format_id(pool.spec)}"


def _salted(salt: Any) -> Any:
    """SHA-256 begun with ``salt`` (bytes as they are, anything else as its str)."""
    return hashlib.sha256(salt if isinstance(salt, bytes) else str(salt).encode())


class StateCache:
    """Recurrent states at block boundaries of prompts seen before, each under the
    key of the tokens before it (`prefix_keys`), dropped past ``max_bytes`` (0 keeps
    none). One a model (`of`), shared by its generations: a state depends only on
    the weights (in the salt) and the tokens before it, not on which pool its K/V went
    to, but for the pool's storage format (`held_key`: the K/V read back shape the
    hidden states the recurrent layers see). Threads generating with one model
    share it (a lock).

    ``hold_ends`` (default True): a generation also holds each sequence's states at
    the last block boundary it ran, prompt and answer (`kvpager.hf.recurrent`), so a
    conversation's next turn resumes after the answer instead of running it again.
    It keeps a second copy of the batch's states while the batch decodes (`States`
    marks), of at most ``max_bytes`` (the rows past those are not marked); False
    spares that memory.

    What goes first: a segmented LRU. A state comes in on probation (``fresh``); the
    first time a prompt resumes from it, it becomes the most recent there, and the
    second time it moves to ``used``. Past ``max_bytes`` the least recently used
    state on probation goes first, so a large batch's end states (most of which no
    next turn will ask for) cannot push out the states prompts keep resuming from (a
    shared system prompt's). ``used`` keeps at most `USED_SHARE` of the budget;
    beyond it its least recently used go back on probation.

    A conversation's turn resumes from the state its last turn ended at once and
    holds its own end: states served once are such checkpoints, which the next turn
    supersedes. Moved to ``used`` at their first serve (as before), they filled it
    in a few turns of a batch of conversations and left probation too small for one
    batch's new end states (a budget of 28 states, 21 of them in ``used``: of 8
    conversations' end states, one went before its next turn asked for it, which
    then ran its answer again, in a pass of its own)."""

    #: the share of ``max_bytes`` that states served at least once may keep
    USED_SHARE = 0.75

    def __init__(self, max_bytes: int = STATE_CACHE_BYTES, hold_ends: bool = True):
        # key -> (layout, rows, bytes), least recently used first
        self.fresh: OrderedDict[bytes, tuple[Layout, Rows, int]] = OrderedDict()
        self._served: set[bytes] = set()  # the keys on probation served once
        self.used: OrderedDict[bytes, tuple[Layout, Rows, int]] = OrderedDict()
        self.nbytes = self._used_bytes = 0
        self.hits = self.stores = 0
        self._lock = threading.Lock()
        self.max_bytes = max_bytes
        self.hold_ends = hold_ends

    def __reduce__(self) -> tuple[Any, tuple[int, bool]]:
        """A copy (``copy.deepcopy`` of its model, ``torch.save``) is an empty cache of
        the same budget: the states held are this process's memory, not the model's
        (its lock made both fail once a model had been served)."""
        return type(self), (self._max_bytes, self.hold_ends)

    @property
    def entries(self) -> dict[bytes, tuple[Layout, Rows, int]]:
        """Every state held (a copy of the index), in the order they would go."""
        with self._lock:
            return {**self.fresh, **self.used}

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        """A new budget: states go (in their order) until the rest fit (ValueError for
        anything but an int >= 0)."""
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InvalidArgument(f"StateCache.max_bytes must be an int >= 0, got {value!r}")
        with self._lock:
            self._max_bytes = int(value)
            self._evict()

    def _evict(self) -> None:
        while self._used_bytes > self.USED_SHARE * self._max_bytes and self.used:
            key, entry = self.used.popitem(last=False)  # back on probation, as its most recent
            self._used_bytes -= entry[2]
            self.fresh[key] = entry
            self._served.add(key)  # (served before: its next serve takes it back)
        while self.nbytes > self._max_bytes:
            key, (_, _, gone) = self.fresh.popitem(last=False)
            self._served.discard(key)
            self.nbytes -= gone

    @classmethod
    def of(cls, model: Any) -> StateCache:
        """``model``'s state cache (made at its first use, `STATE_CACHE_BYTES`)."""
        return model.__dict__.setdefault("_kvpager_states", cls())

    def longest(self, keys: Sequence[bytes], upto: int, block_size: int) -> int:
        """The longest prefix of at most ``upto`` tokens whose state is held (0: none);
        a look that counts nothing."""
        with self._lock:
            for n in range(min(upto // block_size, len(keys)), 0, -1):
                if keys[n - 1] in self.used or keys[n - 1] in self.fresh:
                    return n * block_size
        return 0

    def best(self, keys: Sequence[bytes], upto: int, block_size: int) -> tuple[int, Layout | None, Rows | None]:
        """The longest prefix of at most ``upto`` tokens whose state is held: (its
        length, its layout, its states), or (0, None, None). The state found is
        used now: the most recently used on probation the first time, of ``used`` after."""
        with self._lock:
            for n in range(min(upto // block_size, len(keys)), 0, -1):
                key = keys[n - 1]
                got = self.used.get(key)
                if got is not None:
                    self.used.move_to_end(key)
                else:
                    got = self.fresh.get(key)
                    if got is None:
                        continue
                    if key not in self._served:  # served once: the most recent on probation
                        self._served.add(key)
                        self.fresh.move_to_end(key)
                    else:  # twice: kept apart from probation's flood
                        self._served.discard(key)
                        del self.fresh[key]
                        self.used[key] = got
                        self._used_bytes += got[2]
                        self._evict()
                self.hits += 1
                return n * block_size, got[0], got[1]
        return 0, None, None

    def put(self, key: bytes, layout: Layout, rows: Rows) -> None:
        """Hold a copy of one sequence's states under ``key``, on probation (nothing
        where they alone pass ``max_bytes``)."""
        self.put_many([(key, layout, rows)])

    def put_many(self, entries: Sequence[tuple[bytes, Layout, Rows]]) -> None:
        """`put` for several sequences' states, their copies made by one multi-tensor
        copy a dtype (a generation's ended sequences: 8 of Qwen3.5's layout were 288
        copies, one launch each on a GPU)."""
        todo, seen = [], set()
        for key, layout, rows in entries:
            size = sum(t.numel() * t.element_size() for t in rows)
            if size > self.max_bytes or key in self.fresh or key in self.used or key in seen:
                continue
            seen.add(key)
            todo.append((key, layout, rows, size))
        if not todo:
            return
        copies = [tuple(torch.empty_like(t) for t in rows) for _, _, rows, _ in todo]
        for src, dst in by_dtype([t for _, _, rows, _ in todo for t in rows], [c for copy in copies for c in copy]):
            torch._foreach_copy_(dst, src)
        with self._lock:
            for (key, layout, _, size), copy in zip(todo, copies):
                if key in self.fresh or key in self.used:
                    continue
                self.fresh[key] = (layout, copy, size)
                self.nbytes += size
                self.stores += 1
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self.fresh.clear()
            self._served.clear()
            self.used.clear()
            self.nbytes = self._used_bytes = 0
            self.hits = self.stores = 0
