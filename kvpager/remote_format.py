"""What the remote prefix tier stores: the key of a block and its value.

Key: ``kvpager:v2:<format>:[ns<namespace>:]<salt>:<block key>`` where
- ``v2`` is `FORMAT_VERSION`;
- ``<format>`` is 12 hex digits of a digest of everything that decides how
  a block's bytes are laid out (layers, kv heads, head dim, block size,
  dtype, the block-major layout): a daemon of another geometry or dtype
  looks under other keys and never reads foreign bytes;
- ``ns<namespace>``, where the tier has a namespace (`namespace_part`: 16 hex
  digits of its digest): the model the blocks belong to. Two models of one
  geometry (a model and its fine-tune, two presets of one shape) compute
  different K/V for the same tokens; without a namespace, or a salt per
  model, daemons of both that share a store would restore each other's;
- ``<salt>`` is 16 hex digits of the salt's root key (so one model's or
  adapter's blocks can be found, or deleted, by pattern);
- ``<block key>`` is the block's chained BLAKE2b key (32 hex digits), which
  already depends on the salt and on every token before the block's end.

Value: an 80-byte header, then the block's K/V bytes for all layers in the
pool's block layout (``[layers, 2, kv heads, block size, head dim]``; a pool
of R tensor-parallel ranks: each rank's ``[layers, 2, kv heads / R, ...]``
back to back, under a format of its own).
The header repeats the format (magic, version, geometry, dtype), holds the
block key and the payload length, and an XXH3-128 checksum of the key's
prefix (its format, rank layout, FP8 scales and namespace: the value's
scope), the block key and the payload: a value that was cut short,
bit-flipped, written by another format or stored under the wrong key (one
of another namespace, rank count or FP8 scales copied under this one's
keys, as a migration script might) is refused, never restored. Version 1
checked the block key and payload alone: another model's values copied
under a model's keys were restored as its own; its keys are not looked up.
"""

from __future__ import annotations

import hashlib
import struct

from kvpager.errors import InvalidArgument
from kvpager.spec import PoolSpec

try:
    import xxhash
except ImportError as e:
    raise ImportError(f"the remote tier needs xxhash: pip install 'kvpager[remote]' ({e})") from None

FORMAT_VERSION = 2
MAGIC = b"KVPB"
#: magic, version, header bytes, layers, kv heads, head dim, block size,
#: dtype code, 7 pad, block key (16), checksum (16), payload bytes
_HEADER = struct.Struct("<4sHHIIIIB7x16s16sQ")
HEADER_BYTES = 80  # a multiple of 16: the payload stays aligned as the block was
assert _HEADER.size <= HEADER_BYTES
_DTYPES = {"float16": 1, "bfloat16": 2, "float32": 3, "float8_e4m3": 4, "float8_e5m2": 5}  # stored dtype
_KEY_BYTES = 16


class BadValue(ValueError):
    """A stored value that must not be restored (the message says why)."""


def format_id(spec: PoolSpec, ranks: int = 1) -> str:
    """12 hex digits naming the byte layout of ``spec``'s blocks (not its size).
    A pool of ``ranks`` > 1 tensor-parallel ranks stores a block as its ranks'
    bytes back to back (``[R][L,2,H/R,B,D]``): another layout, another format."""
    layout = "block-major[L,2,H,B,D]" if ranks == 1 else f"rank-major[R={ranks}][L,2,H/R,B,D]"
    text = (f"kvpager-block-v{FORMAT_VERSION}|layout={layout}|layers={spec.num_layers}|"
            f"kv_heads={spec.num_kv_heads}|head_dim={spec.head_dim}|block_size={spec.block_size}|"
            f"dtype={spec.dtype}")
    if spec.is_fp8:  # FP8 bytes mean something only with their scales: both name the format
        scales = spec.scales.tobytes()
        text += f"|kv_dtype={spec.kv_dtype}|kv_scales={hashlib.blake2b(scales, digest_size=8).hexdigest()}"
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


#: the longest namespace (characters)
MAX_NAMESPACE = 256


def check_namespace(namespace: object) -> str | None:
    """A tier's namespace: None (none), or printable text of 1 to `MAX_NAMESPACE`
    characters (a model's name: ``meta-llama/Llama-3.1-8B-Instruct``)."""
    if namespace is None:
        return None
    if not isinstance(namespace, str) or not 0 < len(namespace) <= MAX_NAMESPACE or not namespace.isprintable():
        raise InvalidArgument(f"the remote namespace must be printable text of 1 to {MAX_NAMESPACE} characters "
                              f"(the model's name), got {namespace!r:.80}")
    return namespace


def namespace_part(namespace: str) -> str:
    """``ns`` and 16 hex digits of a digest of ``namespace``: the key part of one."""
    return "ns" + hashlib.blake2b(namespace.encode(), digest_size=8).hexdigest()


def key_prefix(spec: PoolSpec, ranks: int = 1, namespace: str | None = None) -> str:
    """``kvpager:v1:<format>:`` (then ``ns<namespace>:`` where one is given):
    every key of this geometry (and rank count, and namespace) starts with it."""
    prefix = f"kvpager:v{FORMAT_VERSION}:{format_id(spec, ranks)}:"
    return prefix if namespace is None else f"{prefix}{namespace_part(namespace)}:"


def block_key(prefix: str, root: bytes, key: bytes) -> str:
    """The store key of the block ``key`` under the salt whose root key is ``root``."""
    return f"{prefix}{root[:8].hex()}:{key.hex()}"


def checksum(scope: bytes, key: bytes, payload: memoryview | bytes) -> bytes:
    h = xxhash.xxh3_128(scope)
    h.update(key)
    h.update(payload)
    return h.digest()


class Codec:
    """Encodes and checks the values of one pool geometry whose keys begin with
    ``scope`` (`key_prefix`: format and namespace), which each value's checksum covers."""

    def __init__(self, spec: PoolSpec, scope: str = ""):
        self.spec = spec
        self.scope = scope.encode()
        self.payload_bytes = spec.bytes_per_block
        self.value_bytes = HEADER_BYTES + self.payload_bytes
        self._fixed = (MAGIC, FORMAT_VERSION, HEADER_BYTES, spec.num_layers, spec.num_kv_heads,
                       spec.head_dim, spec.block_size, _DTYPES[spec.storage_dtype])

    def seal(self, row: memoryview, key: bytes) -> None:
        """Fill in the header of ``row`` (``value_bytes`` long, the payload already
        in place after the header): the value to store under ``key``."""
        payload = row[HEADER_BYTES:]
        _HEADER.pack_into(row, 0, *self._fixed, key, checksum(self.scope, key, payload), self.payload_bytes)
        row[_HEADER.size : HEADER_BYTES] = bytes(HEADER_BYTES - _HEADER.size)

    def open(self, value: bytes, key: bytes) -> memoryview:
        """The payload of ``value`` stored under ``key``; BadValue if it is not
        a value of this geometry for this key or its checksum does not match."""
        if len(value) != self.value_bytes:
            raise BadValue(f"{len(value)} bytes, expected {self.value_bytes}")
        magic, version, hbytes, *geometry, stored_key, digest, nbytes = _HEADER.unpack_from(value)
        if (magic, version, hbytes, *geometry) != self._fixed or nbytes != self.payload_bytes:
            raise BadValue(f"header of another format (magic {magic!r}, version {version}, "
                           f"geometry {geometry})")
        if stored_key != key:
            raise BadValue(f"stored for block key {stored_key.hex()}, looked up as {key.hex()}")
        payload = memoryview(value)[HEADER_BYTES:]
        if checksum(self.scope, key, payload) != digest:
            raise BadValue("checksum mismatch (or a value of another namespace, rank layout or scales)")
        return payload
