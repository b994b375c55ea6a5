"""Pins: committed prefixes held in the prefix cache, never evicted.

A pin is one reference on each block of the longest cached prefix of full
blocks of a prompt (under its salt), as a sequence's block table is: while
pinned, those blocks are in use, so eviction never takes them, and being
full and published they are never written again (an append to a sequence
that shares one copies it first). Pinning finds what is cached now: it
pins that much and says how many tokens; the rest of the prompt is not
waited for (pin again once more is committed: that is another pin, of the
longer prefix).

A pin belongs to an owner (a daemon session's name; None for the pool's
own), is known by its owner and the key of its last block (so by the exact
prefix and salt), and is counted: pinning the same prefix again adds a
reference, and each unpin drops one. `unpin` drops the caller's pin of the
longest pinned prefix of the prompt; a prompt with none of the caller's
pins is `NotPinned`. Distinct pinned blocks are capped (`limit`): a pin over
the cap is `LimitExceeded` and changes nothing.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager.block_refs import MAX_REFS
from kvpager.errors import InvalidArgument, LimitExceeded, NotPinned
from kvpager.prefix_cache import chain_keys, root_key, token_array
from kvpager.types import PinInfo
from kvpager.validate import shown

if TYPE_CHECKING:
    from kvpager.block_pool import BlockPool

EVERY = object()  # `infos`: every owner's pins (None is an owner: the pool's own)

#: The most references all pins together hold on one block: half of its int32 count
#: (`kvpager.block_refs.MAX_REFS`), so the sequences that share it always have the
#: other half (pins filled it to the top before, and another session's fork of a
#: sequence over it wrapped its count negative, its allocate of the prefix failed).
MAX_PIN_REFS = 1 << 30


#: A listed block's bytes in a reply, at most (a msgpack int of a block id): a salt's
#: bytes count this many to a block where a page is bounded by blocks.
SALT_BYTES_A_BLOCK = 8


def salt_bytes(salt: str | bytes | None) -> int:
    """What ``salt`` takes in a reply: its UTF-8 bytes (a str), its bytes, or 0."""
    if salt is None:
        return 0
    return len(salt.encode("utf-8", "surrogatepass")) if isinstance(salt, str) else len(salt)


@dataclass(eq=False)
class Pin:
    owner: Any
    salt: str | bytes | None
    keys: list[bytes]  # of its blocks, first to last
    blocks: np.ndarray  # int64, the blocks published under ``keys``
    count: int
    pin_id: int  # in the order pins were made: what `PinTable.page` lists by

    def info(self, block_size: int) -> PinInfo:
        return PinInfo(self.owner, self.salt, len(self.blocks) * block_size, self.count,
                       tuple(self.blocks.tolist()), self.pin_id)


class PinTable:
    """Every pin by owner and last key, and pin references per block."""

    def __init__(self, num_blocks: int, limit: int):
        self.refs = np.zeros(num_blocks, dtype=np.int32)  # pin references per block
        self.num_pinned = 0  # blocks with refs > 0
        self.limit = limit
        self.pins: dict[Any, dict[bytes, Pin]] = {}  # owner -> last key -> pin
        self.num_listed: dict[Any, int] = {}  # owner -> blocks its pins list (`listed`)
        # every live pin by id, and the ids made, ascending (ids of dropped pins too, until
        # they outnumber the live ones): a page of pins starts with a bisection
        self.by_id: dict[int, Pin] = {}
        self.ids: list[int] = []
        self.next_id = 0

    def pin(self, pool: BlockPool, block_size: int, prompts: Seq[Any], salts: Seq[Any], owner: Any,
            max_listed: int | None = None) -> list[int]:
        """Pin the longest cached prefix of full blocks of each prompt; returns
        the tokens pinned per prompt (0: nothing of it is cached). ``max_listed``:
        the most blocks ``owner``'s pins may list (`listed`)."""
        plans = []
        for i, prompt in enumerate(prompts):
            tokens = token_array(prompt, f"prompts[{i}]")
            keys, hits = pool.match(root_key(salts[i]), tokens, block_size, len(tokens) // block_size)
            plans.append((salts[i], keys, np.array(hits, dtype=np.int64)))
        if max_listed is not None:
            mine, new = self.pins.get(owner, {}), {}
            for _, keys, blocks in plans:
                if len(blocks) and keys[-1] not in mine:
                    new[keys[-1]] = len(blocks)
            listed = self.listed(owner) + sum(new.values())
            if listed > max_listed:
                raise LimitExceeded(
                    f"pin: {listed} blocks listed by this session's pins would be over the limit of {max_listed} "
                    "(each distinct pin lists its blocks; KVPAGER_MAX_PIN_BLOCKS, kvpager serve --max-pin-blocks)",
                    "pin_blocks", listed, max_listed)
        every = np.concatenate([p[2] for p in plans]) if plans else np.zeros(0, np.int64)
        fresh = len(np.unique(every[self.refs[every] == 0]))
        if self.num_pinned + fresh > self.limit:
            raise LimitExceeded(
                f"pin: {self.num_pinned + fresh} pinned blocks would be over the limit of {self.limit} "
                "(kvpager serve --max-pinned-blocks, KVPool(max_pinned_blocks=...))",
                "pinned_blocks", self.num_pinned + fresh, self.limit)
        if len(every):
            ids, times = np.unique(every, return_counts=True)
            counted = self.refs[ids].astype(np.int64) + times
            most = int(counted.max())
            if most > MAX_PIN_REFS:  # (a pin is counted: a session may pin one prompt 65,536 times a request)
                b = int(ids[int(np.argmax(counted))])
                raise LimitExceeded(f"pin: block {b} would hold {most} pins' references, over the {MAX_PIN_REFS} "
                                    "pins may hold on one block (the rest of its int32 count is the sequences' "
                                    "that share it); unpin some first", "pin_references", most, MAX_PIN_REFS)
            if int((pool.ref_cnt[ids] + times).max()) > MAX_REFS:
                raise InvalidArgument(f"pin: these pins would pass a block's reference count (int32, at most "
                                      f"{MAX_REFS}); unpin some first")
            pool.touch(every)  # a reference each: an evictable block is taken back into use
            np.add.at(self.refs, every, 1)
            self.num_pinned += fresh
        mine = self.pins.setdefault(owner, {})
        for salt, keys, blocks in plans:
            if len(blocks):
                pin = mine.get(keys[-1])
                if pin is None:
                    pin = mine[keys[-1]] = self.by_id[self.next_id] = Pin(owner, salt, keys, blocks, 1, self.next_id)
                    self.ids.append(self.next_id)
                    self.next_id += 1
                    self.num_listed[owner] = self.num_listed.get(owner, 0) + len(blocks)
                else:  # the same prefix: the same blocks, held since it was pinned
                    pin.count += 1
        if not mine:
            del self.pins[owner]
        return [len(p[2]) * block_size for p in plans]

    def unpin(self, pool: BlockPool, block_size: int, prompts: Seq[Any], salts: Seq[Any], owner: Any) -> list[int]:
        """Drop one of ``owner``'s pins per prompt: the one of the longest pinned
        prefix. All or nothing: NotPinned if a prompt has none left."""
        mine = self.pins.get(owner, {})
        taken: dict[bytes, int] = {}  # pins this batch drops, by last key
        chosen = []
        for i, prompt in enumerate(prompts):
            tokens = token_array(prompt, f"prompts[{i}]")
            keys = chain_keys(root_key(salts[i]), tokens, block_size)
            pin = next((mine[k] for k in reversed(keys) if mine.get(k) is not None
                        and mine[k].count > taken.get(k, 0)), None)
            if pin is None:
                who = "the pool" if owner is None else f"session {owner}"
                raise NotPinned(f"unpin: prompts[{i}] ({len(tokens)} tokens, salt {shown(salts[i])}) has no "
                                f"pin of {who} left")
            taken[pin.keys[-1]] = taken.get(pin.keys[-1], 0) + 1
            chosen.append(pin)
        for pin in chosen:
            pin.count -= 1
            if not pin.count:
                del mine[pin.keys[-1]]
                self._forget([pin])
        self._release(pool, [pin.blocks for pin in chosen], [1] * len(chosen))
        if owner in self.pins and not mine:
            del self.pins[owner]
        return [len(p.blocks) * block_size for p in chosen]

    def listed(self, owner: Any) -> int:
        """Blocks listed by ``owner``'s pins, each distinct pin its own (what a
        daemon bounds per session: memory, and the ``pins`` reply). Kept as pins
        come and go: summed over them, every pin of a session holding 20,000
        took ~20x as long as its first, on the daemon's loop."""
        return self.num_listed.get(owner, 0)

    def release(self, pool: BlockPool, owner: Any) -> int:
        """Drop every pin of ``owner`` (a session that ended); returns how many."""
        pins = list(self.pins.pop(owner, {}).values())
        self._forget(pins)
        self._release(pool, [pin.blocks for pin in pins], [pin.count for pin in pins])
        return len(pins)

    def _forget(self, pins: list[Pin]) -> None:
        """Drop ``pins`` from the listing by id; their ids stay in ``ids`` until the
        dropped ones outnumber the live ones (then they go, in one pass: once for
        all of a session's pins when it ends)."""
        by_id, listed = self.by_id, self.num_listed
        for pin in pins:
            del by_id[pin.pin_id]
            left = listed[pin.owner] - len(pin.blocks)
            if left:
                listed[pin.owner] = left
            else:
                del listed[pin.owner]
        if len(self.ids) > 2 * len(by_id) + 64:
            self.ids = [i for i in self.ids if i in by_id]

    def _release(self, pool: BlockPool, blocks: list[np.ndarray], times: list[int]) -> None:
        """Drop ``times[i]`` references from each block of ``blocks[i]`` (a pin's,
        distinct), all pins in one pass: memory and time as their blocks, whatever
        the counts, and each block freed at its last listing, each pin's last
        block first (a prefix's tail is evicted first), as releasing the pins in
        turn leaves them. One pin at a time, a session's 65,536 one-block pins
        (its limit) held the daemon's loop for seconds when it ended."""
        if len(blocks) == 1:  # one pin (an unpin): its distinct blocks, plain indexed updates
            ids, n = blocks[0], times[0]
            self.refs[ids] -= np.int32(n)
            self.num_pinned -= int(np.count_nonzero(self.refs[ids] == 0))
            if n > 1:  # all but the last leave every block in use
                pool.ref_cnt[ids] -= np.int32(n - 1)
            pool.free_blocks(ids[::-1], distinct=True)
            return
        if not blocks:
            return
        lens = np.fromiter(map(len, blocks), np.int64, len(blocks))
        ids = np.concatenate(blocks)
        if len(ids) > len(blocks):  # each pin's blocks last to first: indices reversed within each pin
            ends = np.cumsum(lens)
            ids = ids[np.repeat(2 * ends - lens - 1, lens) - np.arange(len(ids))]
        counts = np.repeat(np.array(times, dtype=np.int32), lens)
        np.subtract.at(self.refs, ids, counts)
        # blocks no pin holds now, each once (sorted: `np.unique` hashes first, several times slower here)
        done = np.sort(ids)
        done = done[self.refs[done] == 0]
        self.num_pinned -= int(np.count_nonzero(done[1:] != done[:-1])) + (len(done) > 0)
        if (counts > 1).any():
            np.subtract.at(pool.ref_cnt, ids, counts - 1)
        pool.free_blocks(ids)  # (repeats drop one each; a block goes at its last listing)

    # -- inspection ----------------------------------------------------------------------
    def infos(self, block_size: int, owner: Any = EVERY) -> list[PinInfo]:
        """Every pin (or ``owner``'s), in the order they were made."""
        pins = self.by_id.values() if owner is EVERY else sorted(self.pins.get(owner, {}).values(),
                                                                 key=lambda p: p.pin_id)
        return [p.info(block_size) for p in pins]

    def page(self, block_size: int, after: int, limit: int, max_blocks: int) -> list[PinInfo]:
        """The pins made after pin ``after``, in that order: at most ``limit`` of
        them, and no more once they list ``max_blocks`` blocks, a salt's bytes
        counted `SALT_BYTES_A_BLOCK` to a block (a longer pin is listed alone).
        Time and memory as the page, whatever the pins: 4,096 pins of 16 KiB
        salts answered 67 MB when only blocks counted."""
        out: list[PinInfo] = []
        listed = 0
        ids, by_id = self.ids, self.by_id
        for i in range(bisect.bisect_right(ids, after), len(ids)):
            pin = by_id.get(ids[i])
            if pin is None:
                continue
            cost = len(pin.blocks) + salt_bytes(pin.salt) // SALT_BYTES_A_BLOCK
            if out and listed + cost > max_blocks:
                break
            out.append(pin.info(block_size))
            listed += cost
            if len(out) == limit:
                break
        return out

    def counts(self) -> dict[Any, int]:
        """Pins per owner."""
        return {owner: len(mine) for owner, mine in self.pins.items()}

    def references(self, num_blocks: int) -> np.ndarray:
        """Pin references per block, counted from the pins themselves."""
        refs = np.zeros(num_blocks, dtype=np.int64)
        for mine in self.pins.values():
            for pin in mine.values():
                np.add.at(refs, pin.blocks, pin.count)
        return refs

    def problems(self, pool: BlockPool) -> list[str]:
        """What is wrong with the pins (empty if nothing): references as counted,
        the count of pinned blocks within the cap, every pinned block published
        under its pin's key."""
        out = []
        counted = self.references(len(self.refs))
        if not np.array_equal(counted, self.refs):
            out.append(f"pin references per block disagree with the pins, e.g. block "
                       f"{int(np.flatnonzero(counted != self.refs)[0])}")
        n = int(np.count_nonzero(counted))
        if n != self.num_pinned or n > self.limit:
            out.append(f"{n} pinned blocks, {self.num_pinned} counted, limit {self.limit}")
        for owner, mine in self.pins.items():
            for last, pin in mine.items():
                if (not mine or pin.count < 1 or (pin.owner is not owner and pin.owner != owner) or last != pin.keys[-1]
                        or len(pin.keys) != len(pin.blocks)
                        or any(pool.lookup(k) != b for k, b in zip(pin.keys, pin.blocks.tolist()))):
                    out.append(f"a pin of {owner!r} ({len(pin.blocks)} blocks) is not published as pinned")
                    break
        if any(not mine for mine in self.pins.values()):
            out.append("an owner with an empty pin table")
        listed = {owner: sum(len(p.blocks) for p in mine.values()) for owner, mine in self.pins.items()}
        if listed != self.num_listed:
            out.append(f"blocks listed by each owner's pins disagree with their count ({len(listed)} owners, "
                       f"{len(self.num_listed)} counted)")
        live = {p.pin_id: p for mine in self.pins.values() for p in mine.values()}
        if live.keys() != self.by_id.keys() or any(self.by_id[i] is not p for i, p in live.items()) \
                or self.ids != sorted(set(self.ids)) or not live.keys() <= set(self.ids) \
                or any(i >= self.next_id for i in self.ids):
            out.append(f"the pins by id ({len(self.by_id)}, {len(self.ids)} ids) disagree with the pins by owner "
                       f"({len(live)})")
        return out
