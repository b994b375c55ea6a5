"""`/metrics?name[]=NAME`, prometheus_client's filter, on a real daemon: it
answered an empty body for every name (the collector declared no names to
the registry, which serves a filtered scrape from the collectors whose names
it knows). Each name now answers exactly the samples the full scrape has of
it: a sample's name, a family's (all its samples), several at once; process
metrics too; a name of nothing, nothing."""

from __future__ import annotations

import shutil
import urllib.request

import pytest
from daemon_helpers import SMALL, ipc_endpoint, running_server
from prometheus_client.parser import text_string_to_metric_families

from kvpager.client import Client
from kvpager.errors import UnknownSequence
from kvpager.metrics import RequestMetrics, Snapshot, Snapshots
from kvpager.types import PoolCounters, PoolStats, RemoteStats

#: Samples whose values move between two scrapes of an idle daemon (their names stay).
MOVING = ("kvpager_pool_snapshot_age_seconds", "kvpager_loop_busy", "process_")


def get(port: int, query: str = "", headers: dict | None = None) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics{query}", headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a text exposition, by name and labels."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def same(got: dict, want: dict) -> bool:
    """The same samples, and the same values but for those that move on their own."""
    return got.keys() == want.keys() and all(
        got[k] == v for k, v in want.items() if not k[0].startswith(MOVING))


@pytest.fixture(scope="module")
def scraped():
    """A daemon with metrics on after a few ops (its client gone: the request
    counts stay put), its port and a full scrape: {family: (type, samples)}."""
    endpoint, d = ipc_endpoint()
    with running_server(endpoint=endpoint, metrics_port=0) as server:
        with Client(endpoint) as c:
            [a] = c.allocate([list(range(3 * SMALL.block_size + 5))])
            c.commit([a.seq_id])
            [[b]] = c.fork([a.seq_id], 1)
            c.append([b], 1)
            c.swap_out([a.seq_id])
            with pytest.raises(UnknownSequence):
                c.free([10**9])  # (an error result too)
        full = get(server.metrics_port)
        families = {f.name: (f.type, samples_of(f)) for f in text_string_to_metric_families(full)}
        yield server.metrics_port, full, families
    shutil.rmtree(d, ignore_errors=True)


def samples_of(family) -> dict:
    return {(s.name, frozenset(s.labels.items())): s.value for s in family.samples}


def test_a_family_name_answers_exactly_its_samples(scraped):
    port, _, families = scraped
    assert {"kvpager_blocks_free", "kvpager_requests", "kvpager_request_duration_seconds", "kvpager_info",
            "kvpager_swap_blocks", "process_resident_memory_bytes"} <= families.keys()
    for name, (_, want) in families.items():
        got = samples(get(port, f"?name[]={name}"))
        assert same(got, want), (name, got, want)


def test_a_sample_name_answers_exactly_its_samples(scraped):
    port, _, families = scraped
    for name, (kind, want) in families.items():
        names = sorted({n for n, _ in want})
        if kind in ("counter", "histogram"):
            assert all(n != name for n in names)  # (suffixed samples: the family's name is none of them)
        for n in names:
            got = samples(get(port, f"?name[]={n}"))
            assert same(got, {k: v for k, v in want.items() if k[0] == n}), n
            if kind != "histogram":
                break  # (one a family: a scrape waits for the loop's next snapshot)


def test_several_names_answer_their_union_and_unknown_names_nothing(scraped):
    port, full, families = scraped
    every = samples(full)
    query = "?" + "&".join(f"name[]={n}" for n, _ in every)
    assert same(samples(get(port, query)), every)  # every sample's name: the whole scrape
    picked = ["kvpager_requests", "kvpager_blocks_used", "kvpager_request_duration_seconds_count"]
    got = samples(get(port, "?" + "&".join(f"name[]={n}" for n in picked)))
    want = {**families["kvpager_requests"][1], **families["kvpager_blocks_used"][1],
            **{k: v for k, v in families["kvpager_request_duration_seconds"][1].items()
               if k[0] == "kvpager_request_duration_seconds_count"}}
    assert same(got, want)
    assert get(port, "?name[]=kvpager_no_such_metric") == ""
    assert get(port, "?name[]=kvpager_blocks") == ""  # (a prefix names nothing)
    assert same(samples(get(port, "?other=1")), every)  # (no name[]: everything)


def test_the_filter_serves_openmetrics_too(scraped):
    port, _, families = scraped
    text = get(port, "?name[]=kvpager_requests", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert text.endswith("# EOF\n") and "kvpager_requests_total{" in text
    assert "kvpager_blocks" not in text and "process_" not in text


def test_every_family_collect_yields_is_described():
    """What the registry maps names from (`describe`) against what a scrape
    gets (`collect`), a remote tier's families too: a family added to one and
    not the other would be left out of filtered scrapes."""
    from kvpager.metrics_collector import Collector

    stats = PoolStats(*range(1, 17))
    counters = PoolCounters(*range(1, 8))
    remote = RemoteStats("redis://x", True, *range(1, 14))
    snapshots = Snapshots(lambda: Snapshot(stats, counters, 1, 0.0, remote))
    snapshots.serve(0.0)
    requests = RequestMetrics()
    requests.observe("allocate", "ok", 1e-4)
    collector = Collector(requests, snapshots, {"version": "x"}, wait=0.0)
    collected = {(m.name, m.type) for m in collector.collect()}
    described = {(m.name, m.type) for m in collector.describe()}
    assert collected == described and any(n.startswith("kvpager_remote_") for n, _ in described)
