"""The NumPy backend's step plan makes what every layer of a step shares once
(the write's positions, the kernel's arguments, the query tokens) and checks a
`write_attend` once: each layer still writes token by token what it was given
and attends as the twin (`numpy_backend.paged_attention`) does over the pool,
with its own window, softcap and sinks; writes in runs, padding slots, a kernel
gone after the first layer; a refused call writes nothing."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvpager import (  # noqa: E402
    InvalidArgument,
    KVPool,
    PoolSpec,
    cpu_attention,  # noqa: E402
)
from kvpager.backends import numpy_backend  # noqa: E402

SPEC = PoolSpec(num_layers=3, num_kv_heads=2, head_dim=16, num_blocks=64, block_size=8, dtype="float32")
HEADS = 6  # GQA: three query heads a K/V head
#: each layer its own options: what a plan made once must not fix
LAYERS = [dict(window=None, softcap=None, sinks=None), dict(window=5, softcap=None, sinks=None),
          dict(window=None, softcap=4.0, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -0.5]))]


def _step(qlens: list[int]):
    """A pool with ragged sequences and a step of ``qlens`` new tokens each; its plan,
    its slots (flat), its ids."""
    pool = KVPool(SPEC)
    rng = np.random.default_rng(len(qlens))
    prompts = [rng.integers(0, 500, n).tolist() for n in (3, 17, 30, 8)[:len(qlens)]]
    ids = [a.seq_id for a in pool.allocate(prompts)]
    for layer in range(SPEC.num_layers):  # the prompts' K/V
        tables, lens = pool.tables(ids)
        for b, n in zip(tables, lens):
            slots = (b[np.arange(n) // SPEC.block_size].astype(np.int64) * SPEC.block_size
                     + np.arange(n) % SPEC.block_size)
            pool.write(layer, slots, *(rng.standard_normal((n, 2, 16)).astype(np.float32) for _ in range(2)))
    slots = pool.append_flat(ids, qlens)
    return pool, ids, slots


def _heads_first(x: np.ndarray) -> torch.Tensor:
    """[tokens, heads, dim] as a model's [1, heads, tokens, dim] view of token-major memory."""
    return torch.from_numpy(x)[None].transpose(1, 2)


@pytest.mark.parametrize("run_tokens", [None, 2])
@pytest.mark.parametrize("qlens", [[1, 1, 1, 1], [3, 1, 6]])
def test_each_layer_writes_what_it_was_given_and_attends_as_the_twin(monkeypatch, qlens, run_tokens):
    if run_tokens is not None:  # the plan's writes in runs of two tokens
        monkeypatch.setattr(numpy_backend, "WRITE_RUN_BYTES", run_tokens * 2 * 16 * 4)
    pool, ids, slots = _step(qlens)
    slots = slots.copy()
    slots[1] = -1  # a padding token: neither stored nor read
    plan = pool.plan(ids, qlens, slots)
    rng = np.random.default_rng(7)
    n = len(slots)
    for layer, options in enumerate(LAYERS):
        q = rng.standard_normal((n, HEADS, 16)).astype(np.float32)
        k, v = (rng.standard_normal((n, 2, 16)).astype(np.float32) for _ in range(2))
        kc, vc = (np.array(x) for x in pool.kv(layer))
        for s, kt, vt in zip(slots.tolist(), k, v):  # the write, token by token
            if s >= 0:
                kc[s // SPEC.block_size, :, s % SPEC.block_size] = kt
                vc[s // SPEC.block_size, :, s % SPEC.block_size] = vt
        out = plan.write_attend(layer, _heads_first(q), _heads_first(k), _heads_first(v), 0.3, **options)
        np.testing.assert_array_equal(pool.kv(layer)[0], kc)
        np.testing.assert_array_equal(pool.kv(layer)[1], vc)
        sinks = None if options["sinks"] is None else options["sinks"].numpy()
        want = numpy_backend.paged_attention(pool.backend.kv, layer, q, plan.tables, plan.seq_lens, plan.query_lens,
                                             0.3, window=options["window"], softcap=options["softcap"], sinks=sinks)
        assert isinstance(out, torch.Tensor) and out.shape == (1, n, HEADS, 16)
        np.testing.assert_allclose(out[0].numpy(), want, rtol=2e-5, atol=2e-5)
        # the same layer through `attend` alone: the arguments the plan keeps, the same answer
        np.testing.assert_allclose(plan.attend(layer, q, 0.3, **options | {"sinks": sinks}), want,
                                   rtol=2e-5, atol=2e-5)


def test_a_kernel_gone_after_the_first_layer_leaves_the_twin(monkeypatch):
    pool, ids, slots = _step([2, 1])
    plan = pool.plan(ids, [2, 1], slots)
    rng = np.random.default_rng(3)
    outs = []
    for layer in range(2):
        if layer == 1:
            monkeypatch.setattr(cpu_attention, "KERNEL", None)
        q = rng.standard_normal((3, HEADS, 16)).astype(np.float32)
        plan.write(layer, *(rng.standard_normal((3, 2, 16)).astype(np.float32) for _ in range(2)))
        outs.append((plan.attend(layer, q, 0.25), numpy_backend.paged_attention(
            pool.backend.kv, layer, q, plan.tables, plan.seq_lens, plan.query_lens, 0.25)))
    for got, want in outs:
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bad", ["k_shape", "v_dtype", "q_dtype", "q_heads", "sinks", "scale", "window", "layer"])
def test_a_refused_write_attend_writes_nothing(bad):
    pool, ids, slots = _step([1, 1, 1])
    plan = pool.plan(ids, 1, slots)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, HEADS, 16)).astype(np.float32)
    k, v = (rng.standard_normal((3, 2, 16)).astype(np.float32) for _ in range(2))
    args = dict(q=_heads_first(q), k=_heads_first(k), v=_heads_first(v))
    kw, layer = {}, 0
    if bad == "k_shape":
        args["k"] = args["k"][:, :, :2]
    elif bad == "v_dtype":
        args["v"] = args["v"].double()
    elif bad == "q_dtype":
        args["q"] = args["q"].half()
    elif bad == "q_heads":
        args["q"] = args["q"][:, :5]
    elif bad == "sinks":
        kw["sinks"] = torch.zeros(HEADS + 1)
    elif bad == "scale":
        kw["scale"] = float("nan")
    elif bad == "window":
        kw["window"] = 0
    else:
        layer = SPEC.num_layers
    before = np.array(pool.backend.kv)
    with pytest.raises(InvalidArgument):
        plan.write_attend(layer, args["q"], args["k"], args["v"], **kw)
    np.testing.assert_array_equal(pool.backend.kv, before)


def test_write_attend_reads_q_after_its_write():
    """`write_attend` writes, then attends q: a q that is a view of the pool's own
    memory (here the very block the call writes) is read as the write left it,
    as `write` then `attend` read it (a plan that checked q once read it first)."""
    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=16, num_blocks=8, block_size=8, dtype="float32")
    pool = KVPool(spec)
    [a] = pool.allocate([list(range(8))])
    plan = pool.plan([a.seq_id], [8], a.slots)
    block = int(a.slots[0]) // 8
    rng = np.random.default_rng(0)
    pool.backend.kv[block, 0, 0] = rng.standard_normal((2, 8, 16))
    q = torch.from_numpy(pool.backend.kv)[block, 0, 0][None]  # [1, 2, 8, 16]: the block's K itself
    k = torch.from_numpy(rng.standard_normal((1, 2, 8, 16)).astype(np.float32))
    out = plan.write_attend(0, q, k, k)
    want = numpy_backend.paged_attention(pool.backend.kv, 0, k[0].transpose(0, 1).numpy(), plan.tables,
                                         plan.seq_lens, plan.query_lens, 16 ** -0.5)
    np.testing.assert_allclose(out[0].numpy(), want, rtol=2e-5, atol=2e-5)
