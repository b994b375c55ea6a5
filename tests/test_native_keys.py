"""Prefix-cache block keys hashed in C (native/block_keys.c, `kvpager._native.chain_keys`)
against hashlib: the keys of `prefix_cache.chain_keys_hashlib` (the reference loop) and of a
chain computed here, block by block, with ``hashlib.blake2b(parent + tokens, digest_size=16)``;
`PrefixCache.match_tokens` hashing in chunks against the block-at-a-time loop and a match
computed here. Then the C function's refusals of bad arguments. The C tests skip where the
extension was not built; the Python path's are run either way."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpager import KVPool, PoolSpec, prefix_cache
from kvpager.prefix_cache import PrefixCache, chain_keys, chain_keys_hashlib, root_key

COMPILED = prefix_cache.NATIVE_KEYS
needs_c = pytest.mark.skipif(COMPILED is None, reason="kvpager._native (with chain_keys) was not built")
I64 = (-(2**63), 2**63 - 1)
EXTREMES = [-(2**63), -(2**63) + 1, -1, 0, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 2, 2**63 - 1]


def reference(parent: bytes, tokens, block_size: int) -> list[bytes]:
    """The chained keys, computed here: each block's ids packed one by one."""
    keys = []
    ids = [int(t) for t in tokens]
    for at in range(0, len(ids) - block_size + 1, block_size):
        block = b"".join(struct.pack("<q", t) for t in ids[at : at + block_size])
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(parent)
    return keys


def reference_match(published: set[bytes], parent: bytes, tokens, block_size: int,
                    max_blocks: int) -> list[bytes]:
    """The keys of the longest published prefix of at most ``max_blocks`` blocks, computed here."""
    out = []
    for key in reference(parent, tokens, block_size)[: max(max_blocks, 0)]:
        if key not in published:
            break
        out.append(key)
    return out


@pytest.fixture(params=["c", "hashlib"])
def path(request, monkeypatch):
    """Each test run through the compiled keys and again through hashlib's loop."""
    if request.param == "c":
        if COMPILED is None:
            pytest.skip("kvpager._native (with chain_keys) was not built")
    else:
        monkeypatch.setattr(prefix_cache, "NATIVE_KEYS", None)
    return request.param


def test_a_known_key(path):
    """Fixed keys (so a change of the hash, its parameters or the token encoding shows)."""
    root = root_key(None)
    assert root.hex() == "9e51475855ab6c1e2315130895882684"
    assert root == hashlib.blake2b(b"kvpager-root\0", digest_size=16).digest()
    assert len(root_key("m")) == len(root_key(b"m")) == prefix_cache.KEY_BYTES == 16
    [key] = chain_keys(root, np.arange(16, dtype=np.int64), 16)
    assert key.hex() == "46c5253c294c37d927e279a978337abc"


@pytest.mark.parametrize("block_size", [*range(1, 20), 30, 31, 32, 33, 46, 62, 63, 64])
def test_chain_keys_equal_hashlib(path, block_size):
    g = np.random.default_rng(block_size)
    for n in sorted({0, 1, block_size - 1, block_size, block_size + 1, 3 * block_size, 5 * block_size + 3}):
        parent = g.bytes(16)
        tokens = g.integers(*I64, n, dtype=np.int64, endpoint=True)
        want = reference(parent, tokens, block_size)
        assert len(want) == n // block_size
        assert chain_keys(parent, tokens, block_size) == want
        assert chain_keys_hashlib(parent, tokens, block_size) == want


def test_extreme_token_ids(path):
    for block_size in (1, 3, 10, 16):
        tokens = np.array(EXTREMES * 4, dtype=np.int64)
        assert chain_keys(root_key("m"), tokens, block_size) == reference(root_key("m"), tokens, block_size)


def test_a_chain_from_a_key_goes_on_where_its_parent_stopped(path):
    """Keys hashed in parts (as an allocate's match, then its commit, hash them) are the whole chain's."""
    tokens = np.random.default_rng(1).integers(0, 50000, 16 * 40, dtype=np.int64)
    whole = chain_keys(root_key(None), tokens, 16)
    part = chain_keys(whole[12], tokens[13 * 16 :], 16)
    assert whole[13:] == part


def test_inputs_the_wrapper_converts(path):
    """Strided, big-endian, narrower and unsigned arrays: the keys of their values as int64."""
    g = np.random.default_rng(2)
    base = g.integers(-(2**31), 2**31, 200, dtype=np.int64)
    parent = g.bytes(16)
    for tokens in (base[::2], base[::-1], base.astype(">i8"), base.astype(np.int32), base[:64].reshape(8, 8).T[0],
                   np.abs(base).astype(np.uint64)):
        want = reference(parent, tokens.astype("<i8"), 7)
        assert chain_keys(parent, tokens, 7) == want


@needs_c
def test_the_compiled_function_cuts_at_max_blocks():
    g = np.random.default_rng(3)
    tokens = g.integers(*I64, 16 * 9 + 5, dtype=np.int64)
    parent = g.bytes(16)
    every = reference(parent, tokens, 16)
    for max_blocks in (0, 1, 2, 8, 9, 10, 2**40):
        assert COMPILED(parent, tokens, 16, max_blocks) == every[:max_blocks]
    assert COMPILED(parent, tokens[:0], 16, 5) == []
    assert COMPILED(parent, tokens[:15], 16, 5) == []


@needs_c
def test_the_compiled_function_reads_other_int64_buffers():
    import array

    ids = [5, -7, 2**63 - 1, -(2**63), 0, 9]
    want = reference(bytes(16), ids, 3)
    assert COMPILED(bytes(16), array.array("q", ids), 3, 9) == want
    assert COMPILED(bytes(16), memoryview(struct.pack("=6q", *ids)).cast("q"), 3, 9) == want
    assert COMPILED(bytearray(16), np.array(ids, dtype=np.int64), 3, 9) == want  # parent: any 16 bytes
    ro = np.array(ids, dtype=np.int64)
    ro.flags.writeable = False
    assert COMPILED(memoryview(bytes(16)), ro, 3, 9) == want


@needs_c
def test_a_long_chain_hashed_without_the_gil_and_from_several_threads():
    """Past the size it hashes with the GIL released (256 KiB of tokens), from four threads at once."""
    tokens = np.random.default_rng(4).integers(0, 2**40, 16 * 3000, dtype=np.int64)
    want = chain_keys_hashlib(root_key("t"), tokens, 16)
    got: list = [None] * 4

    def run(i: int) -> None:
        got[i] = COMPILED(root_key("t"), tokens, 16, 3000)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 4


@needs_c
@pytest.mark.parametrize("args, error", [
    ((bytes(15), np.arange(8), 4, 9), ValueError),  # parent of another length
    ((bytes(17), np.arange(8), 4, 9), ValueError),
    ((b"", np.arange(8), 4, 9), ValueError),
    (("x" * 16, np.arange(8), 4, 9), TypeError),  # parent not bytes-like
    ((None, np.arange(8), 4, 9), TypeError),
    ((bytes(16), np.arange(8, dtype=np.int32), 4, 9), TypeError),  # item size
    ((bytes(16), np.arange(8, dtype=np.float64), 4, 9), TypeError),  # 8 bytes, not an integer
    ((bytes(16), np.arange(8, dtype=np.uint64), 4, 9), TypeError),  # unsigned
    ((bytes(16), np.arange(8, dtype=">i8" if sys.byteorder == "little" else "<i8"), 4, 9), TypeError),
    ((bytes(16), np.arange(8).reshape(2, 4), 4, 9), TypeError),  # 2-d
    ((bytes(16), np.array(5), 4, 9), TypeError),  # 0-d
    ((bytes(16), bytes(64), 4, 9), TypeError),  # bytes: items of 1 byte
    ((bytes(16), [1, 2, 3, 4], 4, 9), TypeError),  # no buffer
    ((bytes(16), np.arange(16)[::2], 4, 9), ValueError),  # not contiguous
    ((bytes(16), np.arange(8), 0, 9), ValueError),  # block size
    ((bytes(16), np.arange(8), -4, 9), ValueError),
    ((bytes(16), np.arange(8), 4, -1), ValueError),  # max_blocks
    ((bytes(16), np.arange(8), 4.0, 9), TypeError),
    ((bytes(16), np.arange(8), 2**70, 9), OverflowError),
    ((bytes(16), np.arange(8), 4), TypeError),  # an argument missing
])
def test_the_compiled_function_refuses_bad_arguments(args, error):
    with pytest.raises(error):
        COMPILED(*args)


@needs_c
@settings(max_examples=200, deadline=None)
@given(parent=st.binary(min_size=16, max_size=16), block_size=st.integers(1, 64),
       tokens=st.lists(st.integers(*I64), max_size=300), max_blocks=st.integers(0, 400))
def test_compiled_keys_property(parent, block_size, tokens, max_blocks):
    arr = np.array(tokens, dtype=np.int64)
    want = reference(parent, tokens, block_size)
    assert COMPILED(parent, arr, block_size, max_blocks) == want[:max_blocks]
    assert chain_keys_hashlib(parent, arr, block_size) == want


def cache_with(prompts: list[tuple[bytes, np.ndarray, int]], block_size: int) -> PrefixCache:
    """A cache holding the first ``depth`` blocks of each (root, tokens, depth), keyed as the reference keys them."""
    cache = PrefixCache(4096)
    b = 1
    for root, tokens, depth in prompts:
        for key in reference(root, tokens, block_size)[:depth]:
            if cache.publish(b, key):
                b += 1
    return cache


def check_match(cache: PrefixCache, root: bytes, tokens: np.ndarray, block_size: int, max_blocks: int) -> None:
    keys, hits = cache.match_tokens(root, tokens, block_size, max_blocks)
    want = reference_match(set(cache.key_to_block), root, tokens, block_size, max_blocks)
    assert keys == want
    assert hits == [cache.key_to_block[k] for k in want]
    # the block-at-a-time loop, the path without the compiled function
    with pytest.MonkeyPatch.context() as m:
        m.setattr(prefix_cache, "NATIVE_KEYS", None)
        assert cache.match_tokens(root, tokens, block_size, max_blocks) == (keys, hits)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_match_tokens_at_every_depth(path, block_size):
    """Hits ending at depths around the chunks' edges (4, 4 + 8, 4 + 8 + 16, ...), at the end and cut by max_blocks."""
    g = np.random.default_rng(block_size)
    n = 70
    tokens = g.integers(0, 1000, n * block_size + block_size // 2, dtype=np.int64)
    root = root_key("m")
    for depth in [0, 1, 3, 4, 5, 11, 12, 13, 27, 28, 29, 60, 69, 70]:
        cache = cache_with([(root, tokens, depth)], block_size)
        for max_blocks in (-1, 0, 1, depth - 1, depth, depth + 1, n, n + 5):
            check_match(cache, root, tokens, block_size, max_blocks)
        check_match(cache, root_key("other"), tokens, block_size, n)  # another salt: nothing
        other = tokens.copy()
        other[(depth // 2) * block_size] += 1  # a prompt that parts from it inside the hits
        check_match(cache, root, other, block_size, n)


def test_match_tokens_past_a_chunk_of_the_most_blocks(path):
    """A hit of more blocks than `MATCH_MOST` a chunk: several chunks of the most, ending inside one."""
    block_size = 2
    n = prefix_cache.MATCH_MOST * 3 + 7
    tokens = np.random.default_rng(5).integers(0, 1000, n * block_size, dtype=np.int64)
    root = root_key(None)
    for depth in (n, n - 1, prefix_cache.MATCH_MOST * 2 + 3):
        check_match(cache_with([(root, tokens, depth)], block_size), root, tokens, block_size, n)


@settings(max_examples=60, deadline=None)
@given(block_size=st.integers(1, 8), n=st.integers(0, 60), data=st.data())
def test_match_tokens_property(block_size, n, data):
    """Random prompts sharing random prefixes with a few cached ones, through both paths (`check_match`)."""
    g = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    root = root_key(data.draw(st.sampled_from([None, "a", b"b"])))
    tokens = g.integers(0, 4, n * block_size + data.draw(st.integers(0, block_size - 1)), dtype=np.int64)
    cached = [(root, tokens, data.draw(st.integers(0, n)))]
    for _ in range(data.draw(st.integers(0, 3))):  # others sharing a prefix with it, cached deeper
        other = tokens.copy()
        at = data.draw(st.integers(0, max(len(other) - 1, 0)))
        other[at:] = g.integers(0, 4, len(other) - at)
        cached.append((root, other, data.draw(st.integers(0, n))))
    cache = cache_with(cached, block_size)
    check_match(cache, root, tokens, block_size, data.draw(st.integers(-1, n + 2)))


def pool_run(prompts: list[list[int]]) -> tuple:
    """What a pool makes of prompts allocated, committed and freed in turn, then all again."""
    pool = KVPool(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=256, block_size=8,
                           dtype="float32"))
    seen = []
    for rnd in range(2):
        ids = []
        for i, p in enumerate(prompts):
            [a] = pool.allocate([p], salt="s" if i % 3 == 0 else None)
            seen.append((rnd, a.num_cached_tokens, [t.tolist() for t in pool.tables([a.seq_id])]))
            pool.append_flat([a.seq_id], 3, [[7, 8, 9]])
            seen.append(pool.commit([a.seq_id]))
            ids.append(a.seq_id)
        pool.free(ids[::2])
    cache = pool.manager.pool.cache
    pool.check_integrity()
    return seen, dict(cache.key_to_block)


def test_a_pool_caches_the_same_blocks_on_both_paths(monkeypatch):
    g = np.random.default_rng(6)
    base = g.integers(0, 100, 90).tolist()
    prompts = [base[:n] + g.integers(0, 100, k).tolist() for n, k in [(90, 0), (40, 9), (90, 30), (3, 3), (64, 1),
                                                                     (0, 17), (88, 0), (17, 4)]]
    first = pool_run(prompts)
    monkeypatch.setattr(prefix_cache, "NATIVE_KEYS", None)
    assert pool_run(prompts) == first


def test_kvpager_native_0_hashes_with_hashlib():
    code = "import kvpager.prefix_cache as p; print(p.NATIVE_KEYS is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "KVPAGER_NATIVE": "0"})
    assert out.stdout.strip() == "True"
