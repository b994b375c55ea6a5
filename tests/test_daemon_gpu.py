"""The daemon on a GPU (`kvpager serve --device cuda:0`): workers map its pool
by CUDA IPC, share a system prompt's physical blocks across processes, attend
locally and through the daemon's device staging, and the client's
copy-on-write and swaps match an embedded KVPool on the same GPU.

A process cannot open its own IPC handles, so the daemon is a subprocess and
the workers are spawned; one test runs the daemon in a thread to check the
same-process fallback. Skips without CuPy or a GPU."""

from __future__ import annotations

import multiprocessing as mp
import shutil

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip  # noqa: E402

cupy = cupy_or_skip()

from daemon_gpu_workers import gpu_prefix_reader, gpu_prefix_writer  # noqa: E402
from daemon_helpers import daemon_process, ipc_endpoint, join_or_kill, running_server  # noqa: E402
from daemon_workers import dense_kv, query  # noqa: E402
from reference import TOLERANCE, attention, rel_err  # noqa: E402

from kvpager import KVPool, cuda_ipc  # noqa: E402
from kvpager.client import Client  # noqa: E402
from kvpager.errors import BackendUnavailable, NotOwner  # noqa: E402
from kvpager.spec import PoolSpec  # noqa: E402

pytestmark = pytest.mark.gpu

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=64, block_size=16,
                dtype="float16", num_host_blocks=16)
SERVE = ["--device", "cuda:0", "--layers", "2", "--kv-heads", "2", "--head-dim", "64",
         "--block-size", "16", "--dtype", "float16", "--blocks", "64", "--host-blocks", "16",
         "--heartbeat-timeout", "60"]
NUM_Q_HEADS = 4
SEED = 4321
WAIT = 240  # spawned workers import CuPy (and torch) and compile kernels
TOL = TOLERANCE[SPEC.dtype]


@pytest.fixture(scope="module")
def daemon():
    endpoint, tmp = ipc_endpoint()
    try:
        with daemon_process(SERVE, endpoint, timeout=120) as proc:
            yield endpoint, proc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_hello_exports_the_slab(daemon):
    endpoint, proc = daemon
    with Client(endpoint) as c:
        m = c.memory
        assert c.gpu and c.device == "cuda:0" and c.spec == SPEC
        assert m["kind"] == "cuda_ipc" and len(m["handle"]) == 64 and m["offset"] == 0
        assert m["size"] == SPEC.device_bytes and m["epoch"] == c.epoch
        assert m["device_uuid"] == cuda_ipc.device_uuid(0)
        assert c.server_pid == proc.pid


def test_two_gpu_workers_share_a_prefix(daemon):
    endpoint, _ = daemon
    ctx = mp.get_context("spawn")
    system = list(range(3000, 3064))  # 4 full blocks
    request = system + [5, 6, 7, 8, 9, 10, 11]
    with Client(endpoint) as obs:
        before = obs.stats()
    out_a, out_b, done = ctx.Queue(), ctx.Queue(), ctx.Event()
    a = ctx.Process(target=gpu_prefix_writer, args=(endpoint, system, SEED, out_a, done))
    b = ctx.Process(target=gpu_prefix_reader, args=(endpoint, request, SEED, NUM_Q_HEADS, out_b, done))
    try:
        a.start()
        ra = out_a.get(timeout=WAIT)
        b.start()
        rb = out_b.get(timeout=WAIT)
        assert ra["memory_epoch"] == ra["epoch"]

        # B matched A's committed blocks: the same physical ids, only its tail is new.
        assert rb["cached"] == 64
        assert rb["block_table"][:4] == ra["block_table"]
        assert set(rb["block_table"][4:]).isdisjoint(ra["block_table"])
        assert rb["remote_staging_kind"] == "cuda_ipc"

        with Client(endpoint) as obs:
            st = obs.stats()
            assert st.used_blocks - before.used_blocks == 4 + 1  # the prefix counted once
            assert st.shared_blocks - before.shared_blocks == 4
            assert st.prefix_hit_tokens - before.prefix_hit_tokens == 64
            obs.check_integrity()

        n, ql = len(request), len(request) - 64
        scale = 1 / np.sqrt(SPEC.head_dim)
        for layer in range(SPEC.num_layers):
            k, v = dense_kv(SEED, layer, n, SPEC.num_kv_heads, SPEC.head_dim, SPEC.dtype)
            # What A wrote in its process is what B reads through its own mapping.
            np.testing.assert_array_equal(rb["k"][layer], k)
            np.testing.assert_array_equal(rb["v"][layer], v)
            if rb["torch"]:
                assert rb["torch_same_memory"][layer]
                np.testing.assert_array_equal(rb["torch_k"][layer], k)
            ref = attention(query(SEED, layer, 1, NUM_Q_HEADS, SPEC.head_dim, SPEC.dtype), k, v, scale)
            ref_multi = attention(query(SEED, layer, ql, NUM_Q_HEADS, SPEC.head_dim, SPEC.dtype), k, v, scale)
            for key, r in (("local", ref), ("remote", ref), ("local_multi", ref_multi),
                           ("remote_multi", ref_multi)):
                assert rel_err(rb[key][layer], r) < TOL, (key, layer)
    finally:
        done.set()
        join_or_kill((a, b), WAIT)
    assert a.exitcode == 0 and b.exitcode == 0
    with Client(endpoint) as obs:
        st = obs.stats()
        assert st.num_sequences == before.num_sequences and st.used_blocks == before.used_blocks
        assert st.cached_blocks >= 4  # the prefix stays matchable until evicted
        obs.check_integrity()


def _script(target, kv_of, spec=SPEC):
    """Allocate 2.5 blocks, fork two children, append one token to each
    (copy-on-write of the shared partial block), write different K/V into
    them, swap one child out and in. Returns each sequence's dense K/V and
    decode attention per layer."""
    rng = np.random.default_rng(5)
    prompt = list(range(7000, 7040))
    [a] = target.allocate([prompt], salt="cow")
    for layer in range(spec.num_layers):
        k, v = rng.standard_normal((2, 40, spec.num_kv_heads, spec.head_dim)).astype(spec.dtype)
        target.write(layer, a.slots, cupy.asarray(k), cupy.asarray(v))
    target.commit(a.seq_id)
    [kids] = target.fork(a.seq_id, 2)
    slots = target.append(kids, 1)
    for kid_slots in slots:
        for layer in range(spec.num_layers):
            k, v = rng.standard_normal((2, 1, spec.num_kv_heads, spec.head_dim)).astype(spec.dtype)
            target.write(layer, kid_slots, cupy.asarray(k), cupy.asarray(v))
    target.synchronize()
    seqs = [a.seq_id, *kids]
    tables = {s: target.sequence(s).block_table for s in seqs}
    # The children share the two full blocks and each got its own copy of the third.
    assert all(tables[kid][:2] == tables[a.seq_id][:2] for kid in kids)
    assert len({tables[s][2] for s in seqs}) == 3
    target.swap_out([kids[0]])
    target.swap_in([kids[0]])
    tables = {s: target.sequence(s).block_table for s in seqs}
    q = cupy.asarray(rng.standard_normal((3, NUM_Q_HEADS, spec.head_dim)).astype(spec.dtype))
    out = {"attn": [cupy.asnumpy(target.attend(layer, seqs, q)) for layer in range(spec.num_layers)]}
    for j, s in enumerate(seqs):
        n = target.sequence(s).num_tokens
        for layer in range(spec.num_layers):
            for i, view in enumerate(kv_of(layer)):
                g = view[cupy.asarray(np.asarray(tables[s], np.int64))]
                out[(j, layer, i)] = cupy.asnumpy(
                    g.transpose(0, 2, 1, 3).reshape(-1, spec.num_kv_heads, spec.head_dim)[:n])
    target.free(seqs)
    return out


def assert_same_results(got, want):
    """The same K/V bytes per sequence and layer, attention within tolerance."""
    assert got.keys() == want.keys()
    for key in want:
        if key == "attn":
            for g, w in zip(got[key], want[key]):
                assert rel_err(g, w.astype(np.float64)) < TOL
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))


def test_fork_append_copy_on_write_matches_embedded(daemon):
    endpoint, _ = daemon
    with KVPool(SPEC, device="cuda:0") as pool:
        want = _script(pool, pool.kv)
    with Client(endpoint) as c:
        got = _script(c, c.kv)
        c.check_integrity()
    assert_same_results(got, want)


@pytest.fixture(scope="module")
def fp8_daemon():
    endpoint, tmp = ipc_endpoint()
    try:
        with daemon_process([*SERVE, "--kv-dtype", "float8_e4m3"], endpoint, timeout=120) as proc:
            yield endpoint, proc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_fp8_pool_over_ipc_matches_embedded(fp8_daemon):
    """An FP8 daemon pool mapped by CUDA IPC: the client's writes quantise to the
    same bytes as an embedded FP8 pool's on the same GPU; copy-on-write, swaps
    and attention the same."""
    endpoint, _ = fp8_daemon
    fp8 = SPEC.replace(kv_dtype="float8_e4m3")
    with KVPool(fp8, device="cuda:0") as pool:
        want = _script(pool, pool.kv, fp8)
    with Client(endpoint) as c:
        assert c.spec == fp8 and c.memory["size"] == fp8.device_bytes
        got = _script(c, c.kv, fp8)
        c.check_integrity()
    assert_same_results(got, want)


def test_wrong_gpu_is_a_clear_error(daemon, monkeypatch):
    endpoint, _ = daemon
    fake = "GPU-00000000-0000-0000-0000-000000000000"
    real = cuda_ipc.device_uuid(0)
    with Client(endpoint) as c:
        c.memory["device_uuid"] = fake  # as a daemon on a GPU this process cannot see reports it
        with pytest.raises(BackendUnavailable, match=fake) as e:
            c.kv(0)
        assert real in str(e.value)
        q = np.zeros((1, NUM_Q_HEADS, SPEC.head_dim), SPEC.dtype)
        with pytest.raises(BackendUnavailable, match=fake):
            c.remote_attend(0, [], q[:0])
    monkeypatch.setattr(cuda_ipc, "device_uuid", lambda index: fake)  # this process sees another GPU
    with Client(endpoint) as c:
        with pytest.raises(BackendUnavailable, match=fake) as e:
            c.kv(0)
        assert real in str(e.value)


def test_daemon_in_this_process_uses_its_pointers():
    """CUDA IPC cannot open a handle in its own process: a client there uses
    the daemon's pointers (pool and device staging) directly."""
    rng = np.random.default_rng(9)
    with running_server(SPEC, device="cuda:0", heartbeat_timeout=60) as server, \
            Client(server.endpoint) as c:
        assert c._same_process() and c.gpu
        prompt = list(range(40))
        [a] = c.allocate([prompt])
        k, v = rng.standard_normal((2, 40, SPEC.num_kv_heads, SPEC.head_dim)).astype(SPEC.dtype)
        for layer in range(SPEC.num_layers):
            c.write(layer, a.slots, k, v)  # NumPy in, copied to the device
        c.commit(a.seq_id)
        q = rng.standard_normal((3, NUM_Q_HEADS, SPEC.head_dim)).astype(SPEC.dtype)
        ref = attention(q, k, v, 1 / np.sqrt(SPEC.head_dim))
        for layer in range(SPEC.num_layers):
            assert rel_err(cupy.asnumpy(c.local_attend(layer, [a.seq_id], q, [3])), ref) < TOL
            assert rel_err(cupy.asnumpy(c.remote_attend(layer, [a.seq_id], q, [3])), ref) < TOL
        assert c._staging.kind == "cuda_ipc"
        # a committed full block is published, so immutable; the partly filled last block is ours
        with pytest.raises(NotOwner):
            c.remote_write(0, a.slots[:1], k[:1] * 0, v[:1] * 0)
        c.remote_write(0, a.slots[-1:], k[:1] * 0, v[:1] * 0)
        kview, _ = c.kv(0)
        assert not cupy.asnumpy(kview[a.block_table[2], :, 39 % 16]).any()
        assert cupy.asnumpy(kview[a.block_table[0], :, 0]).any()  # the refused write changed nothing
        assert c.stats().used_blocks == 3
