"""Careless callers of the embedded API: an owner that cannot be one, a plan's
write_attend refused after its write, uint64 slots past int64, one sequence
looked up by a bool or a 0-d array, a read-only ``out``, a memory budget that
is no number of bytes, a NaN owner, a pool too large for the host (the
transformers side: `test_careless_embedded_hf.py`). Each was answered wrongly
before (blocks leaked, K/V written by a refused call, a write skipped as
padding, another error type, a false integrity failure); each is now a typed
error with nothing changed, or the right answer. NumPy backend, small pools."""

from __future__ import annotations

import numpy as np
import pytest
from pool_helpers import BS, fill, make_pool, snapshot

from kvpager import InvalidArgument, PoolSpec
from kvpager.plan import make_plan


def _setup(p):
    a, b = p.allocate([list(range(BS + 4)), list(range(100, 105))])
    p.commit(a.seq_id)
    fill(p, np.concatenate([a.slots, b.slots]), 1)
    return a.seq_id, b.seq_id


# -- owners that cannot be owners --------------------------------------------------------


_UNHASHABLE = [
    pytest.param(lambda p: p.allocate([[1, 2, 3]], owner=[1]), id="allocate one prompt"),
    pytest.param(lambda p: p.allocate([list(range(3 * BS))], owner={}), id="allocate one long prompt"),
    pytest.param(lambda p: p.allocate([[1], [2]], owner=np.array([1])), id="allocate batch"),
    pytest.param(lambda p: p.allocate([list(range(BS + 4)), [2]], owner=[1], share_in_batch=True),
                 id="allocate share_in_batch with a hit"),
    pytest.param(lambda p: p.pin([list(range(BS + 4))], owner=[1]), id="pin"),
    pytest.param(lambda p: p.unpin([list(range(BS + 4))], owner=[1]), id="unpin"),
    pytest.param(lambda p: p.pins([1]), id="pins"),
    pytest.param(lambda p: p.release_pins({}), id="release_pins"),
]


@pytest.mark.parametrize("call", _UNHASHABLE)
def test_an_unhashable_owner_is_refused_before_anything_is_taken(call):
    """A list or an array as ``owner``: allocate took the blocks, then failed to
    index the owner (TypeError) and left them held by no sequence; pin counted its
    references and recorded no pin (the integrity check failed after either)."""
    pool = make_pool()
    _setup(pool)
    pool.pin([list(range(BS + 4))])
    before = snapshot(pool), pool.pins()
    with pytest.raises(InvalidArgument, match="owner must be a hashable name"):
        call(pool)
    assert (snapshot(pool), pool.pins()) == before
    pool.check_integrity()


def test_a_nan_owner_passes_the_integrity_check():
    """A float NaN is hashable and was taken as an owner, but the integrity check
    compared owners with ``!=`` (NaN != NaN) and reported a pool that was sound."""
    pool = make_pool()
    nan = float("nan")
    [a] = pool.allocate([[1, 2, 3]], owner=nan)
    assert pool.owned(nan) == [a.seq_id]
    pool.check_integrity()
    pool.free(a.seq_id)
    pool.check_integrity()
    prompt = list(range(2 * BS + 1))  # and a pin's owner (its check compared them with != too)
    [b] = pool.allocate([prompt])
    pool.commit(b.seq_id)
    assert pool.pin([prompt], owner=nan) == [2 * BS]
    pool.check_integrity()
    assert pool.unpin([prompt], owner=nan) == [2 * BS]
    pool.check_integrity()


# -- write_attend: checked whole before the write ------------------------------------------


def _write_attend_refusals():
    torch = pytest.importorskip("torch")
    return [
        (lambda q: dict(q=q.double()), "dtype"),
        (lambda q: dict(q=q.to("meta")), "meta"),
        (lambda q: dict(sinks=torch.zeros(5)), "sinks"),
        (lambda q: dict(sinks=torch.tensor([float("nan"), 0.0])), "sinks must be finite"),
        (lambda q: dict(sinks=torch.zeros(2, dtype=torch.int64)), "sinks"),
    ]


@pytest.mark.parametrize("k", range(5))
def test_write_attend_refused_for_its_query_or_sinks_writes_nothing(k):
    """StepPlan.write_attend says a refused call changes nothing; a q of another dtype
    or device, or bad sinks, were refused by the attend after the K/V were written."""
    torch = pytest.importorskip("torch")
    make, needle = _write_attend_refusals()[k]
    pool = make_pool()
    [c] = pool.allocate([[1, 2, 3]])
    plan = pool.plan(c.seq_id, 3, c.slots)
    q = torch.randn(1, 2, 3, 64)
    kv = torch.randn(1, 2, 3, 64)
    args = make(q)
    before = pool.backend.kv.copy()
    with pytest.raises(InvalidArgument, match=needle):
        plan.write_attend(0, args.pop("q", q), kv, kv, **args)
    assert np.array_equal(pool.backend.kv, before)
    out = plan.write_attend(0, q, kv, kv)  # the good call still runs
    ref = plan.attend(0, q[0].transpose(0, 1))
    assert torch.equal(out[0], ref)


# -- slots ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [(1 << 64) - 1, (1 << 63) + BS])
def test_uint64_slots_past_int64_are_refused(bad):
    """A uint64 slot of 2**64 - 1 became -1 in the cast to int64, and its write was
    skipped as padding without a word; plans took it the same way."""
    pool = make_pool()
    a, _ = _setup(pool)
    kv = pool.backend.kv.copy()
    slots = np.array([BS + 1, bad], np.uint64)
    k = np.ones((2, 2, 64), np.float32)
    with pytest.raises(InvalidArgument, match="slot"):
        pool.write(0, slots, k, k)
    with pytest.raises(InvalidArgument, match="slot"):
        pool.plan([a, a], 1, slots)
    with pytest.raises(InvalidArgument, match="slot"):
        make_plan(pool.backend, [[1, 2]], [BS + 4], None, slots[1:])
    assert np.array_equal(pool.backend.kv, kv)
    pool.write(0, np.array([BS + 1, 2 * BS], np.uint64), k, k)  # uint64 slots in range are taken
    assert np.array_equal(pool.backend.kv[2, 0, 0, :, 0], k[1])


# -- one sequence's info ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", [True, np.bool_(True), 1.0, np.float64(1.0), "1", [1], None, np.array(1.0)])
def test_sequence_refuses_what_is_no_sequence_id(bad):
    """sequence(True) and sequence(1.0) answered for sequence 1 (with ``seq_id=True``),
    where every other op refuses a bool or a float as an id."""
    pool = make_pool()
    _setup(pool)
    with pytest.raises(InvalidArgument, match="seq_id"):
        pool.sequence(bad)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16, np.uint64])
def test_sequence_takes_a_numpy_integer_as_its_int(dtype):
    """A 0-d integer array was UnknownSequence, a NumPy integer came back as the info's id."""
    pool = make_pool()
    a, _ = _setup(pool)
    want = pool.sequence(a)
    for form in (dtype(a), np.array(a, dtype)):
        got = pool.sequence(form)
        assert got == want and type(got.seq_id) is int


# -- out ---------------------------------------------------------------------------------------


def test_a_plan_refuses_a_read_only_out():
    """A read-only NumPy ``out`` raised NumPy's ValueError after the attention ran."""
    pool = make_pool()
    a, b = _setup(pool)
    plan = pool.plan([a, b], 1)
    q = np.ones((2, 2, 64), np.float32)
    out = np.zeros((2, 2, 64), np.float32)
    out.flags.writeable = False
    with pytest.raises(InvalidArgument, match="writable"):
        plan.attend(0, q, out=out)
    good = np.full((2, 2, 64), np.nan, np.float32)
    assert plan.attend(0, q, out=good) is good and np.array_equal(good, plan.attend(0, q))


# -- sizing a pool ------------------------------------------------------------------------------


@pytest.mark.parametrize("device_bytes, host_bytes", [
    ("1e9", 0), (float("nan"), 0), (float("inf"), 0), (True, 0), (None, 0), (-(1 << 30), 0),
    (1 << 30, "x"), (1 << 30, -1), (1 << 30, float("nan")), (1 << 30, False),
])
def test_a_memory_budget_that_is_no_number_of_bytes_is_refused(device_bytes, host_bytes):
    """A str, NaN or infinity raised ValueError / OverflowError from int()."""
    with pytest.raises(InvalidArgument, match="bytes"):
        PoolSpec.for_memory(device_bytes, num_layers=2, num_kv_heads=2, head_dim=64, host_bytes=host_bytes)


def test_a_memory_budget_of_numbers_is_taken():
    kw = dict(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32")
    per = PoolSpec(2, 2, 64, 2, dtype="float32").bytes_per_block
    for device_bytes in (10 * per, 10.5 * per, np.int64(10 * per), np.uint64(10 * per)):
        assert PoolSpec.for_memory(device_bytes, host_bytes=3 * per, **kw).num_blocks == 10


# -- kvpager.hf -----------------------------------------------------------------------------------


_CONFIG = {"num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 256}


@pytest.mark.parametrize("change, needle", [
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer"),
    ({"head_dim": 0}, "head_dim must be a positive integer"),
    ({"kv_lora_rank": 16, "qk_nope_head_dim": "64", "qk_rope_head_dim": 16}, "qk_nope_head_dim"),
    ({"qk_head_dim": "64"}, "head_dim must be a positive integer"),
])
def test_a_config_that_cannot_be_a_models_is_refused(change, needle):
    """A pool sized from a config with 3 kv heads for 8 query heads, or 0 kv heads
    (taken as 8), or head_dim 0 (taken as hidden / heads), or a latent config whose
    head dims were not ints (taken as hidden / heads: another head dim), was sized
    anyway; the model's first step, or nothing, said otherwise."""
    from kvpager.sizing import config_geometry

    assert config_geometry(_CONFIG) == dict(num_layers=2, num_kv_heads=2, head_dim=32)
    with pytest.raises(InvalidArgument, match=needle):
        config_geometry({**_CONFIG, **change})


def test_a_config_that_is_no_dict_is_refused():
    from kvpager.sizing import config_geometry

    for bad in ([1, 2], "config.json", None):
        with pytest.raises(InvalidArgument, match="a config is a dict"):
            config_geometry(bad)


@pytest.mark.parametrize("big", [2**63, -2**63 - 1, 2**70])
def test_token_ids_past_int64_are_named(big):
    """``[3, 2**63]`` was refused as 'a flat list of integers, got dtype float64'."""
    pool = make_pool()
    before = snapshot(pool)
    with pytest.raises(InvalidArgument, match=f"outside int64: {big}"):
        pool.allocate([[3, big]])
    assert snapshot(pool) == before


@pytest.mark.parametrize("scales", [[True] * 8, ["1.5"] * 8, [[[1.0, 1.0], [1.0, "x"]]] * 2])
def test_fp8_scales_are_numbers(scales):
    """Bools were taken as 1.0 and strings of digits as their numbers."""
    with pytest.raises(InvalidArgument, match="kv_scales must be numbers"):
        PoolSpec(2, 2, 64, 32, kv_dtype="float8_e4m3", kv_scales=scales)
    assert PoolSpec(2, 2, 64, 32, kv_dtype="float8_e4m3", kv_scales=[2] * 8).kv_scales == (2.0,) * 8


def test_a_pool_refuses_a_backend_it_cannot_use():
    """backend='numpy' raised AttributeError; a backend made for another spec was
    taken, its K/V of another geometry."""
    from kvpager import KVPool
    from kvpager.backends import make_backend

    spec = PoolSpec(2, 2, 64, 32)
    with pytest.raises(InvalidArgument, match="backend must be a kvpager Backend"):
        KVPool(spec, backend="numpy")
    with pytest.raises(InvalidArgument, match="backend holds a pool of"):
        KVPool(spec, backend=make_backend(spec.replace(head_dim=128), "cpu"))
    pool = KVPool(spec, backend=make_backend(spec, "cpu"))
    assert pool.allocate([[1, 2, 3]])[0].slots.tolist() == [BS, BS + 1, BS + 2]


def test_a_scale_is_any_real_number_numpy_or_not():
    """``scale=np.int64(1)`` was refused where ``1`` is taken, and an ``np.float16``
    scale was compared with float32's maximum in float16 (an overflow warning)."""
    import warnings

    pool = make_pool()
    a, b = _setup(pool)
    plan = pool.plan([a, b], 1)
    q = np.random.default_rng(0).standard_normal((2, 2, 64)).astype(np.float32)
    want = plan.attend(0, q, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scale in (np.int64(1), np.int32(1), np.float16(1.0), np.float32(1.0)):
            assert np.array_equal(plan.attend(0, q, scale), want)
    for bad in (np.bool_(True), True, 10**400, -np.int64(1), np.float16("inf"), "1"):
        with pytest.raises(InvalidArgument, match="scale must be"):
            plan.attend(0, q, bad)


@pytest.mark.parametrize("option", [dict(window=3), dict(num_split=4), dict(softcap=30.0), dict(chunk=16)])
def test_a_plan_option_no_backend_takes_is_refused(option):
    """The NumPy backend's planner ignored every option it had no use for, a misspelled
    one or an attend's (``plan(..., window=3)``: full attention, silently) included;
    the GPU's raised a TypeError. Both now refuse it by name; the GPU's options are
    still taken, and ignored, on the CPU."""
    pool = make_pool()
    a, b = _setup(pool)
    before = snapshot(pool)
    with pytest.raises(InvalidArgument, match=f"no plan option {next(iter(option))}"):
        pool.plan([a, b], 1, **option)
    with pytest.raises(InvalidArgument, match="no plan option"):
        make_plan(pool.backend, *pool.tables([a, b]), None, None, **option)
    assert snapshot(pool) == before
    plan = pool.plan([a, b], 1, num_splits=4, num_q_heads=2, cascade=False, host_bound=True, width=8)
    assert plan.seq_lens.tolist() == pool.tables([a, b])[1].tolist()


def test_fp8_scales_past_float32_are_refused_without_an_overflow_warning():
    """A scale past float32's range (1e300, from a file of scales) was refused only
    after NumPy warned of an overflow in its cast to float32."""
    import warnings


    for value in (1e300, 3.5e38):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(InvalidArgument, match="finite float32 normals"):
                PoolSpec(1, 1, 16, 8, 8, "float16", kv_dtype="float8_e4m3", kv_scales=[value, 1.0])
    assert PoolSpec(1, 1, 16, 8, 8, "float16", kv_dtype="float8_e4m3", kv_scales=[3e38, 1.0]).scales.max() > 1e38


@pytest.mark.parametrize("where", [dict(head_dim=10**13), dict(num_host_blocks=10**13), dict(head_dim=10**15)])
def test_a_pool_larger_than_the_host_can_hold_is_a_typed_error(where):
    """A pool of more bytes than any host maps (a head dim or a host-block count
    typed with too many zeros) was numpy's MemoryError; it is BackendUnavailable
    naming the bytes and what to make smaller, or, past int32 block ids or a
    pebibyte, refused by PoolSpec itself."""
    from kvpager import BackendUnavailable, KVPool

    geometry = {**dict(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=2, block_size=8), **where}
    if where.get("num_host_blocks", 0) > (1 << 31) or where.get("head_dim", 0) > 10**14:
        with pytest.raises(InvalidArgument, match="int32|past the most kvpager takes"):
            PoolSpec(**geometry)
        return
    with pytest.raises(BackendUnavailable, match="make the pool smaller"):
        KVPool(PoolSpec(**geometry))


# -- counts and flags that are no counts or flags ----------------------------------------


_NO_COUNT = [
    pytest.param(lambda p: p.pins_page(after="x"), "after", id="pins_page after str"),
    pytest.param(lambda p: p.pins_page(after=1.5), "after", id="pins_page after float"),
    pytest.param(lambda p: p.pins_page(limit=-5), "limit", id="pins_page limit negative"),
    pytest.param(lambda p: p.pins_page(limit=True), "limit", id="pins_page limit bool"),
    pytest.param(lambda p: p.pin([list(range(3 * BS))], max_listed=True), "max_listed", id="pin max_listed bool"),
    pytest.param(lambda p: p.pin([list(range(3 * BS))], max_listed=2.5), "max_listed", id="pin max_listed float"),
    pytest.param(lambda p: p.pin([list(range(3 * BS))], max_listed="9"), "max_listed", id="pin max_listed str"),
    pytest.param(lambda p: p.commit(p.sequences()[0].seq_id, synchronize="no"), "synchronize", id="commit flag str"),
]


@pytest.mark.parametrize("call, name", _NO_COUNT)
def test_a_count_or_flag_that_is_none_is_refused_by_name(call, name):
    """Each was taken as something else before: a bare TypeError from a comparison
    (``after="x"``, ``max_listed="9"``), an empty page (``after=1.5``), every pin
    (``limit=-5``, ``limit=True``), a limit of True or -1 reported as exceeded, the
    string ``"no"`` read as True."""
    p = make_pool()
    a, _ = _setup(p)
    p.pin([list(range(BS + 4))])
    before = snapshot(p)
    with pytest.raises(InvalidArgument, match=name):
        call(p)
    assert snapshot(p) == before
    p.check_integrity()


def test_a_0d_integer_array_is_the_int_it_holds_for_every_count():
    """As `KVPool.sequence` and the sequence ops take it: a layer, a window, a chunk,
    a quota (refused as "got array(0)" before)."""
    p = make_pool()
    a, _ = _setup(p)
    q = np.ones((1, 2, 64), np.float32)
    got = p.attend(np.array(0), [a], q, scale=0.125, window=np.array(8))
    assert np.array_equal(got, p.attend(0, [a], q, scale=0.125, window=8))
    assert np.array_equal(p.attend(1, [a], q, scale=0.125, chunk=np.array(16)),
                          p.attend(1, [a], q, scale=0.125, chunk=16))
    assert np.array_equal(p.kv(np.array(1))[0], p.kv(1)[0])
    p.set_quota("t", np.array(3))
    assert p.pins_page(after=np.array(-1), limit=np.array(5)) == p.pins_page()
    p.check_integrity()


def test_commit_refuses_an_array_as_one_sequences_upto():
    p = make_pool()
    a, _ = _setup(p)
    before = snapshot(p)
    with pytest.raises(InvalidArgument, match="upto"):  # a bare ValueError (an array's truth value) before
        p.commit([a], [np.array([4, 8])])
    assert snapshot(p) == before


def test_a_batch_call_with_keyword_names_of_mixed_kinds_is_refused_by_name():
    p = make_pool()
    a, _ = _setup(p)
    before = snapshot(p)
    with pytest.raises(InvalidArgument, match="free takes seq_ids"):  # a TypeError from sorting them before
        p.batch([("free", [a], {1: 2, "x": 3})])
    assert snapshot(p) == before
