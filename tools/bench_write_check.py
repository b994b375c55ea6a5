"""A staged write's slot check in the daemon (`StagingOps._check_writable`), as
a model's decode step makes it: one `write` a layer, each of the step's slots.

    python3 tools/bench_write_check.py [--seqs 256] [--tokens 32768] [--layers 32] [--json]

One session of a daemon in this process holds ``--seqs`` sequences of
``--tokens`` tokens; a step checks one slot a sequence (each sequence's last)
for each of ``--layers`` layers. Three ways in turns, step by step, in one run:
- kept, own free: as the daemon runs, the blocks found held kept with the
  session (`Session.held`) while neither it nor its driver took a block out of
  a table; between steps it frees a sequence of its own, so the first layer of
  a step gathers the tables, the others look the blocks up;
- kept, other's free: the same, another session freeing one of its own
  between steps (they followed the pool's count before: gathered like the
  own free's);
- gathered: the kept blocks dropped before each call, so every layer gathers
  every table of the session: what each staged write cost before they were kept.
Medians over steps of the step's total, and of its first and later layers' calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from daemon_helpers import running_server  # noqa: E402

from kvpager import Client, PoolSpec  # noqa: E402


def run(seqs: int, tokens: int, layers: int, steps: int) -> list[dict]:
    blocks = (seqs + 2 * steps) * (tokens // 16 + 1) + 64
    spec = PoolSpec(num_layers=layers, num_kv_heads=1, head_dim=8, num_blocks=blocks, dtype="float16")
    ways = ("kept, own free", "kept, other's free", "gathered")
    times: dict[str, list[list[float]]] = {w: [] for w in ways}
    with running_server(spec) as server, Client(server.endpoint, map_pool=False) as mine, \
            Client(server.endpoint, map_pool=False) as other:
        s = next(x for x in server.sessions.sessions.values() if x.name == mine.session_name)
        prompts = [list(range(i * 10**7, i * 10**7 + tokens)) for i in range(seqs + steps)]
        def allocate(client: Client, ps: list[list[int]]) -> list:  # (a message of 16 prompts at most)
            return [a for k in range(0, len(ps), 16) for a in client.allocate(ps[k : k + 16])]

        slots = np.array([int(a.slots[-1]) for a in allocate(mine, prompts[:seqs])], np.int64)
        spare = [a.seq_id for a in allocate(mine, prompts[seqs:])]
        theirs = [a.seq_id for a in allocate(other, [[-1 - p[0]] + p[1:] for p in prompts[seqs:]])]
        for step in range(steps):
            for way in (ways if step % 2 else ways[::-1]):
                # a release between steps (through the daemon, as a client's): the session's own, or
                # another session's; "gathered" drops the kept blocks before every call (as before they were kept)
                if way == "kept, own free":
                    mine.free(spare.pop())
                elif way == "kept, other's free":
                    other.free(theirs.pop())
                t = []
                for _ in range(layers):
                    if way == "gathered":
                        s.held = None
                    t0 = time.perf_counter()
                    server._check_writable(s, slots)
                    t.append(time.perf_counter() - t0)
                times[way].append(t)
    rows = []
    for way, runs in times.items():
        rows.append(dict(way=way, step_ms=statistics.median(sum(t) for t in runs) * 1e3,
                         first_ms=statistics.median(t[0] for t in runs) * 1e3,
                         later_ms=statistics.median(x for t in runs for x in t[1:]) * 1e3))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.layers < 2:  # (it compares a step's first layer with its later ones)
        ap.error("--layers must be at least 2")
    rows = run(args.seqs, args.tokens, args.layers, args.steps)
    if args.json:
        print(json.dumps(dict(vars(args), rows=rows)))
        return
    base = rows[-1]["step_ms"]
    print(f"{args.seqs} sequences x {args.tokens:,} tokens, {args.layers} layers a step "
          f"(medians of {args.steps} steps)")
    print(f"{'way':<20} {'step ms':>9} {'layer 0 ms':>11} {'later layers ms':>16} {'vs gathered':>12}")
    for r in rows:
        print(f"{r['way']:<20} {r['step_ms']:9.2f} {r['first_ms']:11.3f} {r['later_ms']:16.3f} "
              f"{base / r['step_ms']:11.2f}x")


if __name__ == "__main__":
    main()
