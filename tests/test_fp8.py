"""FP8 K/V storage on the NumPy backend: the spec, quantisation on write
(against a quantiser written here from the format's definition), attention
over the dequantised K/V, byte-exact block moves, and typed errors."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from reference import attention, rel_err

from kvpager import InvalidArgument, KVPool, PoolSpec
from kvpager.errors import UnsupportedConfiguration
from kvpager.remote_format import format_id

FORMATS = {"float8_e4m3": (ml_dtypes.float8_e4m3fn, 448.0), "float8_e5m2": (ml_dtypes.float8_e5m2, 57344.0)}
BF16 = np.dtype(ml_dtypes.bfloat16)


def spec(kv_dtype="float8_e4m3", scales=None, dtype="bfloat16", **kw) -> PoolSpec:
    geo = dict(num_layers=2, num_kv_heads=2, head_dim=32, num_blocks=40, block_size=8, dtype=dtype)
    geo.update(kw)
    return PoolSpec(**geo, kv_dtype=kv_dtype, kv_scales=scales)


def random_scales(s: PoolSpec, rng) -> np.ndarray:
    """Scales that keep the tests' K/V (|x| < 10) inside e4m3's range (448 * 0.025 = 11.2)."""
    return rng.uniform(0.025, 0.1, (s.num_layers, 2, s.num_kv_heads)).astype(np.float32)


def quantise_here(x: np.ndarray, scale: np.ndarray, kv_dtype: str) -> np.ndarray:
    """x / scale in float32, clipped to +-max, cast (round to nearest even) by ml_dtypes."""
    fp8, top = FORMATS[kv_dtype]
    y = x.astype(np.float32) / scale.astype(np.float32)
    return np.clip(y, -top, top).astype(fp8)


# -- the spec -----------------------------------------------------------------------------
def test_spec_fields_bytes_and_dict_round_trip():
    s = spec("fp8", scales=np.full((2, 2, 2), 0.5))
    assert s.kv_dtype == "float8_e4m3" and s.is_fp8 and s.itemsize == 1 and s.compute_itemsize == 2
    plain = PoolSpec(2, 2, 32, 40, 8, "bfloat16")
    assert s.bytes_per_block * 2 == plain.bytes_per_block
    assert s.scales.shape == (2, 2, 2) and (s.scales == 0.5).all()
    assert PoolSpec.from_dict(s.to_dict()) == s
    # a pool without FP8 travels exactly as before
    assert "kv_dtype" not in plain.to_dict() and "kv_scales" not in plain.to_dict()
    assert PoolSpec(2, 2, 32, 40, 8, "bfloat16", kv_dtype="bfloat16") == plain
    assert spec("fp8_e5m2").kv_dtype == "float8_e5m2"
    assert (spec().scales == 1).all()  # no scales given: 1.0, as vLLM without checkpoint scales
    sized = PoolSpec.for_memory(10 * s.bytes_per_block, num_layers=2, num_kv_heads=2, head_dim=32,
                                block_size=8, dtype="bfloat16", kv_dtype="fp8")
    assert sized.num_blocks == 10 and sized.is_fp8


@pytest.mark.parametrize("bad", [
    dict(dtype="float32"),                                  # FP8 storage needs 16-bit compute
    dict(kv_dtype="int8"),
    dict(scales=np.ones((2, 2))),                           # wrong shape
    dict(scales=np.ones(7)),
    dict(scales=np.ones((2, 2, 2)) * -1),
    dict(scales=np.zeros((2, 2, 2))),
    dict(scales=np.full((2, 2, 2), np.nan)),
    dict(scales=np.full((2, 2, 2), np.inf)),
    dict(scales=np.full((2, 2, 2), 1e-45)),                 # a float32 subnormal
    dict(scales="abc"),
    dict(scales=[True] + [0.5] * 7),                        # a bool mixed in: taken for 1.0 before
    dict(scales=[[[0.5, 0.5], [0.5, np.bool_(True)]], [[0.5, 0.5], [0.5, 0.5]]]),
])
def test_bad_specs_are_refused(bad):
    args = dict(kv_dtype="float8_e4m3", scales=None, dtype="bfloat16")
    args.update(bad)
    with pytest.raises(InvalidArgument):
        spec(**args)


def test_scales_in_a_tensor_that_requires_grad_are_taken():
    """A calibration's scales still attached to autograd raised a bare RuntimeError."""
    torch = pytest.importorskip("torch")
    scales = torch.full((2, 2, 2), 0.5, requires_grad=True) * 1.0
    assert spec(kv_dtype="float8_e4m3", scales=scales, dtype="bfloat16").kv_scales == (0.5,) * 8


def test_scales_without_fp8_are_refused():
    with pytest.raises(InvalidArgument, match="kv_scales"):
        PoolSpec(2, 2, 32, 40, 8, "bfloat16", kv_scales=[1.0] * 8)


def test_remote_format_names_storage_and_scales():
    a, b = spec(), spec(scales=np.full((2, 2, 2), 0.5))
    plain = PoolSpec(2, 2, 32, 40, 8, "bfloat16")
    ids = {format_id(a), format_id(b), format_id(spec("float8_e5m2")), format_id(plain)}
    assert len(ids) == 4
    assert format_id(a) == format_id(spec())  # the same format, the same key


# -- write: quantisation --------------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype", sorted(FORMATS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_write_quantises_like_the_format(kv_dtype, dtype):
    rng = np.random.default_rng(1)
    s = spec(kv_dtype, dtype=dtype)
    s = s.replace(kv_scales=random_scales(s, rng))
    pool = KVPool(s)
    a = pool.allocate([list(range(20))])[0]
    n = len(a.slots)
    for layer in range(s.num_layers):
        k = (rng.standard_normal((n, 2, 32)) * 3).astype(s.np_dtype)
        v = (rng.standard_normal((n, 2, 32)) * 0.1).astype(s.np_dtype)
        pool.write(layer, a.slots, k, v)
        kc, vc = pool.kv(layer)
        b, o = np.divmod(np.asarray(a.slots), s.block_size)
        assert kc.dtype == np.dtype(FORMATS[kv_dtype][0])
        for got, x, which in ((kc[b, :, o], k, 0), (vc[b, :, o], v, 1)):
            want = quantise_here(x, s.scales[layer, which][None, :, None], kv_dtype)
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("kv_dtype", sorted(FORMATS))
def test_known_values_saturation_and_nan(kv_dtype):
    fp8, top = FORMATS[kv_dtype]
    s = spec(kv_dtype, dtype="float16", head_dim=16, num_kv_heads=1, num_layers=1)
    pool = KVPool(s)
    a = pool.allocate([[1, 2]])[0]
    row = np.zeros(16, np.float32)
    row[:9] = [top, -top, 2 * top, -1e6, np.inf, -np.inf, 1.0, 0.0, np.nan]
    row[9] = 3.0
    with np.errstate(over="ignore"):  # 2 * 57344 and 1e6 are inf in float16: saturated too
        k = np.stack([row, -row])[:, None, :].astype(np.float16)
    pool.write(0, a.slots, k, k)
    kc, _ = pool.kv(0)
    got = kc[a.slots[0] // 8, 0, 0].astype(np.float32)
    assert list(got[:8]) == [top, -top, top, -top, top, -top, 1.0, 0.0]  # saturated, not inf / NaN
    assert np.isnan(got[8])  # NaN is kept as NaN (documented)
    assert got[9] == 3.0
    # 17: halfway between e4m3's 16 and 18, rounds to even (16); nearer e5m2's 16 than 20.
    # 9: exact in e4m3; halfway between e5m2's 8 and 10, rounds to even (8)
    probe = np.array([17.0, 9.0, 0.1], np.float16)
    k2 = np.zeros((2, 1, 16), np.float16)
    k2[0, 0, :3] = probe
    pool.write(0, a.slots, k2, k2)
    got = kc[a.slots[0] // 8, 0, 0, :3]
    np.testing.assert_array_equal(got.view(np.uint8), probe.astype(np.float32).astype(fp8).view(np.uint8))
    assert float(got[0]) == 16.0
    assert float(got[1]) == (9.0 if kv_dtype == "float8_e4m3" else 8.0) and fp8(0.1) == got[2]


# -- attention --------------------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype", sorted(FORMATS))
@pytest.mark.parametrize("group,window,softcap", [(1, None, None), (4, None, 30.0), (2, 7, None)])
def test_attention_over_dequantised_kv(kv_dtype, group, window, softcap):
    rng = np.random.default_rng(2)
    s = spec(kv_dtype)
    s = s.replace(kv_scales=random_scales(s, rng))
    pool = KVPool(s)
    plain = KVPool(PoolSpec(2, 2, 32, 40, 8, "bfloat16"))
    lens = [5, 19, 33]
    seqs = pool.allocate([list(range(100 * i, 100 * i + n)) for i, n in enumerate(lens)])
    pseqs = plain.allocate([list(range(100 * i, 100 * i + n)) for i, n in enumerate(lens)])
    dense = []
    for layer in range(2):
        per = []
        for a, pa, n in zip(seqs, pseqs, lens):
            k = (rng.standard_normal((n, 2, 32)) * 2).astype(BF16)
            v = rng.standard_normal((n, 2, 32)).astype(BF16)
            pool.write(layer, a.slots, k, v)
            plain.write(layer, pa.slots, k, v)
            per.append((k, v))
        dense.append(per)
    ids, pids = [a.seq_id for a in seqs], [a.seq_id for a in pseqs]
    qlens = [1, 3, 4]
    q = rng.standard_normal((sum(qlens), 2 * group, 32)).astype(BF16)
    scale = 1 / np.sqrt(32)
    for layer in range(2):
        out = pool.attend(layer, ids, q, qlens, window=window, softcap=softcap)
        ref8 = plain.attend(layer, pids, q, qlens, window=window, softcap=softcap)
        assert out.dtype == BF16
        start = 0
        for (k, v), ql in zip(dense[layer], qlens):
            ks = s.scales[layer, 0][None, :, None]
            vs = s.scales[layer, 1][None, :, None]
            kd = quantise_here(k, ks, kv_dtype).astype(np.float32) * ks  # dequantised here
            vd = quantise_here(v, vs, kv_dtype).astype(np.float32) * vs
            qs = q[start : start + ql]
            want = attention(qs, kd, vd, scale, window, softcap)
            assert rel_err(out[start : start + ql], want) < 1e-2  # bfloat16 output rounding
            exact = attention(qs, k.astype(np.float32), v.astype(np.float32), scale, window, softcap)
            budget = 0.08 if kv_dtype == "float8_e4m3" else 0.15  # 3 / 2 mantissa bits
            assert rel_err(out[start : start + ql], exact) < budget
            assert rel_err(ref8[start : start + ql], exact) < 1e-2
            start += ql


def test_step_plan_matches_attend():
    rng = np.random.default_rng(3)
    s = spec()
    s = s.replace(kv_scales=random_scales(s, rng))
    pool = KVPool(s)
    a = pool.allocate([list(range(30)), list(range(50, 61))])
    n = sum(len(x.slots) for x in a)
    slots = np.concatenate([x.slots for x in a])
    plan = pool.plan([x.seq_id for x in a], [30, 11], slots)
    k = rng.standard_normal((n, 2, 32)).astype(BF16)
    plan.write(1, k, k)
    q = rng.standard_normal((n, 4, 32)).astype(BF16)
    got = plan.attend(1, q)
    want = pool.attend(1, [x.seq_id for x in a], q, [30, 11])
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


# -- block moves keep the bytes -------------------------------------------------------------
def test_prefix_hits_fork_copy_on_write_and_swap_keep_bytes():
    rng = np.random.default_rng(4)
    s = spec(num_host_blocks=16).replace(kv_scales=random_scales(spec(), rng))
    pool = KVPool(s)
    prompt = list(range(20))  # 2 full blocks + 4 tokens
    a = pool.allocate([prompt])[0]
    for layer in range(2):
        k = rng.standard_normal((20, 2, 32)).astype(BF16)
        pool.write(layer, a.slots, k, k * 2)
    pool.commit(a.seq_id)
    before = pool.backend.kv[list(a.block_table)].copy()
    b = pool.allocate([prompt[:16] + [999]])[0]  # a prefix hit on the two full blocks
    assert b.num_cached_tokens == 16 and b.block_table[:2] == a.block_table[:2]
    child = pool.fork(a.seq_id, 1)[0][0]
    slot = pool.append(child, 1)[0]  # copy-on-write of the shared, partly filled last block
    new_last = pool.sequence(child).block_table[-1]
    assert new_last != a.block_table[-1]
    np.testing.assert_array_equal(pool.backend.kv[new_last].view(np.uint8)[:, :, :, :4],
                                  before[-1].view(np.uint8)[:, :, :, :4])
    pool.write(0, [int(np.ravel(slot)[0])], np.ones((1, 2, 32), BF16), np.ones((1, 2, 32), BF16))
    np.testing.assert_array_equal(pool.backend.kv[list(a.block_table)].view(np.uint8), before.view(np.uint8))
    pool.free([b.seq_id])
    pool.swap_out(child)
    pool.swap_in(child)
    table = pool.sequence(child).block_table
    np.testing.assert_array_equal(pool.backend.kv[list(table[:2])].view(np.uint8), before[:2].view(np.uint8))
    pool.check_integrity()


def test_bad_tensors_are_refused_and_change_nothing():
    pool = KVPool(spec())
    a = pool.allocate([list(range(4))])[0]
    snapshot = pool.backend.kv.copy()
    with pytest.raises(InvalidArgument, match="dtype"):
        pool.write(0, a.slots, np.ones((4, 2, 32), np.float32), np.ones((4, 2, 32), np.float32))
    with pytest.raises(InvalidArgument, match="dtype"):  # K/V in the storage dtype are not taken
        x = np.ones((4, 2, 32), ml_dtypes.float8_e4m3fn)
        pool.write(0, a.slots, x, x)
    with pytest.raises(InvalidArgument):
        pool.attend(0, a.seq_id, np.ones((1, 2, 32), np.float32))
    np.testing.assert_array_equal(pool.backend.kv.view(np.uint8), snapshot.view(np.uint8))


def test_cupy_refuses_fp8_where_unsupported():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError
    except Exception:
        pytest.skip("no CUDA device")
    from kvpager import kernels

    if kernels.compute_capability(0) >= (8, 9):
        pytest.skip("this GPU runs FP8 pools")
    with pytest.raises(UnsupportedConfiguration):
        KVPool(spec(), device="cuda:0")


def test_tensor_parallel_ranks_hold_their_heads_scales():
    """A 2-rank FP8 pool: rank r stores its heads quantised with those heads' scales, byte
    for byte as a one-rank pool of all heads, and attends as it does."""
    rng = np.random.default_rng(11)
    s = spec(num_kv_heads=4)
    s = s.replace(kv_scales=random_scales(s, rng))
    one, tp = KVPool(s), KVPool(s, devices=["cpu", "cpu"])
    assert [np.array_equal(tp.rank(r).spec.scales, s.scales[:, :, 2 * r : 2 * r + 2]) for r in (0, 1)] == [True] * 2
    a, b = one.allocate([list(range(19))])[0], tp.allocate([list(range(19))])[0]
    k = rng.standard_normal((19, 4, 32)).astype(BF16)
    for layer in range(2):
        one.write(layer, a.slots, k, -k)
        for r in (0, 1):
            tp.rank(r).write(layer, b.slots, k[:, 2 * r : 2 * r + 2].copy(), -k[:, 2 * r : 2 * r + 2].copy())
    q = rng.standard_normal((2, 8, 32)).astype(BF16)
    want = one.attend(1, a.seq_id, q, 2)
    for r in (0, 1):
        got = tp.backend.ranks[r].device_array()
        np.testing.assert_array_equal(got.view(np.uint8), one.backend.kv[:, :, :, 2 * r : 2 * r + 2].view(np.uint8))
        out = tp.rank(r).attend(1, b.seq_id, q[:, 4 * r : 4 * r + 4].copy(), 2)
        np.testing.assert_array_equal(out.view(np.uint16), want[:, 4 * r : 4 * r + 4].view(np.uint16))


def test_an_unknown_kv_dtype_is_named_as_kv_dtype():
    """``kv_dtype="int4"`` was refused as "dtype must be one of ...", naming the other argument."""
    with pytest.raises(InvalidArgument, match="kv_dtype must be"):
        spec(kv_dtype="int4", scales=None, dtype="bfloat16")
