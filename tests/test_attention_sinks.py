"""Attention sinks (a logit per query head in each softmax denominator, as
GPT-OSS learns them; transformers' ``s_aux``) in the NumPy backend and its
step plans, against the dense float64 reference. The GPU kernels' sinks:
tests/test_gpu_sinks.py; a model with sinks: test_hf_models.py (gpt_oss)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import TOLERANCE, attention, rel_err
from test_attention_window import filled_pool

from kvpager import InvalidArgument, PoolSpec


def reference(dense, seq_ids, layer, q, qlens, scale, window, sinks):
    refs, start = [], 0
    for s, ql in zip(seq_ids, qlens):
        k, v = dense[s][layer]
        refs.append(attention(q[start : start + ql], k, v, scale, window, sinks=sinks))
        start += ql
    return np.concatenate(refs)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sinks_match_reference(dtype):
    rng = np.random.default_rng(len(dtype))
    spec = PoolSpec(2, 2, 32, num_blocks=128, block_size=8, dtype=dtype)
    lengths = [1, 7, 8, 9, 29, 42]
    pool, dense, seqs = filled_pool(spec, lengths, rng)
    scale = 1 / math.sqrt(spec.head_dim)
    heads = 8
    # sinks from far below the scores (no effect) to far above (they take nearly all)
    sinks = np.linspace(-6.0, 6.0, heads).astype(np.float32)
    for qlens in ([1] * len(seqs), [1, 3, 8, 2, 12, 17]):
        plan = pool.plan(seqs, qlens)
        q = rng.standard_normal((sum(qlens), heads, spec.head_dim)).astype(spec.np_dtype)
        for window in (None, 5):
            plain = reference(dense, seqs, 1, q, qlens, scale, window, None)
            ref = reference(dense, seqs, 1, q, qlens, scale, window, sinks)
            assert rel_err(ref, plain) > 0.1  # the sinks change the result
            for given in (sinks, sinks.astype(np.float64), sinks.astype(np.float16)):
                out = plan.attend(1, q, scale, window=window, sinks=given)
                want = ref if given.dtype != np.float16 else \
                    reference(dense, seqs, 1, q, qlens, scale, window, given.astype(np.float32))
                assert rel_err(out, want) < TOLERANCE[dtype]
            # the one-layer convenience and write_attend take them too
            out = pool.attend(1, seqs, q, qlens, scale=scale, window=window, sinks=sinks)
            assert rel_err(out, ref) < TOLERANCE[dtype]


def test_sinks_through_torch_and_write_attend():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    spec = PoolSpec(1, 2, 16, num_blocks=32, block_size=8, dtype="float32")
    pool, dense, seqs = filled_pool(spec, [5, 13], rng)
    k = rng.standard_normal((2, 2, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 16)).astype(np.float32)
    slots = pool.append_flat(seqs)
    plan = pool.plan(seqs, slots=slots)
    for i, s in enumerate(seqs):
        dense[s][0] = (np.concatenate([dense[s][0][0], k[i : i + 1]]), np.concatenate([dense[s][0][1], v[i : i + 1]]))
    q = rng.standard_normal((2, 4, 16)).astype(np.float32)
    sinks = torch.tensor([0.5, -1.0, 2.0, 3.0])
    to = torch.from_numpy
    out = plan.write_attend(0, to(q).transpose(0, 1)[None], to(k).transpose(0, 1)[None], to(v).transpose(0, 1)[None],
                            0.25, sinks=sinks)
    ref = reference(dense, seqs, 0, q, [1, 1], 0.25, None, sinks.numpy())
    assert rel_err(out[0].numpy(), ref) < TOLERANCE["float32"]


@pytest.mark.parametrize("bad", [np.zeros(3, np.float32), np.zeros((8, 1), np.float32), np.zeros(8, np.int32),
                                 "sinks", 1.0, np.full(8, np.nan, np.float32), np.array([np.inf] + [0.0] * 7)])
def test_bad_sinks_are_refused(bad):
    rng = np.random.default_rng(0)
    spec = PoolSpec(1, 2, 16, num_blocks=32, block_size=8, dtype="float32")
    pool, _, seqs = filled_pool(spec, [5, 13], rng)
    q = rng.standard_normal((2, 8, 16)).astype(np.float32)
    with pytest.raises(InvalidArgument, match="sinks"):
        pool.plan(seqs).attend(0, q, sinks=bad)
