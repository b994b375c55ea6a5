"""Result types returned by `KVPool` and `Client` alike (frozen dataclasses)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Allocation:
    """A new sequence. The worker computes K/V only for tokens from
    ``num_cached_tokens`` on, writing them into ``slots`` (one per such token).
    ``num_remote_tokens`` of the cached tokens were restored from the remote
    tier by this allocate (their K/V came from another host's daemon)."""

    seq_id: int
    block_table: tuple[int, ...]
    num_cached_tokens: int
    slots: np.ndarray  # int64 [num_tokens - num_cached_tokens]
    num_remote_tokens: int = 0

    def __init__(self, seq_id: int, block_table: tuple[int, ...], num_cached_tokens: int, slots: np.ndarray,
                 num_remote_tokens: int = 0):
        # The fields in the instance's dict, as the generated __init__ of a
        # frozen dataclass stores them, without its object.__setattr__ call
        # per field (about 2 us per allocation on a small machine, where an
        # allocate of one cached prompt takes about 40).
        d = self.__dict__
        d["seq_id"] = seq_id
        d["block_table"] = block_table
        d["num_cached_tokens"] = num_cached_tokens
        d["slots"] = slots
        d["num_remote_tokens"] = num_remote_tokens

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Allocation):
            return NotImplemented
        return (
            (self.seq_id, self.block_table, self.num_cached_tokens, self.num_remote_tokens)
            == (other.seq_id, other.block_table, other.num_cached_tokens, other.num_remote_tokens)
            and np.array_equal(self.slots, other.slots)
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class CacheProbe:
    """What an `allocate` of a prompt would find cached now (`KVPool.probe_cache`):
    ``num_cached_tokens`` as its `Allocation` would say, ``num_remote_tokens``
    of them to be restored from the remote tier (the rest are local hits)."""

    num_cached_tokens: int
    num_remote_tokens: int = 0

    @property
    def num_local_tokens(self) -> int:
        """The cached tokens held in this pool's prefix cache now."""
        return self.num_cached_tokens - self.num_remote_tokens


@dataclass(frozen=True)
class SequenceInfo:
    """One sequence as seen from outside."""

    seq_id: int
    owner: str | None  # the owning session's public name (a daemon's); None embedded
    num_tokens: int
    num_committed: int
    block_table: tuple[int, ...]  # 0 marks a block swapped out to host memory
    shared_blocks: int  # blocks whose reference count is above 1
    swapped: bool
    host_blocks: int  # its entries moved to host blocks (a block a swapped group shares, counted in each)
    owner_pid: int | None = None  # the owning session's client process (a daemon's)

    @property
    def state(self) -> str:
        return "swapped" if self.swapped else "resident"


def salt_text(salt: str | bytes | None) -> str | None:
    """A salt for JSON, told apart from every other: bytes as ``hex:`` + their hex
    digits; a str as it is, unless it begins with ``hex:`` or ``str:`` (then
    ``str:`` + it: the str ``"hex:61"`` read as the bytes ``b"a"`` before)."""
    if isinstance(salt, bytes):
        return "hex:" + salt.hex()
    if isinstance(salt, str) and salt.startswith(("hex:", "str:")):
        return "str:" + salt
    return salt


@dataclass(frozen=True)
class TenantUsage:
    """One tenant (salt) of the prefix cache: its published blocks, and its quota."""

    salt: str | bytes | None  # as first given; None is the default tenant
    cached_blocks: int  # published blocks, in use or evictable (what the quota bounds)
    evictable_blocks: int  # of those, the ones eviction may take
    pinned_blocks: int  # of those, the ones held by pins
    quota: int | None  # None: no quota

    @property
    def over_quota(self) -> bool:
        return self.quota is not None and self.cached_blocks > self.quota

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["salt"] = salt_text(self.salt)
        return d


@dataclass(frozen=True)
class PinInfo:
    """A pinned prefix: its blocks stay in the prefix cache, never evicted,
    until every pin on it is unpinned (or its owner's session ends)."""

    owner: str | None  # the session that pinned it; None: the pool's own (kept) pins
    salt: str | bytes | None
    num_tokens: int  # full blocks pinned x block size
    count: int  # times pinned by this owner: each unpin drops one
    block_table: tuple[int, ...]
    pin_id: int = -1  # the pool's number for it, in the order pins were made (`pins` pages by it)

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["salt"] = salt_text(self.salt)
        d["block_table"] = list(self.block_table)
        return d


@dataclass(frozen=True)
class SessionInfo:
    """A daemon session as others see it (never its secret id)."""

    name: str  # public: the owner of its sequences and pins
    client: str  # the name the client gave in hello
    pid: int | None  # the client's process
    sequences: int  # live sequences it owns
    pins: int  # pins it holds (released when it ends)
    requests: int  # requests it has sent
    age_s: float  # seconds since hello
    idle_s: float  # seconds since it was last heard from
    control: bool  # opened with the daemon's control token
    rank: int | None = None  # the tensor-parallel rank it serves (None: none named; a daemon that predates it)
    driver: str | None = None  # a rank worker's driver: that session's public name (None: none)


#: The most tenants `PoolStats.tenants` lists, and the most bytes of their salts
#: (1,000 salts of 16 KiB made every `stats` reply 16 MB).
MAX_TENANTS_LISTED = 1000
MAX_TENANT_SALT_BYTES = 1 << 20


@dataclass(frozen=True)
class PoolStats:
    """The pool at a glance. Block counts exclude the reserved null block."""

    total_blocks: int
    free_blocks: int
    evictable_blocks: int
    used_blocks: int
    shared_blocks: int
    cached_blocks: int
    num_sequences: int
    swapped_sequences: int
    host_total_blocks: int
    host_free_blocks: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    tokens_stored: int  # real tokens held by in-use blocks, shared blocks counted once
    token_slots_allocated: int  # used_blocks * block_size
    block_size: int
    bytes_per_block: int
    pinned_blocks: int = 0  # distinct blocks held by pins (in use; never evicted)
    max_pinned_blocks: int = 0  # the cap on pinned_blocks
    #: tenants with cached blocks or a quota, most cached first: every one with a quota,
    #: then the largest others, `MAX_TENANTS_LISTED` in all (a daemon's clients may name
    #: any number of tenants: every salt is one)
    tenants: tuple[TenantUsage, ...] = ()
    ranks: int = 1  # tensor-parallel ranks: each holds bytes_per_block / ranks of every block
    num_tenants: int = 0  # every tenant with cached blocks or a quota, listed in `tenants` or not

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def bytes_per_block_per_rank(self) -> int:
        """What one rank (one GPU) stores of a block."""
        return self.bytes_per_block // max(1, self.ranks)

    @property
    def slot_utilization(self) -> float:
        """Share of allocated token slots that hold real tokens."""
        return self.tokens_stored / self.token_slots_allocated if self.token_slots_allocated else 1.0

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["tenants"] = [t.to_dict() for t in self.tenants]
        d["prefix_hit_rate"] = self.prefix_hit_rate
        d["slot_utilization"] = self.slot_utilization
        d["bytes_per_block_per_rank"] = self.bytes_per_block_per_rank
        return d


@dataclass(frozen=True)
class PoolCounters:
    """What the pool has done since it was made: cumulative counts, read in
    O(1) (`KVPool.counters`). Swap counts are blocks copied (a swap-in that
    re-shares a block still cached on the device copies nothing)."""

    prefix_query_tokens: int  # prompt tokens looked up by allocate
    prefix_hit_tokens: int  # of those, found in the prefix cache
    evicted_blocks: int  # cached blocks evicted (LRU) to make room
    cow_blocks: int  # blocks copied by copy-on-write (append to a shared, partly filled block)
    swap_out_blocks: int  # device -> host copies
    swap_in_blocks: int  # host -> device copies
    bytes_per_block: int

    @property
    def swap_out_bytes(self) -> int:
        return self.swap_out_blocks * self.bytes_per_block

    @property
    def swap_in_bytes(self) -> int:
        return self.swap_in_blocks * self.bytes_per_block


@dataclass(frozen=True)
class BlockMap:
    """Per-block state of the device pool: ``state[b]`` is one of NULL, FREE,
    EVICTABLE, USED; ``ref_cnt[b]`` its reference count."""

    NULL = 0
    FREE = 1
    EVICTABLE = 2
    USED = 3
    STATE_NAMES = ("null", "free", "evictable", "used")

    state: np.ndarray  # uint8 [num_blocks]
    ref_cnt: np.ndarray  # int32 [num_blocks]
    cached: np.ndarray  # bool [num_blocks]: published in the prefix cache

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockMap):
            return NotImplemented
        return all(np.array_equal(getattr(self, f), getattr(other, f)) for f in ("state", "ref_cnt", "cached"))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class RemoteStats:
    """The tier's counters since the daemon started."""

    store: str  # the store's URL, without a password
    available: bool  # False while the circuit breaker skips the store
    lookups: int  # allocates that asked the store
    lookup_blocks: int  # block keys asked for
    hit_blocks: int  # values found and valid
    restored_blocks: int  # restored into device blocks
    restored_bytes: int
    skipped_lookups: int  # lookups not sent: the store was marked unavailable
    errors: int  # failed store calls (lookups, probes, writes, deletes)
    corrupt_blocks: int  # values refused (format, key, length, checksum) and deleted
    queued_blocks: int  # waiting to be written now
    queued_bytes: int
    written_blocks: int  # new in the store
    written_bytes: int
    dropped_blocks: int  # never written: the queue was full or the store unavailable
    # read-only probes (`KVPool.cached_tokens`); 0 from a daemon that predates them
    probes: int = 0  # probes that asked the store (failed ones count in errors too)
    probe_blocks: int = 0  # block keys they asked about
    probe_hit_blocks: int = 0  # keys the store held
    skipped_probes: int = 0  # probes not sent: the store was marked unavailable
    # blocks the store lost (`kvpager.remote_republish`); 0 from a daemon that predates them
    store_losses: int = 0  # times the store was found to have lost blocks this tier wrote
    republished_blocks: int = 0  # blocks cached here offered to the store again since

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)
