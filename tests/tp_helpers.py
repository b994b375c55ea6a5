"""The tensor-parallel daemon scenario, shared by the CPU and the GPU tests: a
driver session (no rank: the scheduler) runs the sequence ops, one worker
process per rank writes and attends over its heads, and a one-rank NumPy
pool of all the heads (the twin) runs the same ops; the ranks' outputs side
by side must be the twin's, and each rank's storage the twin's heads."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Iterator

import numpy as np
from daemon_helpers import join_or_kill
from daemon_workers import dense_kv, query
from tp_workers import WAIT, rank_worker

from kvpager import Client, KVPool, PoolSpec


@contextlib.contextmanager
def rank_workers(endpoint: str, devices: list[str | None], driver: str | None = None) -> Iterator[list]:
    """One spawned worker per rank (for the session whose secret is ``driver``);
    yields [(inbox, outbox)] after every hello."""
    ctx = mp.get_context("spawn")
    chans = [(ctx.Queue(), ctx.Queue()) for _ in devices]
    procs = [ctx.Process(target=rank_worker, args=(endpoint, r, d, i, o, driver), daemon=True)
             for r, (d, (i, o)) in enumerate(zip(devices, chans))]
    for p in procs:
        p.start()
    try:
        yield chans
    finally:
        for inbox, _ in chans:
            inbox.put(("stop",))
        join_or_kill(procs, 30)


def ask(chans: list, cmd: tuple, tag: str) -> list:
    """Send ``cmd`` to every rank; their payloads in rank order."""
    for inbox, _ in chans:
        inbox.put(cmd)
    out = []
    for r, (_, outbox) in enumerate(chans):
        got, payload = outbox.get(timeout=WAIT)
        assert got == tag, f"rank {r}: {got}: {payload}"
        out.append(payload)
    return out


def twin_write(twin: KVPool, seed: int, slots: np.ndarray, start: int, total: int) -> None:
    s = twin.spec
    for layer in range(s.num_layers):
        k, v = dense_kv(seed, layer, total, s.num_kv_heads, s.head_dim, s.dtype)
        twin.write(layer, slots, k[start:total], v[start:total])


def run_scenario(endpoint: str, spec: PoolSpec, devices: list[str | None], num_q_heads: int,
                 rtol: float, atol: float) -> dict:
    """The scenario against a daemon of ``len(devices)`` ranks serving ``spec``;
    returns a few figures for the caller's own checks."""
    R, bs = len(devices), spec.block_size
    per = spec.num_kv_heads // R
    twin = KVPool(spec)
    with Client(endpoint) as d, rank_workers(endpoint, devices, d.session) as chans:
        hellos = [chans[r][1].get(timeout=WAIT) for r in range(R)]
        for r, (tag, h) in enumerate(hellos):
            assert tag == "hello", h
            assert (h["rank"], h["ranks"], h["heads"], h["pool_heads"]) == (r, R, per, spec.num_kv_heads)
        assert d.ranks == R and d.rank is None and d.memory["kind"] == "ranks"

        def both(op, *args):
            got, want = getattr(d, op)(*args), getattr(twin, op)(*args)
            return got, want

        def write(seed, slots, start, total):
            ask(chans, ("write", seed, np.asarray(slots), start, total), "written")
            twin_write(twin, seed, np.asarray(slots), start, total)

        def attend(seq_ids, qlens, seed):
            parts = ask(chans, ("attend", seed, seq_ids, qlens, num_q_heads), "attended")
            for layer in range(spec.num_layers):
                q = query(seed, layer, sum(qlens), num_q_heads, spec.head_dim, spec.dtype)
                want = twin.attend(layer, seq_ids, q, qlens).astype(np.float32)
                for how in ("plan", "local", "remote"):
                    got = np.concatenate([p[how][layer] for p in parts], axis=1).astype(np.float32)
                    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{how} layer {layer}")

        def storage():
            dumps = ask(chans, ("dump",), "dump")
            dev, host = twin.backend.device_array(), twin.backend.host_array()
            for r, (kv, hkv) in enumerate(dumps):
                mine = dev[:, :, :, r * per : (r + 1) * per]
                assert kv.view(np.uint8).tobytes() == np.ascontiguousarray(mine).view(np.uint8).tobytes(), f"rank {r}"
                if hkv is not None:
                    assert np.array_equal(hkv, host[:, :, :, r * per : (r + 1) * per]), f"rank {r} host pool"
            return dumps

        system = list(range(300, 300 + 3 * bs + 3))
        [x], [tx] = both("allocate", [system])
        assert x.block_table == tx.block_table
        write(1, x.slots, 0, len(system))
        both("commit", x.seq_id)
        # a prefix hit: the second prompt shares the first three blocks
        [y], [ty] = both("allocate", [system[: 3 * bs] + [7] * 5])
        assert y.num_cached_tokens == ty.num_cached_tokens == 3 * bs and y.block_table == ty.block_table
        write(2, y.slots, 3 * bs, 3 * bs + 5)
        attend([x.seq_id, y.seq_id], [2, 5], seed=10)
        # fork, then a decode step of the child: copy-on-write of the shared last block, on every rank
        [[c]], _ = both("fork", x.seq_id)
        [slot], _ = both("append", c, 1)
        cow_src, cow_dst = x.block_table[-1], d.sequence(c).block_table[-1]
        assert cow_dst != cow_src and twin.counters().cow_blocks == 1
        write(3, slot, len(system), len(system) + 1)
        attend([x.seq_id, y.seq_id, c], [1, 3, 2], seed=11)
        dumps = storage()
        for kv, _ in dumps:  # the copy holds the parent's tokens of that block on this rank too
            assert np.array_equal(kv[cow_dst, :, :, :, :3], kv[cow_src, :, :, :, :3])
        # swap out and back in: every rank's blocks go through its host pool
        both("swap_out", y.seq_id)
        both("swap_in", y.seq_id)
        assert d.sequence(y.seq_id).block_table == twin.sequence(y.seq_id).block_table
        attend([y.seq_id, c], [4, 1], seed=12)
        both("truncate", c, 3 * bs + 1)
        both("free", x.seq_id)
        [slot], _ = both("append", c, 1)
        write(4, slot, 3 * bs + 1, 3 * bs + 2)
        attend([y.seq_id, c], [1, 2], seed=13)
        storage()
        d.check_integrity()
        st = d.stats()
        assert st.ranks == R and st.bytes_per_block_per_rank * R == spec.bytes_per_block
        return {"stats": st, "hellos": [h for _, h in hellos]}
