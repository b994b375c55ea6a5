"""`KVPool`'s inspection: sequences, the block map, `stats` from the block
pool's counters, cumulative `counters`, the event sink, the integrity check."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvpager import seq_check, validate
from kvpager.errors import InvalidArgument
from kvpager.events import EventSink
from kvpager.pool_control import EVERY
from kvpager.seq_check import InfoColumns
from kvpager.types import (
    MAX_TENANT_SALT_BYTES,
    MAX_TENANTS_LISTED,
    BlockMap,
    PoolCounters,
    PoolStats,
    RemoteStats,
    SequenceInfo,
    TenantUsage,
)


class PoolInspection:
    """Mixed into `KVPool`, which supplies ``spec``, ``manager``, ``ranks``,
    ``remote``, the copy counters and ``owned``."""

    def sequence(self, seq_id: int) -> SequenceInfo:
        """One live sequence's `SequenceInfo` (else UnknownSequence). ``seq_id``: an
        int (a NumPy integer or a 0-d integer array: the int it holds); a bool, a
        float or a list is InvalidArgument, as in every other op."""
        if type(seq_id) is not int:
            if isinstance(seq_id, np.ndarray) and seq_id.ndim == 0:
                seq_id = validate.zero_d(seq_id, "seq_id")
            elif not validate.is_int(seq_id):
                raise InvalidArgument(f"seq_id must be an int, got {validate.shown(seq_id)}")
            seq_id = int(seq_id)
        [info] = self.manager.infos([seq_id])
        return info

    def info_columns(self, seq_ids: list[int]) -> InfoColumns:
        """The `SequenceInfo` fields of ``seq_ids`` (ints) as
        columns, their arrays read in one gather: what the daemon's `sequences`
        pages are made of (4,096 `sequence` calls took 120 ms, 20 ms so, a 2-core
        VM). UnknownSequence names the first id that is not live; InvalidArgument
        for ids that are not ints (a bool, a float), as every op refuses them."""
        return seq_check.info_columns(self.manager, validate.seq_ids(seq_ids))

    def sequences(self, owner: Any = EVERY) -> list[SequenceInfo]:
        """Every live sequence, or ``owner``'s only, in id order. Costs what it
        returns: one owner's list is read from an index, not a scan."""
        return self.manager.infos(self.manager.ids() if owner is EVERY else self.owned(owner))

    def blocks(self) -> BlockMap:
        """State and reference count of every device block."""
        return self.manager.pool.block_map()

    def stats(self) -> PoolStats:
        """The pool at a glance, from the block pool's counters and a few array
        reductions (the daemon answers it on its only thread)."""
        m, spec = self.manager, self.spec
        pool, bs = m.pool, spec.block_size
        used = pool.num_used
        tenants, num_tenants = self._tenants()
        return PoolStats(
            total_blocks=pool.num_usable,
            free_blocks=pool.num_free,
            evictable_blocks=pool.num_evictable,
            used_blocks=used,
            shared_blocks=pool.num_shared(),
            cached_blocks=pool.num_cached,
            num_sequences=m.num_sequences,
            swapped_sequences=m.num_swapped,
            host_total_blocks=m.host.num_blocks,
            host_free_blocks=m.host.num_free,
            prefix_query_tokens=m.prefix_query_tokens,
            prefix_hit_tokens=m.prefix_hit_tokens,
            tokens_stored=m.tokens_stored(),
            token_slots_allocated=used * bs,
            block_size=bs,
            bytes_per_block=spec.bytes_per_block,
            pinned_blocks=m.pins.num_pinned,
            max_pinned_blocks=m.pins.limit,
            tenants=tenants,
            ranks=self.ranks,
            num_tenants=num_tenants,
        )

    def counters(self) -> PoolCounters:
        """Cumulative counts since the pool was made (prefix lookups and hits in
        tokens, evictions, copy-on-write and swap copies in blocks); O(1)."""
        m = self.manager
        return PoolCounters(
            prefix_query_tokens=m.prefix_query_tokens,
            prefix_hit_tokens=m.prefix_hit_tokens,
            evicted_blocks=m.pool.num_evicted,
            cow_blocks=self._cow_blocks,
            swap_out_blocks=self._swap_out_blocks,
            swap_in_blocks=self._swap_in_blocks,
            bytes_per_block=self.spec.bytes_per_block,
        )

    def set_event_sink(self, sink: EventSink | None) -> None:
        """Report every key entering or leaving the prefix cache to ``sink``
        (`kvpager.events`: vLLM's BlockStored / BlockRemoved), or stop (None).
        Without a sink nothing is recorded."""
        if sink is not None and not isinstance(sink, EventSink):
            raise InvalidArgument(f"sink must be an EventSink or None, got {type(sink).__name__}")
        self.manager.pool.events = sink

    def _tenants(self) -> tuple[tuple[TenantUsage, ...], int]:
        """The tenants `PoolStats` lists (every one with a quota, then the largest
        others: `MAX_TENANTS_LISTED` in all and `MAX_TENANT_SALT_BYTES` of their
        salts, most cached first), and how many there are."""
        pool = self.manager.pool
        # cached with no reference is evictable (`BlockPool`'s states): a mask made from the
        # LRU, in Python, took 100 ms of every stats (and metrics snapshot) a million idle blocks
        evictable = pool.cache.cached & (pool.ref_cnt == 0)
        rows, total = pool.tenants.rows(pool.cache.cached, evictable, self.manager.pins.refs > 0,
                                        MAX_TENANTS_LISTED, MAX_TENANT_SALT_BYTES)
        return tuple(TenantUsage(*r) for r in rows), total

    def remote_stats(self) -> RemoteStats | None:
        """The remote tier's counters, or None without one."""
        return self.remote.stats() if self.remote is not None else None

    def check_integrity(self) -> None:
        """Raise IntegrityError (with the counts) if any allocator invariant is broken."""
        self.manager.check_integrity()
