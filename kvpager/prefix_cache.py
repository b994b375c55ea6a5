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
import struct
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
    if type(tokens) is list and set(map(type, tokens)) <= _INT:  # plain ints (not bools), checked at C speed
        try:
            return np.fromiter(tokens, _I8, len(tokens))
        except OverflowError:
            pass  # past int64: the general path says why (or takes them as uint64)
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError) as e:
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


class PrefixCache:
    """Block keys <-> the device blocks that hold that prefix's K/V.

    A block is published only after its owner commits that its K/V is
    written. The cache holds no references: a published block whose count
    falls to 0 stays matchable (evictable) until the pool needs its memory.
    ``cached[b]`` says whether block ``b`` is published, for vectorised checks."""

    def __init__(self, num_blocks: int):
        self.key_to_block: dict[bytes, int] = {}
        self.block_key: dict[int, bytes] = {}
        self.cached = np.zeros(num_blocks, dtype=bool)

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
            if None in found:
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
        if key in self.key_to_block or block_id in self.block_key:
            return False
        self.key_to_block[key] = block_id
        self.block_key[block_id] = key
        self.cached[block_id] = True
        return True

    def publish_new(self, blocks: list[int], keys: list[bytes]) -> bool:
        """`publish` of each (block, key) pair at once where every key and every
        block is new and none repeats (a decode step's blocks, one a sequence):
        True. False, and nothing changed, otherwise: publish them one by one."""
        k2b, b2k, n = self.key_to_block, self.block_key, len(keys)
        if not (k2b.keys().isdisjoint(keys) and b2k.keys().isdisjoint(blocks)
                and len(set(keys)) == n and len(set(blocks)) == n):
            return False
        k2b.update(zip(keys, blocks))
        b2k.update(zip(blocks, keys))
        self.cached[blocks] = True
        return True

    def remove(self, block_id: int) -> bytes | None:
        """Forget ``block_id``'s entry; returns its key, or None if it had none."""
        key = self.block_key.pop(block_id, None)
        if key is None:
            return None
        del self.key_to_block[key]
        self.cached[block_id] = False
        return key

    def remove_many(self, blocks: list[int]) -> list[bytes | None]:
        """`remove` of each of ``blocks`` (distinct ids) at once: their keys, None
        for a block that had none. An eviction of a long prompt's blocks (62,500
        for 1M tokens) paid a Python call a block."""
        keys = list(map(self.block_key.pop, blocks, repeat(None, len(blocks))))
        k2b = self.key_to_block
        for key in keys:
            if key is not None:
                del k2b[key]
        self.cached[blocks] = False
        return keys

    def problems(self) -> list[str]:
        """What is wrong with the maps (empty if nothing): they must mirror each
        other and ``cached`` must mark exactly the keyed blocks."""
        out = []
        if len(self.key_to_block) != len(self.block_key):
            out.append(f"{len(self.key_to_block)} keys but {len(self.block_key)} keyed blocks")
        for key, b in self.key_to_block.items():
            if self.block_key.get(b) != key:
                out.append(f"key of block {b} does not map back to it")
                break
        marked = np.flatnonzero(self.cached)
        if len(marked) != len(self.block_key) or not all(b in self.block_key for b in marked.tolist()):
            out.append(f"{len(marked)} blocks marked cached but {len(self.block_key)} keyed")
        return out
