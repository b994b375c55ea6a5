"""`BlockMarks`: what a worker's `TableMirror` knows of single blocks.

Two marks a block id, each a bool array grown as ids come:

- *issued*: an allocate or append reply gave the block to these sequences
  since the last change that may release blocks, so a write's slots found
  here need no search of every mirrored table;
- *published*: the block's K/V is in the prefix cache as far as these
  sequences know (a prefix hit found it, or their commit filled it), so a
  mapped write into it is refused, as the daemon refuses a staged one, until
  an allocate or append gives it to write again (the daemon copied or
  un-published it first).
"""

from __future__ import annotations

import numpy as np


class BlockMarks:
    """The issued and published marks of one session's blocks."""

    def __init__(self, block_size: int):
        self._shift = block_size.bit_length() - 1
        self._issued = np.zeros(0, dtype=bool)
        self._published = np.zeros(0, dtype=bool)

    def issue(self, slots: np.ndarray) -> None:
        """The blocks of ``slots`` (an allocate's or append's, -1 for none) are
        these sequences', to write: issued, and no longer published."""
        if not len(slots):
            return
        blocks = np.asarray(slots, np.int64) >> self._shift
        blocks = blocks[blocks >= 0]
        if not len(blocks):
            return
        self._issued = _marked(self._issued, blocks)
        self.unpublish(blocks)

    def all_issued(self, blocks: np.ndarray) -> bool:
        """Whether every one of ``blocks`` (non-empty) was issued since `forget_issued`."""
        issued = self._issued
        return int(blocks.max()) < len(issued) and bool(issued[blocks].all())

    def forget_issued(self) -> None:
        """A change that may release blocks: none is known to be held any more."""
        self._issued[:] = False

    def publish(self, blocks: np.ndarray) -> None:
        """``blocks`` hold K/V other sessions may read through the prefix cache."""
        blocks = blocks[blocks > 0]  # (the null block: released entries)
        if len(blocks):
            self._published = _marked(self._published, blocks)

    def unpublish(self, blocks: np.ndarray) -> None:
        """``blocks`` are given to write (again): no mark of them holds."""
        pub = self._published
        if len(pub) and len(blocks):
            pub[blocks[blocks < len(pub)]] = False

    def published_of(self, blocks: np.ndarray) -> np.ndarray:
        """Those of ``blocks`` marked published."""
        pub = self._published
        if not len(pub) or not len(blocks):
            return blocks[:0]
        inside = blocks[blocks < len(pub)]
        return inside[pub[inside]]

    def clear(self) -> None:
        """Forget every mark (the session is lost or closed)."""
        self._issued = np.zeros(0, dtype=bool)
        self._published = np.zeros(0, dtype=bool)


def _marked(flags: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """``flags`` (a bool a block id, grown to hold ``blocks``: doubled at least) with ``blocks`` set."""
    top = int(blocks.max()) + 1
    if top > len(flags):
        grown = np.zeros(max(top, 2 * len(flags)), dtype=bool)
        grown[: len(flags)] = flags
        flags = grown
    flags[blocks] = True
    return flags
