"""The daemon's ``kvpager_*`` metric families (`Collector`), and what makes
``/metrics?name[]=NAME`` (prometheus_client's filter) find them.

prometheus_client's registry serves a filtered scrape from the collectors
whose names it knows, and it knows a collector's names only from its
``describe()`` (or, in a registry made with ``auto_describe``, from a
``collect()`` at registration). `Collector.describe` yields every family
`collect` may yield, from a blank snapshot: no wait for the loop. Without
it every filtered scrape answered an empty body. `by_family` lets a name[]
that names a family (``kvpager_requests``, as OpenMetrics' ``# TYPE`` lines
and docs/protocol.md name it) select its samples (``kvpager_requests_total``),
as a sample's name does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode

from kvpager.metrics import BUCKETS, RESULTS, RequestMetrics, Snapshot, Snapshots
from kvpager.types import PoolCounters, PoolStats, RemoteStats

_BOUNDS = (*(f"{b:g}" for b in BUCKETS), "+Inf")  # a histogram's ``le`` labels
#: The samples of a family of each type besides its own name (prometheus_client's names).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "info": ("_info",)}


def _blank(cls: type, **given: Any) -> Any:
    """``cls`` (a dataclass of counts) with every required field 0 but ``given``."""
    return cls(**{f.name: 0 for f in dataclasses.fields(cls)
                  if f.default is dataclasses.MISSING and f.name not in given}, **given)


#: What `Collector.describe` lays out: every family there, the remote tier's included.
BLANK = Snapshot(_blank(PoolStats), _blank(PoolCounters), 0, 0.0, _blank(RemoteStats, store="", available=False))


class Collector:
    """The ``kvpager_*`` metric families, for a `prometheus_client` registry."""

    def __init__(self, requests: RequestMetrics, snapshots: Snapshots, info: dict[str, str], wait: float = 2.0):
        self.requests = requests
        self.snapshots = snapshots
        self.info = info
        self.wait = wait

    def collect(self) -> Iterator[Any]:
        """The families, the pool's figures from a snapshot the loop takes."""
        return self._families(lambda: self.snapshots.request(self.wait))

    def describe(self) -> Iterator[Any]:
        """Every family `collect` may yield (their values no one's): the names
        a registry maps to this collector, read once at registration."""
        return self._families(lambda: BLANK)

    def _families(self, snapshot: Callable[[], Snapshot | None]) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"kvpager_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"kvpager_{name}", doc, value=value)

        info = GaugeMetricFamily("kvpager_info", "The daemon: version, device, block size.", labels=list(self.info))
        info.add_metric(list(self.info.values()), 1)
        yield info
        snap = snapshot()
        if snap is not None:
            st, c = snap.stats, snap.counters
            yield gauge("kv_cache_usage_perc", "Share of device blocks in use (0-1); evictable cached blocks "
                        "count as free.", st.used_blocks / st.total_blocks if st.total_blocks else 0.0)
            yield gauge("blocks_total", "Usable device blocks (the null block excluded).", st.total_blocks)
            yield gauge("ranks", "Tensor-parallel ranks (GPUs) of the pool; each holds bytes_per_block / ranks "
                        "of every block.", st.ranks)
            yield gauge("blocks_free", "Device blocks on the free list.", st.free_blocks)
            yield gauge("blocks_evictable", "Unreferenced device blocks still in the prefix cache.",
                        st.evictable_blocks)
            yield gauge("blocks_used", "Device blocks referenced by at least one sequence.", st.used_blocks)
            yield gauge("blocks_shared", "Device blocks referenced more than once.", st.shared_blocks)
            yield gauge("blocks_pinned", "Device blocks held by pins (never evicted).", st.pinned_blocks)
            yield gauge("blocks_cached", "Device blocks published in the prefix cache.", st.cached_blocks)
            yield gauge("host_blocks_total", "Host (swap) blocks.", st.host_total_blocks)
            yield gauge("host_blocks_free", "Free host (swap) blocks.", st.host_free_blocks)
            yield gauge("sequences", "Live sequences.", st.num_sequences)
            yield gauge("sequences_swapped", "Live sequences swapped out to host memory.", st.swapped_sequences)
            yield gauge("sessions", "Open sessions.", snap.sessions)
            yield gauge("pool_snapshot_age_seconds", "Age of the pool figures in this scrape (the loop "
                        "takes them between requests).", max(0.0, time.monotonic() - snap.taken))
            yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                          c.prefix_query_tokens)
            yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", c.prefix_hit_tokens)
            yield counter("evictions", "Cached blocks evicted from the prefix cache to make room.",
                          c.evicted_blocks)
            yield counter("cow_copies", "Blocks copied by copy-on-write.", c.cow_blocks)
            blocks = CounterMetricFamily("kvpager_swap_blocks", "Blocks copied by swaps, by direction "
                                         "(out: device to host).", labels=["direction"])
            swap_bytes = CounterMetricFamily("kvpager_swap_bytes", "Bytes copied by swaps, by direction.",
                                             labels=["direction"])
            for direction, n, nbytes in (("out", c.swap_out_blocks, c.swap_out_bytes),
                                         ("in", c.swap_in_blocks, c.swap_in_bytes)):
                blocks.add_metric([direction], n)
                swap_bytes.add_metric([direction], nbytes)
            yield blocks
            yield swap_bytes
            if snap.remote is not None:
                yield from _remote(snap.remote, gauge, counter)
        yield from self._requests(CounterMetricFamily, HistogramMetricFamily, gauge, counter)

    def _requests(self, counter_family: Any, histogram_family: Any, gauge: Any, counter: Any) -> Iterator[Any]:
        r = self.requests
        counts = [list(row) for row in r.counts]  # each copy is atomic: no torn row
        buckets = [list(row) for row in r.buckets]
        sums = list(r.sums)
        total = counter_family("kvpager_requests", "Requests handled, by op and result (ok, replayed "
                               "or an error code).", labels=["op", "result"])
        hist = histogram_family("kvpager_request_duration_seconds", "Time the loop spent on a request, by op.",
                                labels=["op"])
        for i, op in enumerate(r.ops):
            for j, result in enumerate(RESULTS):
                if counts[i][j]:
                    total.add_metric([op, result], counts[i][j])
            if any(buckets[i]):
                cumulative, acc = [], 0
                for bound, n in zip(_BOUNDS, buckets[i]):
                    acc += n
                    cumulative.append((bound, acc))
                hist.add_metric([op], cumulative, sums[i])
        yield total
        yield hist
        yield counter("session_expiries", "Sessions ended for missing heartbeats.", r.session_expiries)
        yield counter("loop_busy_seconds", "Seconds the loop spent handling requests and expiring sessions.",
                      r.busy)
        yield gauge("loop_busy_ratio", "Share of the last second the loop was busy (0-1).", r.busy_ratio)


def _remote(r: RemoteStats, gauge: Any, counter: Any) -> Iterator[Any]:
    """The remote prefix tier's figures (`kvpager.remote_tier`)."""
    yield gauge("remote_available", "1 while the remote store is used, 0 while the circuit breaker skips it.",
                float(r.available))
    yield counter("remote_lookups", "Allocates that asked the remote store.", r.lookups)
    yield counter("remote_lookup_blocks", "Block keys asked of the remote store.", r.lookup_blocks)
    yield counter("remote_hit_blocks", "Valid values the remote store returned.", r.hit_blocks)
    yield counter("remote_restored_blocks", "Blocks restored from the remote store into the pool.",
                  r.restored_blocks)
    yield counter("remote_restored_bytes", "K/V bytes restored from the remote store.", r.restored_bytes)
    yield counter("remote_skipped_lookups", "Lookups not sent while the store was marked unavailable.",
                  r.skipped_lookups)
    yield counter("remote_probes", "Read-only probes (cached_tokens) that asked the remote store.", r.probes)
    yield counter("remote_probe_blocks", "Block keys probes asked the remote store about.", r.probe_blocks)
    yield counter("remote_probe_hit_blocks", "Block keys probes found in the remote store.", r.probe_hit_blocks)
    yield counter("remote_skipped_probes", "Probes not sent while the store was marked unavailable.",
                  r.skipped_probes)
    yield counter("remote_errors", "Failed remote store calls (lookups, probes, writes, deletes).", r.errors)
    yield counter("remote_store_losses", "Times the remote store was found to have lost blocks this tier wrote.",
                  r.store_losses)
    yield counter("remote_republished_blocks", "Blocks cached here offered to the remote store again after a loss.",
                  r.republished_blocks)
    yield counter("remote_corrupt_blocks", "Values refused (format, key, length, checksum) and deleted.",
                  r.corrupt_blocks)
    yield gauge("remote_queued_blocks", "Blocks waiting to be written to the remote store.", r.queued_blocks)
    yield gauge("remote_queued_bytes", "Bytes waiting to be written to the remote store.", r.queued_bytes)
    yield counter("remote_written_blocks", "Blocks newly written to the remote store.", r.written_blocks)
    yield counter("remote_written_bytes", "Bytes newly written to the remote store.", r.written_bytes)
    yield counter("remote_dropped_blocks", "Blocks never written: the queue was full or the store "
                  "unavailable.", r.dropped_blocks)



def family_samples(families: Iterable[Any]) -> dict[str, tuple[str, ...]]:
    """Family name -> its samples' names (a gauge's: its own) for ``families``
    (`Collector.describe`, a `ProcessCollector`'s ``collect()``)."""
    return {m.name: (m.name, *(m.name + s for s in SUFFIXES.get(m.type, ()))) for m in families}


def by_family(app: Callable[..., Any], samples: dict[str, tuple[str, ...]]) -> Callable[..., Any]:
    """prometheus_client's WSGI ``app`` with each ``name[]`` that names a family
    in ``samples`` standing for its samples too (a counter's ``_total``, a
    histogram's ``_bucket``, ``_sum``, ``_count``); sample names, and names of
    nothing, as prometheus_client takes them."""

    def filtered(environ: dict[str, Any], start_response: Any) -> Any:
        query = environ.get("QUERY_STRING", "")
        if "name" in query:
            params = parse_qs(query)
            names = params.get("name[]")
            if names:
                params["name[]"] = list(dict.fromkeys(s for n in names for s in samples.get(n, (n,))))
                environ = {**environ, "QUERY_STRING": urlencode(params, doseq=True)}
        return app(environ, start_response)

    return filtered
