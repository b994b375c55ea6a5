"""What a sequence's prefix-cache keys are made of: its known token ids and
the keys of its blocks. Read and written only on the hashing path (allocate,
commit, swap-in re-publish) and when tokens are appended with their ids; the
decode hot path works on the block table's arrays instead.

A fork does not copy its parent's history: parent and child hold the same
object, marked ``shared``, and whoever changes its token ids first takes a
copy (`writable`). Filling in keys of full blocks (`History.key_blocks`) is
not a change: a key is a function of the root and the known ids, which stay
the same for every holder while it is shared."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvpager.prefix_cache import block_key, chain_keys


@dataclass(eq=False, slots=True)
class History:
    """``prompt`` + ``tail`` are the known token ids, a prefix of the sequence's
    tokens: ids of appended tokens are kept while every one was given."""

    prompt: np.ndarray  # int64, given at allocate (shared by forks, never mutated)
    root: bytes  # parent key of block 0 (from the salt)
    keys: list[bytes] = field(default_factory=list)  # keys of blocks 0..k-1
    tail: list[int] = field(default_factory=list)  # ids appended after the prompt
    salt: str | bytes | None = None  # the root's salt: names its blocks' tenant
    shared: bool = False  # held by several sequences (forks): copy before changing ids or cutting keys

    @property
    def num_known(self) -> int:
        return len(self.prompt) + len(self.tail)

    def known(self, start: int, stop: int) -> np.ndarray:
        """Known token ids ``[start, stop)`` as int64."""
        p = len(self.prompt)
        if stop <= p:
            return self.prompt[start:stop]
        if start >= p:  # all in the tail (a decode step's block)
            return np.array(self.tail[start - p : stop - p], dtype=np.int64)
        head = self.prompt[start:p] if start < p else self.prompt[:0]
        return np.concatenate([head, np.array(self.tail[max(start - p, 0) : stop - p], dtype=np.int64)])

    def key_blocks(self, full: int, block_size: int) -> list[bytes]:
        """The keys of blocks ``0..full-1`` (hashing the ones not hashed yet)."""
        start = len(self.keys)
        if full > start:
            parent = self.keys[-1] if start else self.root
            at = start * block_size - len(self.prompt)
            if full == start + 1 and at >= 0 and len(self.tail) >= at + block_size:  # a decode step's block
                self.keys.append(block_key(parent, self.tail[at : at + block_size]))
            else:
                self.keys += chain_keys(parent, self.known(start * block_size, full * block_size), block_size)
        return self.keys

    def truncate(self, num_tokens: int, block_size: int) -> None:
        """Forget ids and keys past ``num_tokens`` tokens."""
        if num_tokens <= len(self.prompt):
            self.prompt, self.tail = self.prompt[:num_tokens], []
        else:
            del self.tail[num_tokens - len(self.prompt) :]
        del self.keys[num_tokens // block_size :]

    def share(self) -> History:
        """This history, for one more sequence (a fork): marked shared."""
        self.shared = True
        return self

    def copy(self) -> History:
        """A private copy: the same ids and keys, not shared."""
        return History(self.prompt, self.root, self.keys.copy(), self.tail.copy(), self.salt)


def writable(history: dict[int, History], seq_id: int) -> History:
    """``seq_id``'s history, to change its ids or cut its keys: a private copy
    first (kept in ``history``) if it is shared."""
    h = history[seq_id]
    if h.shared:
        h = history[seq_id] = h.copy()
    return h
