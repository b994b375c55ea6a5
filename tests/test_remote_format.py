"""The remote tier's key and value format, and store URLs (no server needed)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from kvpager.errors import InvalidArgument
from kvpager.prefix_cache import chain_keys, root_key
from kvpager.remote_format import HEADER_BYTES, BadValue, Codec, block_key, key_prefix
from kvpager.remote_store import open_store
from kvpager.remote_url import redact
from kvpager.spec import PoolSpec

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=8, block_size=16, dtype="float32")


def sealed(codec: Codec, key: bytes, payload: bytes) -> bytes:
    row = bytearray(HEADER_BYTES) + bytearray(payload)
    codec.seal(memoryview(row), key)
    return bytes(row)


def test_key_names_version_geometry_salt_and_block():
    root = root_key("model-a")
    [key] = chain_keys(root, np.arange(16, dtype=np.int64), 16)
    name = block_key(key_prefix(SPEC), root, key)
    assert re.fullmatch(r"kvpager:v2:[0-9a-f]{12}:[0-9a-f]{16}:[0-9a-f]{32}", name), name
    assert name.endswith(":" + key.hex()) and f":{root[:8].hex()}:" in name
    # every byte-layout field changes the prefix; the pool's size does not
    others = [SPEC.replace(num_layers=3), SPEC.replace(num_kv_heads=1), SPEC.replace(head_dim=32),
              SPEC.replace(block_size=32), SPEC.replace(dtype="float16"), SPEC.replace(dtype="bfloat16")]
    prefixes = {key_prefix(s) for s in others}
    assert len(prefixes) == len(others) and key_prefix(SPEC) not in prefixes
    assert key_prefix(SPEC.replace(num_blocks=999, num_host_blocks=7)) == key_prefix(SPEC)


def test_value_round_trip_and_every_refusal():
    codec = Codec(SPEC)
    key, other = b"k" * 16, b"o" * 16
    payload = np.random.default_rng(0).bytes(SPEC.bytes_per_block)
    value = sealed(codec, key, payload)
    assert len(value) == HEADER_BYTES + SPEC.bytes_per_block
    assert bytes(codec.open(value, key)) == payload

    flipped = bytearray(value)
    flipped[HEADER_BYTES + 1234] ^= 0x10
    bad = {
        "checksum": bytes(flipped),
        "bytes, expected": value[:-1],
        "another format": sealed(Codec(SPEC.replace(dtype="float16", head_dim=32)), key, payload),
    }
    for why, v in bad.items():
        with pytest.raises(BadValue, match=why):
            codec.open(v, key)
    with pytest.raises(BadValue, match="stored for block key"):
        codec.open(value, other)  # a value moved under another key
    # a value of another scope (namespace, rank layout, FP8 scales: the key's prefix) copied under
    # this one's key: its header and block key are the same; its checksum covers its scope
    mine, theirs = Codec(SPEC, key_prefix(SPEC, 1, "model-b")), Codec(SPEC, key_prefix(SPEC, 1, "model-a"))
    with pytest.raises(BadValue, match="another namespace"):
        mine.open(sealed(theirs, key, payload), key)
    with pytest.raises(BadValue, match="another namespace"):
        Codec(SPEC, key_prefix(SPEC, 1)).open(sealed(Codec(SPEC, key_prefix(SPEC, 2)), key, payload), key)
    assert bytes(mine.open(sealed(mine, key, payload), key)) == payload
    # a header bit flip is caught too (here: the payload length field)
    hdr = bytearray(value)
    hdr[HEADER_BYTES - 16] ^= 1
    with pytest.raises(BadValue):
        codec.open(bytes(hdr), key)


@pytest.mark.parametrize("url, why", [
    ("localhost:6379", "must look like"),
    ("http://localhost:6379", "unknown scheme"),
    ("redis://localhost:notaport", "not HOST:PORT"),
    ("redis://localhost:70000", "not HOST:PORT"),
    ("redis+cluster://a:1,:2", "not HOST:PORT"),
    ("redis://:pw@:6379", "not HOST:PORT"),
    (None, "must look like"),
])
def test_bad_urls_are_refused_by_name(url, why):
    pytest.importorskip("redis")
    with pytest.raises(InvalidArgument, match=why):
        open_store(url)


def test_good_urls_and_redaction():
    pytest.importorskip("redis")
    assert open_store("redis://127.0.0.1:1").kind == "redis"
    assert open_store("valkey://127.0.0.1:1/2").kind == "redis"
    assert open_store("unix:///tmp/x.sock").kind == "redis"
    assert open_store("redis://store.internal").kind == "redis"  # port 6379
    assert open_store("redis://[::1]:7000").kind == "redis"
    assert open_store("redis+cluster://a:1,b").kind == "redis-cluster"
    assert open_store("redis+cluster://127.0.0.1:1,127.0.0.1:2").kind == "redis-cluster"
    store = open_store("redis://user:s3cret@127.0.0.1:1")
    assert "s3cret" not in store.url and store.url == "redis://user:***@127.0.0.1:1"
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    with pytest.raises(InvalidArgument, match="timeout"):
        open_store("redis://127.0.0.1:1", timeout=0)


@pytest.mark.parametrize("option, value", [("connections", 0), ("connections", 65), ("connections", 2.0),
                                           ("connections", True), ("chunk_bytes", 0), ("chunk_bytes", "8M")])
def test_bad_lookup_settings(option, value):
    with pytest.raises(InvalidArgument, match=option):
        open_store("redis://127.0.0.1:1", **{option: value})
