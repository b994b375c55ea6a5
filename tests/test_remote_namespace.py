"""The remote tier's namespace: the model a store's blocks belong to.

Two models of one geometry (a model and its fine-tune, two presets of one
shape) compute different K/V for the same tokens. Their daemons, sharing a
store under the same salt, found each other's blocks and restored them: the
second model generated from the first one's K/V. With a namespace each
(``RemoteTier(namespace=)``, ``kvpager serve --remote-namespace``) neither
finds the other's; daemons of one namespace share as before, and a tier
without one keeps the keys it always had. A real redis-server each."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from daemon_helpers import ipc_endpoint
from redis_helpers import need_cli, need_redis, redis_server

need_redis()
pytest.importorskip("redis")

from kvpager import InvalidArgument, KVPool, PoolSpec  # noqa: E402
from kvpager.client import Client  # noqa: E402
from kvpager.remote_format import MAX_NAMESPACE, key_prefix  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=48, block_size=16, dtype="float32")
BS = SPEC.block_size
WAIT = 20.0
PROMPT = list(range(500, 500 + 3 * BS + 1))


def pool(url: str, namespace: str | None) -> KVPool:
    return KVPool(SPEC, remote=RemoteTier(url, namespace=namespace, retry_after=0.2))


def prefill(p: KVPool, seed: int) -> np.ndarray:
    """PROMPT allocated, its K/V random, committed, flushed to the store: its full blocks' K/V."""
    [a] = p.allocate([PROMPT])
    blocks = np.asarray(a.block_table[: len(PROMPT) // BS])
    kv = p.backend.device_array()
    kv[blocks] = np.random.default_rng(seed).standard_normal(kv[blocks].shape)
    p.commit(a.seq_id)
    assert p.remote.flush(WAIT)
    out = kv[blocks].copy()
    p.free(a.seq_id)
    return out


def restored(p: KVPool) -> tuple[int, np.ndarray]:
    [a] = p.allocate([PROMPT])
    out = p.backend.device_array()[np.asarray(a.block_table[: len(PROMPT) // BS])].copy()
    p.free(a.seq_id)
    return a.num_remote_tokens, out


def test_models_of_one_geometry_restore_only_their_own_namespace():
    with redis_server() as store:
        base, tuned, base_again = pool(store.url, "base"), pool(store.url, "tuned"), pool(store.url, "base")
        try:
            mine = prefill(base, 1)
            n, _ = restored(tuned)
            assert n == 0  # the fine-tune never restores the base model's K/V
            theirs = prefill(tuned, 2)
            n, got = restored(base_again)
            assert n == 3 * BS
            np.testing.assert_array_equal(got, mine)  # its own namespace's bytes, not the fine-tune's
            assert not np.array_equal(mine, theirs)
            import redis

            keys = sorted(k.decode() for k in redis.Redis(port=store.port).keys("*"))
            assert len(keys) == 6 and all(k.startswith(key_prefix(SPEC)) for k in keys)
            assert {k.split(":")[3] for k in keys} == {base.remote._prefix.split(":")[3],
                                                       tuned.remote._prefix.split(":")[3]}
        finally:
            for p in (base, tuned, base_again):
                p.close()


def test_values_copied_under_another_namespaces_keys_are_refused():
    """A tool that copies one model's values under another's keys (a migration,
    a rename of the namespace): the header and checksum bound a value to its
    block key alone, so the other model restored them as its own K/V. Each
    checksum covers its key's prefix now: refused, counted, not restored."""
    import redis

    with redis_server() as store:
        a, b = pool(store.url, "model-a"), pool(store.url, "model-b")
        try:
            prefill(a, 1)
            r = redis.Redis(port=store.port)
            pa, pb = a.remote._prefix, b.remote._prefix
            keys = [k.decode() for k in r.keys(pa + "*")]
            assert len(keys) == 3
            for k in keys:
                r.copy(k, pb + k[len(pa):])
            n, _ = restored(b)
            assert n == 0 and b.remote_stats().corrupt_blocks == 3
            b.check_integrity()
        finally:
            a.close()
            b.close()


def test_without_a_namespace_the_keys_are_as_before_and_shared():
    """No namespace: the keys a store already holds (``kvpager:v1:<format>:<salt>:<key>``)
    are found as before, by every daemon of the geometry."""
    with redis_server() as store:
        a, b = pool(store.url, None), pool(store.url, None)
        try:
            mine = prefill(a, 3)
            n, got = restored(b)
            assert n == 3 * BS
            np.testing.assert_array_equal(got, mine)
            import redis

            for k in redis.Redis(port=store.port).keys("*"):
                rest = k.decode().removeprefix(key_prefix(SPEC)).split(":")
                assert len(rest) == 2 and len(rest[0]) == 16  # <salt>:<block key>, no namespace part
        finally:
            a.close()
            b.close()


@pytest.mark.parametrize("bad", ["", "x" * (MAX_NAMESPACE + 1), "a\nb", "\x00", 7, b"model"])
def test_a_namespace_is_printable_text(bad):
    with redis_server() as store, pytest.raises(InvalidArgument, match="namespace"):
        RemoteTier(store.url, namespace=bad)


SERVE = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32", "--blocks", "48",
         "--device", "cpu", "--heartbeat-timeout", "30"]


def test_serve_names_its_namespace_and_warns_without_one():
    """``kvpager serve --remote`` without a namespace warns (at start, once) that
    daemons of other models of the shape would share its blocks; with one, hello
    tells clients the namespace; ``--remote-namespace`` alone is a usage error."""
    need_cli()
    with redis_server() as store:
        for namespace in (None, "meta-llama/Llama-3.1-8B-Instruct"):
            endpoint, tmp = ipc_endpoint()
            args = [sys.executable, "-m", "kvpager", "serve", *SERVE, "--endpoint", endpoint, "--remote", store.url]
            if namespace is not None:
                args += ["--remote-namespace", namespace]
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                deadline = time.monotonic() + WAIT
                while True:
                    assert proc.poll() is None and time.monotonic() < deadline, "the daemon did not serve"
                    try:
                        with Client(endpoint, timeout=1, heartbeat=False) as c:
                            assert c.remote is not None and c.remote.get("namespace") == namespace
                        break
                    except Exception:
                        time.sleep(0.1)
            finally:
                proc.terminate()
                out, _ = proc.communicate(timeout=WAIT)
                shutil.rmtree(tmp, ignore_errors=True)
            warned = "no --remote-namespace" in out
            assert warned == (namespace is None), out
        endpoint, tmp = ipc_endpoint()
        try:
            done = subprocess.run([sys.executable, "-m", "kvpager", "serve", *SERVE, "--endpoint", endpoint,
                                   "--remote-namespace", "m"], capture_output=True, text=True, timeout=WAIT)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        assert done.returncode == 2 and "--remote-namespace needs --remote" in done.stderr


def test_a_tier_logs_its_namespace(caplog):
    with redis_server() as store, caplog.at_level(logging.INFO, logger="kvpager.remote"):
        tier = RemoteTier(store.url, namespace="base")
        try:
            assert tier.describe()["namespace"] == "base"
        finally:
            tier.close()
