"""KV cache events: what entered and left the prefix cache, in vLLM's terms.

The block pool reports to an `EventSink` (when one is attached: `KVPool.
set_event_sink`) every time a chained block key enters or leaves the prefix
cache. The daemon drains the sink after each request and publishes what it
holds as one `EventBatch` (`kvpager.events_pub`), or several of at most
`BATCH_BYTES` each (`encode_batches`); an embedded `KVPool` user may drain it
directly. Nothing is recorded while no sink is attached.

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

import math
from typing import Any

import msgpack
import numpy as np

#: vLLM's name for the primary KV cache tier: kvpager's device pool.
MEDIUM = "GPU"
#: Wire formats: "map" (each event a map with its tag under "type", as vLLM
#: publishes since mid-2026) or "array" (each event a positional array led by
#: its tag, as earlier vLLM versions did). The batch is an array either way.
FORMATS = ("map", "array")

#: Most bytes of one batch's payload (the msgpack ``EventBatch``): a request's
#: events past it go out as several batches (`encode_batches`), so what a
#: subscriber that reads nothing holds in the daemon is bounded in bytes
#: (`kvpager.events_pub.SEND_HWM` batches of at most this), whatever the
#: prompts' lengths. 16 KiB: a replay message counts that much at least
#: (`kvpager.events_pub.REPLAY_MIN_CHARGE`, what sending one costs); 1,700 to
#: 2,900 tokens' BlockStored (ids of 9 or 5 bytes), a 1M-token commit ~360
#: batches or more, each cheap beside the commit's hashing.
BATCH_BYTES = 16 << 10

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
        """Keys that left the prefix cache; merged with a removal just before. None
        left (evicted blocks whose keys passed to copies): nothing recorded."""
        if not keys:
            return
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
    return [ts, [_value(e, fmt) for e in events]]


def _value(e: dict[str, Any], fmt: str) -> Any:
    return [e["type"], *(e[f] for f in FIELDS[e["type"]])] if fmt == "array" else e


def encode_batches(ts: float, items: list[tuple[Any, ...]], block_size: int, fmt: str = "map",
                   limit: int = BATCH_BYTES) -> list[bytes]:
    """Recorded events (`EventSink.take`) as msgpack ``EventBatch`` payloads of
    at most ``limit`` bytes each, in order, all stamped ``ts``; one at least
    (empty where ``items`` is). A BlockStored or BlockRemoved too big for one
    is cut into consecutive events of fewer blocks (a piece's parent the last
    block of the piece before), which a consumer reads as if the blocks had
    been published or evicted in several steps; only one block's event bigger
    than ``limit`` (not at any block size kvpager takes) goes alone, over it.

    Each payload is exactly ``msgpack.packb(batch_value(ts, events, fmt))``
    for its events: an array's encoding is its header and its items' own."""
    head = b"\x92" + msgpack.packb(ts)  # [ts, events]: the events' header follows
    room = limit - len(head) - 5  # an array header takes 5 bytes at most
    packed = [p for item in items for p in _packed(item, block_size, fmt, room)]
    payloads, start, size = [], 0, 0
    for i, p in enumerate(packed):
        if i > start and size + len(p) > room:
            payloads.append(_batch(head, packed[start:i]))
            start, size = i, 0
        size += len(p)
    if start < len(packed) or not payloads:
        payloads.append(_batch(head, packed[start:]))
    return payloads


def _batch(head: bytes, events: list[bytes]) -> bytes:
    return b"".join((head, msgpack.Packer().pack_array_header(len(events)), *events))


def _packed(item: tuple[Any, ...], block_size: int, fmt: str, room: int) -> list[bytes]:
    """One recorded event as packed events of at most ``room`` bytes each
    (pieces of its blocks where it is larger), their bytes counted from an
    upper bound on each block's before any is encoded."""
    kind, pack = item[0], msgpack.packb
    if kind == _CLEARED:
        return [pack(_value(e, fmt)) for e in to_dicts([item], block_size)]
    keys = item[1]
    # an empty piece's bytes, and the most its lists' headers and a parent hash add to them
    fixed = len(pack(_value(to_dicts([_piece(item, 0, 0, block_size)], block_size)[0], fmt))) + 16
    if kind == _REMOVED or len(item[3]) != len(keys) * block_size:  # (a malformed record: whole)
        per_block = np.full(len(keys), 9 if kind == _REMOVED else 9 * (block_size + 1))
    else:
        per_block = 9 + _int_bytes(np.asarray(item[3], dtype=np.int64)).reshape(len(keys), block_size).sum(1)
    ends = np.cumsum(per_block)
    out, start, budget = [], 0, room - fixed
    while True:
        base = int(ends[start - 1]) if start else 0
        end = max(start + 1, int(np.searchsorted(ends, base + budget, side="right")))
        end = min(end, len(keys))
        piece = _piece(item, start, end, block_size) if (start, end) != (0, len(keys)) else item
        out.append(pack(_value(to_dicts([piece], block_size)[0], fmt)))
        if end >= len(keys):
            return out
        start = end


def _piece(item: tuple[Any, ...], start: int, end: int, block_size: int) -> tuple[Any, ...]:
    """Blocks ``start:end`` of a recorded BlockStored or BlockRemoved."""
    if item[0] == _REMOVED:
        return (_REMOVED, item[1][start:end])
    _, keys, parent, tokens = item
    return (_STORED, keys[start:end], keys[start - 1] if start else parent,
            tokens[start * block_size:end * block_size])


def _int_bytes(v: np.ndarray) -> np.ndarray:
    """Bytes msgpack takes for each int64 (the smallest form that holds it)."""
    return (1 + (v >= 128) + (v >= 256) + 2 * (v >= 1 << 16) + 4 * (v >= 1 << 32)
            + (v < -32) + (v < -128) + 2 * (v < -(1 << 15)) + 4 * (v < -(1 << 31)))


def parse_batch(value: Any) -> tuple[float, list[dict[str, Any]]]:
    """The timestamp and events of a decoded ``EventBatch`` in either format (or
    vLLM's), each event as a map with its tag under ``type``; ValueError if it
    is not one. Unknown fields are kept; missing ones read as absent."""
    if not isinstance(value, (list, tuple)) or len(value) < 2 or not isinstance(value[1], (list, tuple)):
        raise ValueError("an event batch is an array [ts, events, ...]")
    ts, raw = value[0], value[1]
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise ValueError(f"an event batch's ts must be a number, got {type(ts).__name__}")
    if not (math.isfinite(ts) and abs(ts) < TS_LIMIT):
        raise ValueError(f"an event batch's ts must be seconds since the epoch, got {ts!r}")
    events = []
    for e in raw:
        if isinstance(e, dict) and isinstance(e.get("type"), str):
            events.append(dict(e))
        elif isinstance(e, (list, tuple)) and e and isinstance(e[0], str):
            names = FIELDS.get(e[0], ())
            events.append({"type": e[0], **dict(zip(names, e[1:]))})
        else:
            raise ValueError(f"an event is a tagged map or array, got {type(e).__name__}")
        for name, kinds in _FIELD_KINDS.items():
            if events[-1].get(name) is not None and not isinstance(events[-1][name], kinds):
                raise ValueError(f"an event's {name} must be a {kinds[0].__name__}, got "
                                 f"{type(events[-1][name]).__name__}")
    return float(ts), events


#: the largest ts taken (seconds since the epoch: about the year 5138; a host's clock renders it)
TS_LIMIT = 1e11
#: the types of the fields a reader renders (a field of another type: no event batch)
_FIELD_KINDS: dict[str, tuple[type, ...]] = {
    "block_hashes": (list, tuple), "token_ids": (list, tuple), "parent_block_hash": (int, bytes, str),
    "medium": (str,), "block_size": (int,), "lora_id": (int, str),
}
