"""The daemon's `sequences` pages (what `kvpager seqs` and `Client.sequences`
walk): how long a page holds the daemon's loop, and a whole walk.

    python3 tools/bench_inspect.py [--seqs 100000] [--tokens 20] [--rounds 3] [--json]

A daemon in this process holds ``--seqs`` sequences of ``--tokens`` tokens in
two sessions. Two ways of making a page of 4,096, in turns, in one run:
- columns: as the daemon makes them, from one gather of the page's rows
  (`KVPool.info_columns`, `protocol.encode_infos`), then packed;
- one at a time: a `SequenceInfo` each (`KVPool.sequence`), a map each
  (`protocol.encode_info`), then packed: what the daemon did before.
Per way, the median over rounds of a page's time on the loop (made and
packed) and of every page of the pool; then a client's whole walk
(`Client.sequences`, its decoding included) through the daemon as it runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from daemon_helpers import running_server  # noqa: E402

from kvpager import Client, PoolSpec, protocol  # noqa: E402
from kvpager.protocol_ops import SEQUENCES_PAGE  # noqa: E402


def one_at_a_time(server, ids: list[int]) -> list[dict]:
    """A page as the daemon made it before: a `SequenceInfo`, then a map, each."""
    out = []
    for i in ids:
        info = server.pool.sequence(i)
        d = protocol.encode_info(info)
        owner = server.sessions.by_name.get(info.owner)
        d["owner_pid"] = owner.pid if owner is not None else None
        out.append(d)
    return out


def columns(server, ids: list[int]) -> list[dict]:
    return server._op_sequences(None, {"seq_ids": ids})


def run(seqs: int, tokens: int, rounds: int) -> list[dict]:
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=seqs * (tokens // 16 + 1) + 64,
                    dtype="float16")
    per: dict[str, dict[str, list[float]]] = {w: {"page": [], "all": []} for w in ("columns", "one at a time")}
    walks = []
    with running_server(spec) as server, Client(server.endpoint, timeout=120) as a, \
            Client(server.endpoint, timeout=120) as b:
        for start in range(0, seqs, 2000):
            n = min(2000, seqs - start)
            (a if start < seqs // 2 else b).allocate(
                [list(range((start + k) * tokens, (start + k + 1) * tokens)) for k in range(n)])
        ids = sorted(server.pool.sequence_ids())
        pages = [ids[k : k + SEQUENCES_PAGE] for k in range(0, len(ids), SEQUENCES_PAGE)]
        for r in range(rounds):
            for way, make in (("columns", columns), ("one at a time", one_at_a_time))[:: 1 if r % 2 else -1]:
                times = []
                for page in pages:
                    t0 = time.perf_counter()
                    protocol.pack(make(server, page))
                    times.append(time.perf_counter() - t0)
                per[way]["page"].append(statistics.median(times))
                per[way]["all"].append(sum(times))
            t0 = time.perf_counter()
            assert len(a.sequences()) == seqs
            walks.append(time.perf_counter() - t0)
    rows = [dict(way=w, page_ms=statistics.median(t["page"]) * 1e3, all_s=statistics.median(t["all"]))
            for w, t in per.items()]
    base = rows[1]
    for row in rows:
        row["vs_one_at_a_time"] = base["all_s"] / row["all_s"]
    return rows + [dict(way="client walk (columns)", page_ms=None, all_s=statistics.median(walks),
                        vs_one_at_a_time=None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, default=100_000)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = run(args.seqs, args.tokens, args.rounds)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"sequences pages: {args.seqs} sequences of {args.tokens} tokens, pages of {SEQUENCES_PAGE}, "
          f"medians of {args.rounds} rounds")
    print(f"{'way':<24}{'ms a page':>11}{'s all pages':>13}{'speed-up':>10}")
    for r in rows:
        page = "" if r["page_ms"] is None else f"{r['page_ms']:.1f}"
        ratio = "" if r["vs_one_at_a_time"] is None else f"{r['vs_one_at_a_time']:.2f}x"
        print(f"{r['way']:<24}{page:>11}{r['all_s']:>13.2f}{ratio:>10}")


if __name__ == "__main__":
    main()
