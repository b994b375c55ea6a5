"""Daemon round trips: latency and throughput of `Client` calls against the
same calls on an in-process `KVPool`, beside a bare ZeroMQ + msgpack echo.

    python3 tools/bench_rpc.py            # table
    python3 tools/bench_rpc.py --json     # one JSON object

What is timed (each op checked for correctness first):
- bare: a DEALER -> ROUTER echo of a msgpack request the size of an append of
  one sequence, answered with a small reply (the floor; a 2 KiB request and a
  2 KiB reply, an append of 256's sizes, took 1.4-2.5 us more on a 2-core VM);
- heartbeat: a full daemon round trip that does no pool work;
- append x1: `append([seq])`, one decode step of one sequence;
- append x256: one batched decode step of 256 sequences (a list of 256 slot
  arrays back, as `append` returns);
- append_flat x256: the same step with every slot in one array back
  (`append_flat`, what a batched worker takes);
- throughput: N client processes each doing append x1 in a loop;
- raw append x1 / x256: the daemon's append round trip from a bare DEALER
  socket with msgpack, as the echo is timed (no `Client`: its own work, such
  as following its sequences' tables, stays out); the x256 ids packed (one
  int64 array), as a `Client` sends a batch;
- paired: the bare echo, the raw append x256 with packed ids and the same with
  a list of ids, in turns, one round trip of each at a time (all see the
  machine in the same state), with the per-turn differences: the daemon's
  cost of a decode step over the transport's;
- daemon share: `Server.handle` of the same append requests in this process,
  no socket (decode, ownership check, allocator, encode): what the daemon
  adds to a round trip besides transport and the client's own work.
Sequences are cut back (untimed) every few hundred steps so block tables stay
decode-sized; the in-process column runs the same schedule on a `KVPool`.

    python3 tools/bench_rpc.py --observability [--rounds 5]

compares, in one run, the daemon without and with metrics and KV events
(`serve --metrics-port`, `--events-endpoint`): decode steps (append x1 and
x256) as raw round trips and as `Server.handle`'s share, sent to both
daemons alternately, request by request, so both see the same machine.
Meanwhile (from other processes) another worker commits a prompt on each
daemon every 20 ms, and the observed one has a scraper reading /metrics
every second and a subscriber reading its events. Figures: the median over rounds of each
round's p50, and the median of the rounds' differences (on - off).

The measurements live in ``rpc_measure.py`` (the default run) and
``rpc_observe.py`` (``--observability``), what they share in ``rpc_common.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rpc_common import SPEC, run_daemon, spawn  # noqa: E402
from rpc_measure import bare, handle_cost, latencies, paired, raw, throughput  # noqa: E402
from rpc_observe import observability  # noqa: E402

from kvpager import KVPool  # noqa: E402

#: The daemon's decode step of 256 sequences may cost at most this much over the bare echo (issue 8).
TARGET_OVER_ECHO_US = 40.0


def measure(args: argparse.Namespace, tmp: str) -> tuple[list, dict]:
    """Every measurement of the default run; ipc sockets in ``tmp``: (table rows, result)."""
    from kvpager.client import Client

    embedded = latencies(KVPool(SPEC), args.iters, args.batch)
    handled = handle_cost(args.iters, args.batch)
    rows, result = [], {"machine": f"{os.cpu_count()}-core CPU, {platform.python_implementation()} "
                                   f"{platform.python_version()}", "date": str(date.today()),
                        "in_process": embedded, "daemon_handle": handled, "transports": {}}
    for name, endpoint in (("ipc", f"ipc://{tmp}/bench.sock"), ("tcp", "tcp://127.0.0.1:0")):
        counts = [int(x) for x in args.clients.split(",")] if name == "ipc" else []
        bare_lat, bare_tput = bare(endpoint if name == "tcp" else f"ipc://{tmp}/echo.sock", args.iters,
                                   counts, args.seconds)
        proc, ep = spawn(run_daemon, endpoint)
        with Client(ep, heartbeat=False) as c:
            warm = time.monotonic() + 1.0  # untimed: let caches, clocks and the scheduler settle
            while time.monotonic() < warm:
                c.heartbeat()
            lat = latencies(c, args.iters, args.batch)
        lat.update(raw(ep, args.iters, args.batch))
        lat.update(paired(ep, endpoint if name == "tcp" else f"ipc://{tmp}/echo2.sock", args.iters, args.batch))
        tput = {n: throughput(ep, n, args.seconds) for n in counts}
        proc.terminate()
        proc.join(10)
        result["transports"][name] = {"bare": bare_lat, "daemon": lat, "throughput_ops_s": tput,
                                      "bare_throughput_ops_s": bare_tput}
        rows.append((name, "bare zmq+msgpack echo", bare_lat, None))
        for op, (p50, p99) in lat.items():
            rows.append((name, op, (p50, p99), embedded.get(op)))
        for n, ops in tput.items():
            rows.append((name, f"append x1 throughput, {n} client{'s' * (n > 1)}", (ops, bare_tput[n]), None))
    return rows, result


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--iters", type=int, default=5000, help="single-op round trips per measurement")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--observability", action="store_true",
                    help="only compare the daemon without and with metrics + KV events")
    ap.add_argument("--rounds", type=int, default=5, help="alternations of that comparison")
    args = ap.parse_args()
    if args.observability:
        res = observability(args.iters, args.batch, args.rounds)
        if args.json:
            print(json.dumps(res, indent=2))
            return
        w = res["watchers"]
        print(f"machine: {res['machine']}; date: {res['date']}; {res['rounds']} rounds; meanwhile {w['commits']} "
              f"commits by another worker, {w['scrapes']} scrapes of /metrics, {w['batches']} event batches read")
        print("| measurement | p50 us, off | p50 us, on | on - off (median of rounds) | p99 us, off | p99 us, on |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in res["rows"]:
            print(f"| {row['measurement']} | {row['off_p50_us']:.1f} | {row['on_p50_us']:.1f} | "
                  f"{row['delta_p50_us']:+.1f} | {row['off_p99_us']:.1f} | {row['on_p99_us']:.1f} |")
        return

    with tempfile.TemporaryDirectory(prefix="kvpb", dir="/tmp") as tmp:  # the ipc sockets
        rows, result = measure(args, tmp)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {result['machine']}; date: {result['date']}")
    print("daemon share, Server.handle without a socket: " + "; ".join(
        f"{op} p50 {p50:.1f} us, p99 {p99:.1f} us" for op, (p50, p99) in result["daemon_handle"].items()))
    print("| transport | measurement | p50 us | p99 us | in-process p50 us | daemon / in-process |")
    print("|---|---|---:|---:|---:|---:|")
    for name, what, val, emb in rows:
        if "throughput" in what:
            print(f"| {name} | {what} | {val[0]:,.0f} ops/s | | (bare echo: {val[1]:,.0f} ops/s) | |")
            continue
        p50, p99 = val
        e = f"{emb[0]:.1f} | {p50 / emb[0]:.1f}x" if emb else " | "
        print(f"| {name} | {what} | {p50:.1f} | {p99:.1f} | {e} |")
    target = f"paired: raw append x{args.batch}, packed ids - echo, per pair"
    for name, t in result["transports"].items():  # the daemon's decode step against the transport's floor
        over = t["daemon"][target][0]
        verdict = "" if args.batch != 256 else (
            ": " + ("within" if over <= TARGET_OVER_ECHO_US else "not within") + f" the target, {TARGET_OVER_ECHO_US:+.0f} us")
        print(f"{name}: an append of {args.batch} (packed ids) costs {over:+.1f} us over the echo (p50 of the pairs){verdict}")


if __name__ == "__main__":
    main()
