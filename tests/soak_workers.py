"""The soak test's worker: random ops against a daemon that is killed and
restarted under it, until a deadline; prints one JSON line of counts.

Run as ``python -c "import soak_workers; soak_workers.main(ENDPOINT, SEED, SECONDS)"``."""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from collections import Counter

import numpy as np

from kvpager.client import Client
from kvpager.errors import (
    DaemonUnavailable,
    InvalidArgument,
    KVPagerError,
    NotSwapped,
    OutOfBlocks,
    RequestTimeout,
    SequenceSwapped,
    SessionLost,
    UnknownSequence,
)

PREFIXES = [list(range(k * 1000, k * 1000 + 48)) for k in range(3)]
EXPECTED = (OutOfBlocks, NotSwapped, SequenceSwapped)


def _drop(c: Client | None) -> None:
    if c is not None:
        c.timeout = 0.5
        with contextlib.suppress(Exception):
            c.close()


def _step(c: Client, rng: random.Random, mine: list[int], counts: Counter) -> None:
    spec = c.spec
    op = rng.choice(["allocate", "allocate", "append", "append", "commit", "fork", "free", "truncate",
                     "swap", "attend", "cached", "inspect"])
    counts[op] += 1
    if op == "allocate" or not mine:
        prompt = rng.choice(PREFIXES) + [rng.randrange(10**6) for _ in range(rng.randrange(0, 40))]
        [a] = c.allocate([prompt])
        mine.append(a.seq_id)
        if len(a.slots):
            for layer in range(spec.num_layers):
                kv = np.full((len(a.slots), spec.num_kv_heads, spec.head_dim), a.seq_id % 7, spec.np_dtype)
                c.write(layer, a.slots, kv, kv)
        c.commit(a.seq_id)
    elif op == "append":
        ids = rng.sample(mine, min(len(mine), rng.randrange(1, 4)))
        n = rng.randrange(1, 4)
        c.append(ids, n, [[rng.randrange(10**6) for _ in range(n)] for _ in ids])
    elif op == "commit":
        c.commit(rng.sample(mine, min(len(mine), 3)))
    elif op == "fork" and len(mine) < 40:
        mine.extend(c.fork(rng.choice(mine), rng.randrange(1, 3))[0])
    elif op == "free":
        s = rng.choice(mine)
        mine.remove(s)
        c.free(s)
    elif op == "truncate":
        s = rng.choice(mine)
        c.truncate(s, rng.randrange(0, 20))
    elif op == "swap":
        s = rng.choice(mine)
        c.swap_out(s)
        c.swap_in(s)
    elif op == "attend":
        s = rng.choice(mine)
        q = np.ones((1, spec.num_kv_heads, spec.head_dim), spec.np_dtype)
        if c.sequence(s).num_tokens:
            c.attend(0, [s], q)
    elif op == "cached":
        c.cached_tokens([rng.choice(PREFIXES)])
    else:
        c.stats()
        if rng.random() < 0.2:
            c.sequences()


def main(endpoint: str, seed: int, seconds: float) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    counts: Counter = Counter()
    bugs: list[str] = []
    c: Client | None = None
    mine: list[int] = []
    while time.monotonic() < deadline:
        try:
            if c is None:
                c, mine = Client(endpoint, timeout=3, name=f"soak-{seed}"), []
            _step(c, rng, mine, counts)
            counts["ok"] += 1
        except EXPECTED:
            counts["expected"] += 1
        except InvalidArgument:
            counts["invalid"] += 1  # a truncate past the end, after random appends and truncates
        except UnknownSequence:
            # after a timed-out free, this worker's own list may be off
            counts["stale"] += 1
            if c is not None:
                mine[:] = [s.seq_id for s in c.sequences() if s.owner == c.session_name]
        except SessionLost:
            counts["lost"] += 1
            _drop(c)
            c = None
        except (DaemonUnavailable, RequestTimeout, ConnectionError):
            counts["unavailable"] += 1
            _drop(c)
            c = None
            time.sleep(0.2)
        except KVPagerError as e:  # internal, integrity, protocol: a bug
            bugs.append(f"{type(e).__name__}: {e}")
    _drop(c)
    print(json.dumps({"counts": counts, "bugs": bugs}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
