"""What a KV-aware router written for vLLM's event stream expects, written
down independently of kvpager's code: vLLM's event types as msgspec structs
(field names, order and tags as `vllm/distributed/kv_events.py` declares
them; the map form since vLLM #42892, the positional array form before) and
kvpager's chained block keys recomputed from their definition
(docs/protocol.md: BLAKE2b-128 over the parent key and the block's int64
token ids; the root key from the salt)."""

from __future__ import annotations

from typing import Any

import msgspec
from pool_helpers import chain


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


# -- the current form: each event a map, its tag under "type" ----------------------------------
class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


# -- the earlier form: each event a positional array led by its tag ----------------------------
class LegacyEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class LegacyBlockStored(LegacyEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class LegacyBlockRemoved(LegacyEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None


class LegacyAllBlocksCleared(LegacyEvent, tag="AllBlocksCleared"):
    pass


class LegacyKVEventBatch(EventBatch):
    events: list[LegacyBlockStored | LegacyBlockRemoved | LegacyAllBlocksCleared]


DECODERS = {
    "map": msgspec.msgpack.Decoder(type=KVEventBatch),
    "array": msgspec.msgpack.Decoder(type=LegacyKVEventBatch),
}


def hashes(tokens: list[int], block_size: int, salt: bytes = b"") -> list[int]:
    """The block hashes a router sees for ``tokens``: each key's low 64 bits."""
    return [int.from_bytes(k[8:], "big") for k in chain(tokens, block_size, salt)]
