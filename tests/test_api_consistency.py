"""Four inconsistencies an API audit found, each refused or fixed the same way
wherever the API takes it: `KVPool.attend` (and a rank's) answers a torch q
with a torch tensor as step plans do, and the CPU pool takes torch bfloat16 K/V
as plans do; `Client(rank=)` takes a NumPy integer as kvpager takes one for an
int; `Client`'s name, endpoint and tokens are refused when of another type
(they fell back to the defaults when falsy) before any connection; a closed
pool refuses every op on sequences, pins, quotas and K/V with one typed error
on either backend, nothing changed, while inspection answers.
Each test once failed."""

from __future__ import annotations

import os
import socket
from typing import Any

import numpy as np
import pytest
from daemon_helpers import SMALL, running_server
from pool_helpers import snapshot

from kvpager import InvalidArgument, KVPool, PoolSpec
from kvpager.client import Client

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=32, num_blocks=32, block_size=8, num_host_blocks=8,
                dtype="float32")
D = SPEC.head_dim


def _filled(pool: KVPool, torch: Any, dtype: Any) -> tuple[int, np.ndarray]:
    """A sequence of 6 tokens whose K/V of layer 1 is written with torch tensors on the pool's device."""
    [a] = pool.allocate([list(range(6))])
    k, v = (torch.randn(6, pool.spec.num_kv_heads, D).to(pool.device, dtype) for _ in "kv")
    pool.write(1, a.slots, k, v)
    return a.seq_id, a.slots


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_attend_answers_torch_with_torch(dtype):
    """`KVPool.attend` gave a NumPy array for a torch q (a plan gives torch), and
    the CPU pool's `write` / `attend` refused torch bfloat16 (a plan takes it)."""
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, dtype)
    for pool in (KVPool(SPEC.replace(dtype=dtype)), KVPool(SPEC.replace(dtype=dtype), devices=["cpu", "cpu"])):
        views = [pool, pool.rank(0)] if pool.ranks == 1 else [pool.rank(r) for r in range(pool.ranks)]
        [a] = pool.allocate([list(range(6))])
        for view in views:
            heads = view.spec.num_kv_heads
            k = torch.randn(6, heads, D).to(tdt)
            view.write(1, a.slots, k, 2 * k)
            q = torch.randn(2, 2 * heads, D).to(tdt)
            out = view.attend(1, [a.seq_id], q, 2)
            assert type(out) is torch.Tensor and out.dtype == tdt and out.shape == q.shape
            ref = view.plan([a.seq_id], 2).attend(1, q)
            assert torch.equal(out, ref)
            if dtype != "bfloat16":  # NumPy in, NumPy out
                out_np = view.attend(1, [a.seq_id], q.numpy(), 2)
                assert isinstance(out_np, np.ndarray) and np.array_equal(out_np, ref.numpy())


def test_attend_torch_refusals_change_nothing():
    """A torch tensor of another dtype or the wrong shape is refused by name, nothing written."""
    torch = pytest.importorskip("torch")
    pool = KVPool(SPEC)
    seq, slots = _filled(pool, torch, torch.float32)
    before = pool.backend.kv.copy()
    for bad, what in ((torch.zeros(6, 2, D, dtype=torch.float64), "k must have dtype float32"),
                      (torch.zeros(5, 2, D), rf"k must have shape \(6, 2, {D}\)")):
        with pytest.raises(InvalidArgument, match=what):
            pool.write(0, slots, bad, torch.zeros(6, 2, D))
    with pytest.raises(InvalidArgument, match="q must have dtype float32"):
        pool.attend(1, [seq], torch.zeros(1, 2, D, dtype=torch.float16))
    assert np.array_equal(pool.backend.kv, before)


@pytest.mark.gpu
def test_gpu_attend_answers_torch_with_torch():
    """On a GPU pool too: a torch CUDA q gets a torch tensor (it got a CuPy array), equal to the plan's."""
    from gpu_helpers import cupy_torch_or_skip

    cupy, torch = cupy_torch_or_skip()
    pool = KVPool(SPEC.replace(dtype="bfloat16"), device="cuda:0")
    seq, _ = _filled(pool, torch, torch.bfloat16)
    q = torch.randn(1, 4, D, device="cuda").to(torch.bfloat16)
    out = pool.attend(1, [seq], q)
    assert type(out) is torch.Tensor and out.is_cuda and out.dtype == torch.bfloat16
    assert torch.equal(out, pool.plan([seq]).attend(1, q))
    assert isinstance(pool.attend(1, [seq], cupy.from_dlpack(q)), cupy.ndarray)  # CuPy in, CuPy out
    pool.close()


def _dead(tmp_path: Any) -> str:
    """An endpoint nothing listens at: a check made after connecting would raise DaemonUnavailable."""
    return f"ipc://{tmp_path}/none.sock"


def test_client_rank_takes_numpy_integers(tmp_path):
    """`Client(rank=np.int64(0))` was refused where 0 is taken; it goes on the wire as an int."""
    with running_server(SMALL) as server:
        for rank in (0, np.int64(0), np.uint8(0)):
            with Client(server.endpoint, rank=rank) as c:
                assert c.rank == 0 and type(c._hello_args["rank"]) is int
    dead = _dead(tmp_path)
    for bad in (True, np.bool_(False), -1, np.int64(-1), 0.0, np.float32(0), "0", [0]):
        with pytest.raises(InvalidArgument, match="rank must be an int >= 0"):
            Client(dead, rank=bad)


def test_client_text_arguments_are_strings(tmp_path):
    """A falsy non-str name (``{}``, ``0``) fell back to the default name, a falsy
    endpoint to the default endpoint, a falsy token to none: each is refused by
    name, before any connection. A str name is the session's client name."""
    dead = _dead(tmp_path)
    for arg in ("name", "token", "control_token"):
        for bad in ({}, 0, b"", [], b"worker", 7):
            with pytest.raises(InvalidArgument, match=f"^{arg} must be a str"):
                Client(dead, **{arg: bad})
    for bad in ("", {}, 0, b"ipc:///tmp/x"):
        with pytest.raises(InvalidArgument, match="endpoint"):
            Client(bad)
    with running_server(SMALL) as server:
        for name, shown in (("worker-1", "worker-1"), (None, f"{socket.gethostname()}:{os.getpid()}")):
            with Client(server.endpoint, name=name) as c:
                [s] = [s for s in server.sessions.sessions.values() if s.name == c.session_name]
                assert s.client == shown


K = np.zeros((1, 2, D), np.float32)
#: Every op a closed pool refuses, with arguments it takes while open.
CLOSED_OPS = [
    ("allocate", lambda p, s: p.allocate([[1, 2, 3]])),
    ("cached_tokens", lambda p, s: p.cached_tokens([[1, 2, 3]])),
    ("probe_cache", lambda p, s: p.probe_cache([[1, 2, 3]])),
    ("append", lambda p, s: p.append([s], 1)),
    ("append_flat", lambda p, s: p.append_flat([s], 1)),
    ("record_tokens", lambda p, s: p.record_tokens([s], [[9]])),
    ("commit", lambda p, s: p.commit([s])),
    ("fork", lambda p, s: p.fork([s])),
    ("free", lambda p, s: p.free([s])),
    ("truncate", lambda p, s: p.truncate([s], 1)),
    ("swap_out", lambda p, s: p.swap_out([s])),
    ("swap_in", lambda p, s: p.swap_in([s])),
    ("release_before", lambda p, s: p.release_before([s], 4)),
    ("batch", lambda p, s: p.batch([("free", [s])])),
    ("pin", lambda p, s: p.pin([[1, 2, 3, 4]])),
    ("unpin", lambda p, s: p.unpin([[1, 2, 3, 4]])),
    ("release_pins", lambda p, s: p.release_pins("me")),
    ("set_quota", lambda p, s: p.set_quota("tenant", 4)),
    ("write", lambda p, s: p.write(0, [8], K, K)),
    ("attend", lambda p, s: p.attend(0, [s], K)),
    ("tables", lambda p, s: p.tables([s])),
    ("plan", lambda p, s: p.plan([s])),
    ("kv", lambda p, s: p.kv(0)),
    ("rank", lambda p, s: p.rank(0)),
]
#: The ops of a rank view (`KVPool.rank`), refused once its pool is closed.
RANK_OPS = [(name, op) for name, op in CLOSED_OPS if name in ("write", "attend", "tables", "plan", "kv")]


def _check_closed(device: str) -> None:
    pool = KVPool(SPEC, device=device)
    [a] = pool.allocate([list(range(6))])
    pool.commit(a.seq_id)
    view = pool.rank(0)
    plan = pool.plan([a.seq_id], [1], pool.append([a.seq_id], 1)[0])  # made before the close
    before = snapshot(pool)
    pool.close()
    pool.close()  # harmless
    for name, op in CLOSED_OPS:
        with pytest.raises(InvalidArgument, match=f"^{name}: this KVPool is closed"):
            op(pool, a.seq_id)
    for name, op in RANK_OPS:  # a rank view made before the close
        with pytest.raises(InvalidArgument, match=f"^{name}: this KVPool is closed"):
            op(view, a.seq_id)
    for call in (lambda: plan.write(0, K, K), lambda: plan.attend(0, K), lambda: plan.write_attend(0, *[K.reshape(1, 2, 1, D)] * 3)):
        with pytest.raises(InvalidArgument, match="this plan's pool is closed"):  # it would launch on freed memory
            call()
    assert snapshot(pool) == before  # nothing changed, and inspection answers
    assert pool.sequence(a.seq_id).num_tokens == 7 and pool.owned(None) == [a.seq_id]
    assert pool.counters().cow_blocks == 0 and pool.pins() == []
    pool.check_integrity()
    pool.synchronize()
    assert pool.closed
    with pool:  # closed again on exit: still harmless
        pass


def test_closed_pool_refuses_its_ops():
    """A closed CPU pool went on allocating, writing and attending (a GPU pool
    refused only the ops that reach its freed storage, and its swap_out moved
    the tables before it refused)."""
    _check_closed("cpu")


@pytest.mark.gpu
def test_closed_gpu_pool_refuses_its_ops():
    """A closed GPU pool refuses the same ops with the same error."""
    from gpu_helpers import cupy_or_skip

    cupy_or_skip()
    _check_closed("cuda:0")
