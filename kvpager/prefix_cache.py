"""Prefix cache: chained block keys -> block ids, longest-prefix match.

A full block's key is a 128-bit BLAKE2b digest over its parent block's key and
its token ids (little-endian int64). The first block's parent is the root key,
a digest of the salt (model or adapter id), so different salts never match.
Keys are stable across processes and Python runs (no ``hash()``), so two
workers, or a restarted daemon, agree on them.

Where ``kvpager._native`` is built, chains of keys are hashed in C
(native/block_keys.c: one call a chain, or a chunk of one, the GIL released for
long ones); `chain_keys_hashlib`, the loop over hashlib's BLAKE2b, is the
reference and the path without it (``KVPAGER_NATIVE=0``, no compiler).

`PrefixCache` is the map alone; the `BlockPool` owns it and decides when an
entry goes (eviction, a block about to be rewritten).
"""

from __future__ import annotations

import hashlib
import operator
import struct
from collections import deque
from collections.abc import Iterator, Mapping
from itertools import repeat

import numpy as np

from kvpager import native
from kvpager.errors import InvalidArgument

KEY_BYTES = 16
#: A block key's hash state before any input: a key is ``_BLAKE.copy()`` fed
#: parent + tokens, the digest ``hashlib.blake2b(parent + tokens,
#: digest_size=KEY_BYTES)`` gives, for less than half the constructor's cost
#: (no keyword parsing, no parameter block: a copy of the state).
_BLAKE = hashlib.blake2b(digest_size=KEY_BYTES)


#: Root keys of recent salts (a model or adapter id each: few), so an allocate hashes only its blocks.
_ROOTS: dict[str | bytes | None, bytes] = {}
_I8 = np.dtype("<i8")
_INT = {int}


def root_key(salt: str | bytes | None) -> bytes:
    """The parent key of a sequence's first block."""
    if type(salt) in _ROOT_TYPES:
        key = _ROOTS.get(salt)
        if key is None:
            if len(_ROOTS) >= 1024:
                _ROOTS.clear()
            key = _ROOTS[salt] = _root_key(salt)
        return key
    return _root_key(salt)


def _root_key(salt: str | bytes | None) -> bytes:
    if salt is None:
        salt = b""
    elif isinstance(salt, str):
        try:
            salt = salt.encode()
        except UnicodeEncodeError:  # lone surrogates (an undecodable argv or file name): no UTF-8 text
            raise InvalidArgument(f"salt must be str (UTF-8 text), bytes or None: {salt[:64]!r} holds a "
                                  "character UTF-8 cannot encode (a lone surrogate); pass bytes") from None
    elif not isinstance(salt, bytes):
        raise InvalidArgument(f"salt must be str, bytes or None, got {type(salt).__name__}")
    return hashlib.blake2b(b"kvpager-root\0" + salt, digest_size=KEY_BYTES).digest()


_ROOT_TYPES = (type(None), str, bytes)


def token_array(tokens: object, what: str = "tokens") -> np.ndarray:
    """Token ids as a 1-D little-endian int64 array, validated. A bool is not a
    token id: NumPy would take ``[1, True]`` as ``[1, 1]``, so the items of a
    list (or other sequence NumPy reads item by item) must each be an int or
    a NumPy integer; a bool array is refused by its dtype. The array returned is
    never a caller's writable memory: a sequence keeps its prompt (its blocks' keys
    hashed from it at commit, its events' token ids), and a caller that reused its
    buffer after `allocate` had its blocks published and reported under the
    buffer's new ids."""
    if type(tokens) is np.ndarray and tokens.dtype == _I8 and tokens.ndim == 1:  # as a tokenizer hands them
        return tokens.copy() if tokens.flags.writeable else tokens
    if type(tokens) is np.ndarray and tokens.dtype == object:  # ints as Python objects: read as the list they are
        tokens = tokens.tolist()
    if type(tokens) is list and set(map(type, tokens)) <= _INT:  # plain ints (not bools), checked at C speed
        try:
            return np.fromiter(tokens, _I8, len(tokens))
        except OverflowError:
            pass  # past int64: the general path says why (or takes them as uint64)
    if isinstance(tokens, (bytearray, memoryview)):  # (NumPy reads them as uint8 ids; bytes and str by dtype)
        raise InvalidArgument(f"{what} must be a list of integers, got a {type(tokens).__name__}")
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError, RuntimeError) as e:  # (RuntimeError: a torch tensor that requires grad)
        raise InvalidArgument(f"{what} must be a list of integers: {e}") from None
    if arr.size == 0:
        return np.zeros(0, dtype="<i8")
    if arr.ndim == 1 and arr.dtype.kind in "fO" and type(tokens) in (list, tuple) and set(map(type, tokens)) <= _INT:
        # ints, one of them past int64 (NumPy made them floats or objects)
        raise InvalidArgument(f"{what} has an id outside int64: {next(t for t in tokens if not -2**63 <= t < 2**63)}")
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InvalidArgument(f"{what} must be a flat list of integers, got dtype {arr.dtype} shape {arr.shape}")
    if not isinstance(tokens, np.ndarray) and not hasattr(tokens, "__array__") \
            and not hasattr(tokens, "__array_interface__"):
        # NumPy read the items one by one (a list, a tuple): bools among ints became ints
        for t in set(map(type, tokens)):
            if t is not int and not issubclass(t, np.integer):
                raise InvalidArgument(f"{what} must hold integers, got {t.__name__}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) >= 2**63:
        raise InvalidArgument(f"{what} has an id >= 2**63")
    out = arr.astype(_I8, copy=False)
    return out.copy() if out.flags.writeable and not out.flags.owndata else out  # (a view of the caller's memory)


#: The compiled ``chain_keys(parent, tokens, block_size, max_blocks)`` (native/block_keys.c), or None:
#: hashlib's loop (not built, an older build without it, or KVPAGER_NATIVE=0). Tests set it to compare.
NATIVE_KEYS = getattr(native.load(), "chain_keys", None)
_NATIVE_I8 = np.dtype(np.int64)  # what the compiled function reads: int64 in this machine's byte order
#: `PrefixCache.match_tokens` hashes with the compiled function in chunks of blocks, this many first, each
#: next twice the last up to `MATCH_MOST`: a prompt that misses early hashes a few blocks past its miss, one
#: that hits all its blocks costs a few calls, and never more than ``MATCH_MOST`` blocks are hashed for nothing.
MATCH_FIRST = 4
MATCH_MOST = 1024


def _int64(tokens: np.ndarray) -> np.ndarray:
    """``tokens`` as the compiled function reads them: a C-contiguous native int64 array
    (the values of ``tokens.astype("<i8")``, as the hashlib loop reads them)."""
    if type(tokens) is np.ndarray and tokens.dtype == _NATIVE_I8 and tokens.flags.c_contiguous:
        return tokens
    return np.ascontiguousarray(tokens, dtype=_NATIVE_I8)


def chain_keys(parent: bytes, tokens: np.ndarray, block_size: int) -> list[bytes]:
    """Keys of the full blocks of ``tokens`` (an int64 array starting at a block
    boundary), chained from ``parent``: the key of the block before the first,
    or the root key. The same keys as `chain_keys_hashlib`, hashed in C where built."""
    hash_chain = NATIVE_KEYS
    if hash_chain is not None and len(parent) == KEY_BYTES:
        return hash_chain(parent, _int64(tokens), block_size, len(tokens) // block_size)
    return chain_keys_hashlib(parent, tokens, block_size)


def chain_keys_hashlib(parent: bytes, tokens: np.ndarray, block_size: int) -> list[bytes]:
    """`chain_keys` through hashlib, a block at a time: the reference (and the
    path where the compiled function is not built)."""
    raw = tokens.astype("<i8", copy=False).tobytes()
    step = block_size * 8
    keys = []
    fresh = _BLAKE.copy
    for start in range(0, len(tokens) // block_size * step, step):
        h = fresh()
        h.update(parent + raw[start : start + step])
        parent = h.digest()
        keys.append(parent)
    return keys


def block_key(parent: bytes, ids: list[int]) -> bytes:
    """The key of one block whose token ids are ``ids`` (Python ints in int64
    range), chained from ``parent``: `chain_keys`' key, without an array (a
    decode step publishes one block per sequence)."""
    h = _BLAKE.copy()
    h.update(parent + struct.pack(f"<{len(ids)}q", *ids))
    return h.digest()


class BlockKeys(Mapping):
    """Block id -> the key it is published under: the reading side of a dict,
    over `PrefixCache`'s arrays (``key_of``, an object array, and ``cached``)."""

    __slots__ = ("_keys", "_cached")

    def __init__(self, keys: np.ndarray, cached: np.ndarray):
        self._keys, self._cached = keys, cached

    def __getitem__(self, block: object) -> bytes:
        try:
            b = operator.index(block)  # type: ignore[arg-type]
        except TypeError:
            raise KeyError(block) from None
        if 0 <= b < len(self._cached) and self._cached[b]:
            return self._keys[b]
        raise KeyError(block)

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self._cached).tolist())

    def __len__(self) -> int:
        return int(np.count_nonzero(self._cached))


class PrefixCache:
    """Block keys <-> the device blocks that hold that prefix's K/V.

    A block is published only after its owner commits that its K/V is
    written. The cache holds no references: a published block whose count
    falls to 0 stays matchable (evictable) until the pool needs its memory.
    ``cached[b]`` says whether block ``b`` is published, for vectorised checks;
    ``key_of[b]`` is its key (None if it has none: an object array), so the
    keys of a run of blocks are one gather, and ``block_key`` reads them as a
    mapping. Only ``key_to_block`` is a dict (a prompt's keys are looked up
    one by one)."""

    def __init__(self, num_blocks: int):
        self.key_to_block: dict[bytes, int] = {}
        self.key_of = np.full(num_blocks, None, dtype=object)
        self.cached = np.zeros(num_blocks, dtype=bool)
        self.block_key = BlockKeys(self.key_of, self.cached)

    def __len__(self) -> int:
        return len(self.key_to_block)

    def get(self, key: bytes) -> int | None:
        """The block published under ``key``, or None."""
        return self.key_to_block.get(key)

    def match_tokens(self, root: bytes, tokens: np.ndarray, block_size: int, max_blocks: int) -> tuple[list[bytes], list[int]]:
        """Longest cached prefix of ``tokens`` (at most ``max_blocks`` blocks): the
        keys and block ids of the hits. Hashes only up to the first miss (in C:
        up to the end of the chunk it falls in, `MATCH_FIRST`)."""
        hash_chain = NATIVE_KEYS
        if hash_chain is not None and len(root) == KEY_BYTES:
            return self._match_chunks(hash_chain, root, _int64(tokens), block_size,
                                      min(max_blocks, len(tokens) // block_size))
        keys: list[bytes] = []
        hits: list[int] = []
        lookup = self.key_to_block.get
        raw = tokens.tobytes()
        step = block_size * 8
        parent = root
        fresh = _BLAKE.copy
        for start in range(0, min(max_blocks, len(tokens) // block_size) * step, step):
            h = fresh()
            h.update(parent + raw[start : start + step])
            parent = h.digest()
            b = lookup(parent)
            if b is None:
                break
            keys.append(parent)
            hits.append(b)
        return keys, hits

    def _match_chunks(self, hash_chain, root: bytes, tokens: np.ndarray, block_size: int,
                      n: int) -> tuple[list[bytes], list[int]]:
        """`match_tokens` of the first ``n`` blocks through the compiled ``hash_chain``: growing chunks
        of blocks hashed in one call each and looked up, until the first miss."""
        keys: list[bytes] = []
        hits: list[int] = []
        lookup = self.key_to_block.get
        parent, done, take = root, 0, MATCH_FIRST
        while done < n:
            take = min(take, n - done)
            got = hash_chain(parent, tokens[done * block_size :], block_size, take)
            found = list(map(lookup, got))
            if not all(found):  # a miss (None; a hit is a block id, never the null block 0)
                miss = found.index(None)
                keys += got[:miss]
                hits += found[:miss]
                break
            keys += got
            hits += found
            parent, done, take = got[-1], done + take, min(2 * take, MATCH_MOST)
        return keys, hits

    def match_window(self, root: bytes, tokens: np.ndarray, block_size: int, max_blocks: int, reach: int,
                     keys: list[bytes], hits: list[int]) -> tuple[list[bytes], list[int], int, list[bytes]]:
        """Past the miss that ended `match_tokens`' ``keys`` and ``hits``: the
        furthest hit for a caller whose queries read at most the ``reach``
        blocks before the block they sit in (a sliding window: every layer's).
        The furthest point ``h <= max_blocks`` whose ``reach`` blocks before it
        are all cached, found from the end as vLLM's sliding-window manager
        does; returns the keys of blocks [0, h), the block ids of [h - reach,
        h), ``h - reach``, the blocks before them that the caller leaves
        unread (released: the null block), and the keys of all ``max_blocks``
        blocks (hashed on the way: a commit need not hash them again).
        ``keys``, ``hits`` and 0 where no such point lies past them."""
        start = len(keys)
        if start >= max_blocks:
            return keys, hits, 0, keys
        parent = keys[-1] if keys else root
        tail = tokens[start * block_size : max_blocks * block_size]
        every = keys + chain_keys(parent, tail, block_size)
        lookup = self.key_to_block.get
        run: list[int] = []  # cached blocks from i on, found walking down (block ids, latest first)
        for i in range(len(every) - 1, start, -1):  # (block `start` is the miss)
            b = lookup(every[i])
            if b is None:
                run = []
                continue
            run.append(b)
            if len(run) == reach:
                return every[: i + reach], run[::-1], i, every
        return keys, hits, 0, every

    def publish(self, block_id: int, key: bytes) -> bool:
        """Make ``block_id`` matchable under ``key``. False (no change) if the key
        is already cached elsewhere or the block already carries a key."""
        if key in self.key_to_block or self.cached[block_id]:
            return False
        self.key_to_block[key] = block_id
        self.key_of[block_id] = key
        self.cached[block_id] = True
        return True

    def publish_new(self, blocks: list[int], keys: list[bytes], ids: np.ndarray | None = None) -> bool:
        """`publish` of each (block, key) pair at once where every key and every
        block is new and none repeats (a decode step's blocks, one a sequence;
        a long prompt's): True. False, and nothing changed, otherwise: publish
        them one by one. ``ids``: ``blocks`` as an int64 array, if the caller has it.

        Each key is looked up once: ``setdefault`` inserts it where it is new
        and answers the block it has where it is not (or where it repeats in
        ``keys``), and the keys this call inserted are taken out again then."""
        n = len(keys)
        ids = np.array(blocks, dtype=np.int64) if ids is None else ids
        if np.count_nonzero(self.cached[ids]):
            return False
        if n <= 64:
            if len(set(blocks)) != n:
                return False
        else:
            ordered = np.sort(ids)
            if np.count_nonzero(ordered[1:] == ordered[:-1]):
                return False
        k2b = self.key_to_block
        got = list(map(k2b.setdefault, keys, blocks))
        if got != blocks:  # a key cached already, or twice here: the ones inserted go again
            for key, b, mine in zip(keys, got, blocks):
                if b == mine:  # (a block with a key already was refused above)
                    del k2b[key]
            return False
        self.key_of[ids] = keys
        self.cached[ids] = True
        return True

    def remove(self, block_id: int) -> bytes | None:
        """Forget ``block_id``'s entry; returns its key, or None if it had none."""
        if not self.cached[block_id]:
            return None
        key = self.key_of[block_id]
        self.key_of[block_id] = None
        del self.key_to_block[key]
        self.cached[block_id] = False
        return key

    def remove_many(self, blocks: list[int] | np.ndarray) -> list[bytes | None]:
        """`remove` of each of ``blocks`` (distinct ids: a list, or an int64 array)
        at once: their keys, None for a block that had none. An eviction of a long
        prompt's blocks (62,500 for 1M tokens) paid a Python call a block: their
        keys are one gather now, and where at least half of the cache goes,
        ``key_to_block`` is built again from the entries that stay (a deletion
        is a probe into a large table, 20-35 ms for 62,500 keys; a rebuild a
        C-speed pass over what is left, and it gives back the table's memory,
        which deletions never do)."""
        ids = blocks if isinstance(blocks, np.ndarray) else np.array(blocks, dtype=np.int64)
        keys = self.key_of[ids].tolist()  # (None where a block has no key)
        self.key_of[ids] = None
        cached = self.cached
        cached[ids] = False
        k2b = self.key_to_block
        if 2 * len(ids) >= len(k2b):
            if len(cached) <= 16 * len(k2b):  # (the mask is not much longer than the cache: scanned whole)
                rest = np.flatnonzero(cached)
            else:  # a small cache in a large pool: its own blocks, those left marked
                rest = np.fromiter(k2b.values(), np.int64, len(k2b))
                rest = np.sort(rest[cached[rest]])
            kept = self.key_of[rest].tolist()
            k2b.clear()
            k2b.update(zip(kept, rest.tolist()))
        else:
            deque(map(k2b.pop, keys, repeat(None)), maxlen=0)
        return keys

    def problems(self) -> list[str]:
        """What is wrong with the maps (empty if nothing): ``key_to_block`` and
        the keys by block must mirror each other, and ``cached`` must mark
        exactly the blocks with a key."""
        out = []
        marked = np.flatnonzero(self.cached)
        keyed = np.flatnonzero(self.key_of != None)  # noqa: E711 (elementwise: which entries hold a key)
        if len(marked) != len(keyed) or not np.array_equal(marked, keyed):
            out.append(f"{len(marked)} blocks marked cached but {len(keyed)} keyed")
        if len(self.key_to_block) != len(keyed):
            out.append(f"{len(self.key_to_block)} keys but {len(keyed)} keyed blocks")
        keys = self.key_of
        for key, b in self.key_to_block.items():
            if not (type(b) is int and 0 <= b < len(keys)) or keys[b] != key:
                out.append(f"key of block {b} does not map back to it")
                break
        return out
