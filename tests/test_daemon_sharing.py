"""Two worker processes share a system prompt's blocks through the daemon; the
second one's attention (through its own mapping, and computed by the daemon)
matches a float64 reference computed from dense K/V."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
from daemon_helpers import join_or_kill, running_server
from daemon_workers import dense_kv, prefix_reader, prefix_writer, query
from reference import TOLERANCE, attention, rel_err

from kvpager.client import Client
from kvpager.spec import PoolSpec

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=32, num_blocks=64, block_size=16, dtype="float32")
NUM_Q_HEADS = 4  # GQA: two query heads per kv head
SEED = 1234
WAIT = 120  # seconds; spawn start-up on a busy 2-core machine is slow, but bounded


def test_two_processes_share_a_prefix():
    ctx = mp.get_context("spawn")
    system = list(range(1000, 1064))  # 4 full blocks
    request = system + [5, 6, 7, 8, 9, 10, 11]
    with running_server(SPEC, heartbeat_timeout=30) as server:
        out_a, out_b, done = ctx.Queue(), ctx.Queue(), ctx.Event()
        a = ctx.Process(target=prefix_writer, args=(server.endpoint, system, SEED, out_a, done))
        b = ctx.Process(target=prefix_reader, args=(server.endpoint, request, SEED, NUM_Q_HEADS, out_b, done))
        try:
            a.start()
            ra = out_a.get(timeout=WAIT)
            b.start()
            rb = out_b.get(timeout=WAIT)

            # B found A's committed blocks: the same physical ids, only its tail is new.
            assert rb["cached"] == 64
            assert rb["block_table"][:4] == ra["block_table"]
            assert set(rb["block_table"][4:]).isdisjoint(ra["block_table"])

            with Client(server.endpoint) as obs:
                st = obs.stats()
                assert st.used_blocks == 4 + 1  # the prefix counted once, plus B's tail block
                assert st.shared_blocks == 4
                assert st.tokens_stored == len(request)
                assert st.prefix_hit_tokens == 64
                owners = {s.seq_id: s.owner for s in obs.sequences()}
                assert owners[ra["seq_id"]] == ra["session"] and owners[rb["seq_id"]] != ra["session"]
                obs.check_integrity()

            n, ql = len(request), len(request) - 64
            for layer in range(SPEC.num_layers):
                k, v = dense_kv(SEED, layer, n, SPEC.num_kv_heads, SPEC.head_dim, SPEC.dtype)
                scale = 1 / np.sqrt(SPEC.head_dim)
                q = query(SEED, layer, 1, NUM_Q_HEADS, SPEC.head_dim, SPEC.dtype)
                ref = attention(q, k, v, scale)
                qm = query(SEED, layer, ql, NUM_Q_HEADS, SPEC.head_dim, SPEC.dtype)
                ref_multi = attention(qm, k, v, scale)
                for key, r in (("local", ref), ("remote", ref), ("local_multi", ref_multi),
                               ("remote_multi", ref_multi)):
                    assert rel_err(rb[key][layer], r) < TOLERANCE["float32"], (key, layer)
        finally:
            done.set()
            join_or_kill((a, b), WAIT)
        assert a.exitcode == 0 and b.exitcode == 0
        with Client(server.endpoint) as obs:
            st = obs.stats()
            assert st.num_sequences == 0 and st.used_blocks == 0
            assert st.cached_blocks >= 4  # the prefix stays matchable until evicted
            obs.check_integrity()
