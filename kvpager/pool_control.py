"""`KVPool`'s control and ownership: pins (`kvpager.pins`), tenants' quotas
(`kvpager.tenants`), and which owner (a daemon's session) holds which sequence."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from kvpager import validate
from kvpager.types import PinInfo

EVERY = object()  # pins() / sequences(): no owner filter (None is an owner: the embedded one)


class PoolControl:
    """Mixed into `KVPool`, which supplies ``spec`` and ``manager``."""

    def pin(self, prompts: Seq[Seq[int]], salt: str | bytes | None | Seq[str | bytes | None] = None, *,
            owner: Any = None, max_listed: int | None = None) -> list[int]:
        """Pin the longest cached prefix of full blocks of each prompt: its blocks
        stay in the prefix cache, never evicted, until unpinned. Returns the tokens
        pinned per prompt (0: none of it is cached; nothing is waited for). Pinning
        a prefix again counts: each `unpin` drops one. LimitExceeded (nothing
        changes) past ``max_pinned_blocks``, or where ``owner``'s pins would list
        more than ``max_listed`` blocks (each distinct pin its own: a daemon's
        per-session bound). ``owner``: whose pin (a daemon's session)."""
        validate.prompts(prompts)
        validate.owner(owner)
        salts = validate.per_seq(salt, len(prompts), "salt")
        m = self.manager
        if max_listed is not None:
            max_listed = validate.whole_in(max_listed, "max_listed", 0)
        return m.pins.pin(m.pool, self.spec.block_size, prompts, salts, owner, max_listed)

    def unpin(self, prompts: Seq[Seq[int]], salt: str | bytes | None | Seq[str | bytes | None] = None, *,
              owner: Any = None) -> list[int]:
        """Drop one of ``owner``'s pins per prompt, of its longest pinned prefix;
        returns the tokens it held. NotPinned (nothing changes) for a prompt
        ``owner`` holds no pin of. Unpinned blocks become evictable, still cached."""
        validate.prompts(prompts)
        validate.owner(owner)
        salts = validate.per_seq(salt, len(prompts), "salt")
        m = self.manager
        return m.pins.unpin(m.pool, self.spec.block_size, prompts, salts, owner)

    def release_pins(self, owner: Any) -> int:
        """Drop every pin of ``owner`` (the daemon: a session that ended); returns how many."""
        m = self.manager
        return m.pins.release(m.pool, validate.owner(owner))

    def pins(self, owner: Any = EVERY) -> list[PinInfo]:
        """Every pin, or ``owner``'s, in the order they were made (`PinInfo.pin_id`)."""
        pins, bs = self.manager.pins, self.spec.block_size
        return pins.infos(bs) if owner is EVERY else pins.infos(bs, validate.owner(owner))

    def pins_page(self, after: int = -1, limit: int = 4096, max_blocks: int = 1 << 16) -> list[PinInfo]:
        """The pins made after pin ``after`` (a `PinInfo.pin_id`; -1: from the first),
        in that order: at most ``limit``, and no more once they list ``max_blocks``
        blocks (a longer pin alone). A daemon's `pins` request answers one page."""
        return self.manager.pins.page(self.spec.block_size, validate.whole_in(after, "after", -1),
                                      validate.whole_in(limit, "limit", 1),
                                      validate.whole_in(max_blocks, "max_blocks", 1))

    def pin_counts(self) -> dict[Any, int]:
        """Pins held per owner (the owners that hold any)."""
        return self.manager.pins.counts()

    def set_quota(self, salt: str | bytes | None, blocks: int | None) -> None:
        """A soft quota on the cached blocks of ``salt``'s tenant (None: none; else
        an integer, a NumPy one too, in [0, 2**63)): when the pool must evict, it
        takes from tenants over their quota first (least recently used among
        them), then the global LRU (`kvpager.tenants`)."""
        self.manager.pool.set_quota(salt, blocks)

    # -- ownership (the daemon's sessions) ----------------------------------------------
    def owned(self, owner: Any) -> list[int]:
        """Ids of ``owner``'s live sequences, in id order."""
        return self.manager.owned(owner)

    def sequence_ids(self) -> list[int]:
        """Every live sequence's id, in id order (ids only increase: no sort)."""
        return self.manager.ids()

    def owners(self) -> list[Any]:
        """Every owner that has a live sequence."""
        return self.manager.owners.live()

    def check_owner(self, seq_ids: int | Seq[int], owner: Any, op: str | None = None) -> None:
        """Raise UnknownSequence or NotOwner unless every sequence is live and ``owner``'s
        (InvalidArgument, naming ``op``, for ids given twice among unknown ones)."""
        self.manager.check_owner(validate.seq_ids(seq_ids), owner, op)
