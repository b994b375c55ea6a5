"""KV cache events: what entered and left the prefix cache, in vLLM's terms.

The block pool reports to an `EventSink` (when one is attached: `KVPool.
set_event_sink`) every time a chained block key enters or leaves the prefix
cache. The daemon drains the sink after each request and publishes what it
holds as one `EventBatch` (`kvpager.events_pub`); an embedded `KVPool` user
may drain it directly. Nothing is recorded while no sink is attached.

Events carry vLLM's names and fields, so a KV-aware router written for vLLM's
event stream reads kvpager's unchanged (docs/protocol.md, "KV events"):

- ``BlockStored{block_hashes, parent_block_hash, token_ids, block_size,
  lora_id, medium, lora_name}``: consecutive blocks of one sequence published
  by ``commit`` (or re-published by ``swap_in``);
- ``BlockRemoved{block_hashes, medium}``: keys that left the cache (LRU
  eviction, or a block about to be rewritten after a truncate);
- ``AllBlocksCleared{}``: the cache is empty (a daemon starting or stopping).

A key leaves the cache only when its block does: kvpager keeps one block per
key, so a key is never reported removed while a block still answers to it.
Hashes are the low 64 bits of kvpager's 128-bit chained block keys (the last
8 bytes, big-endian, as vLLM truncates its own digests by default).
``medium`` is always ``"GPU"``: the device pool, the tier a prompt can hit
(on the CPU backend it lives in host memory). Host (swap) blocks are private
to their swapped-out sequence and never matchable, so no event names them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: vLLM's name for the primary KV cache tier: kvpager's device pool.
MEDIUM = "GPU"
#: Wire formats: "map" (each event a map with its tag under "type", as vLLM
#: publishes since mid-2026) or "array" (each event a positional array led by
#: its tag, as earlier vLLM versions did). The batch is an array either way.
FORMATS = ("map", "array")

_STORED, _REMOVED, _CLEARED = 0, 1, 2


def hash64(key: bytes) -> int:
    """A block key as vLLM's integer block hash: its last 8 bytes, big-endian."""
    return int.from_bytes(key[-8:], "big")


class EventSink:
    """Events recorded on the allocator's thread until someone takes them.

    Each entry is a small tuple (keys and token ids are kept as they are and
    turned into wire values by `encode_batch`, off the allocator's path)."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple[Any, ...]] = []

    def stored(self, keys: list[bytes], parent: bytes | None, tokens: np.ndarray) -> None:
        """Blocks published under ``keys`` (consecutive in one sequence): ``parent``
        is the key before the first (None for a sequence's first block) and
        ``tokens`` their token ids, ``len(keys) * block_size`` of them. The
        token array must not be modified afterwards."""
        self.items.append((_STORED, keys, parent, tokens))

    def removed(self, keys: list[bytes]) -> None:
        """Keys that left the prefix cache; merged with a removal just before."""
        items = self.items
        if items and items[-1][0] == _REMOVED:
            items[-1][1].extend(keys)
        else:
            items.append((_REMOVED, list(keys)))

    def cleared(self) -> None:
        """The whole prefix cache is gone."""
        self.items.append((_CLEARED,))

    def take(self) -> list[tuple[Any, ...]]:
        """The events recorded so far, oldest first; the sink is empty afterwards."""
        items, self.items = self.items, []
        return items


def to_dicts(items: list[tuple[Any, ...]], block_size: int) -> list[dict[str, Any]]:
    """Recorded events as maps with vLLM's tag (``type``) and field names."""
    out: list[dict[str, Any]] = []
    for item in items:
        kind = item[0]
        if kind == _STORED:
            _, keys, parent, tokens = item
            out.append({
                "type": "BlockStored",
                "block_hashes": [hash64(k) for k in keys],
                "parent_block_hash": None if parent is None else hash64(parent),
                "token_ids": np.asarray(tokens).tolist(),
                "block_size": block_size,
                "lora_id": None,
                "medium": MEDIUM,
                "lora_name": None,
            })
        elif kind == _REMOVED:
            out.append({"type": "BlockRemoved", "block_hashes": [hash64(k) for k in item[1]], "medium": MEDIUM})
        else:
            out.append({"type": "AllBlocksCleared"})
    return out


#: Field order of each event in the "array" format (after the tag).
FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                    "lora_name"),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


def batch_value(ts: float, events: list[dict[str, Any]], fmt: str = "map") -> list[Any]:
    """An ``EventBatch`` as the msgpack value vLLM sends: ``[ts, events]``, each
    event a tagged map or, in the "array" format, ``[tag, field, ...]``."""
    if fmt == "array":
        events = [[e["type"], *(e[f] for f in FIELDS[e["type"]])] for e in events]  # type: ignore[misc]
    return [ts, events]


def parse_batch(value: Any) -> tuple[float, list[dict[str, Any]]]:
    """The timestamp and events of a decoded ``EventBatch`` in either format (or
    vLLM's), each event as a map with its tag under ``type``; ValueError if it
    is not one. Unknown fields are kept; missing ones read as absent."""
    if not isinstance(value, (list, tuple)) or len(value) < 2 or not isinstance(value[1], (list, tuple)):
        raise ValueError("an event batch is an array [ts, events, ...]")
    ts, raw = value[0], value[1]
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise ValueError(f"an event batch's ts must be a number, got {type(ts).__name__}")
    events = []
    for e in raw:
        if isinstance(e, dict) and isinstance(e.get("type"), str):
            events.append(dict(e))
        elif isinstance(e, (list, tuple)) and e and isinstance(e[0], str):
            names = FIELDS.get(e[0], ())
            events.append({"type": e[0], **dict(zip(names, e[1:]))})
        else:
            raise ValueError(f"an event is a tagged map or array, got {type(e).__name__}")
    return float(ts), events
