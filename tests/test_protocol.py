"""Wire protocol: every message type round-trips; malformed input raises typed errors."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from kvpager import protocol
from kvpager.errors import (
    ERRORS_BY_CODE,
    InvalidArgument,
    KVPagerError,
    MessageTooLarge,
    NotOwner,
    OutOfBlocks,
    ProtocolError,
    SequenceSwapped,
    UnknownOp,
    UnknownSequence,
    VersionMismatch,
)
from kvpager.protocol import OPS, VERSION, ErrorInfo, Reply, Request, decode_reply, decode_request
from kvpager.types import (
    Allocation,
    BlockMap,
    PinInfo,
    PoolStats,
    SequenceInfo,
    SessionInfo,
    TenantUsage,
)

LIMIT = 1 << 20

# One well-formed argument set per op (required and optional arguments).
SAMPLE_ARGS = {
    "hello": {"client": "worker-1", "pid": 123, "host": "h", "token": "t" * 16, "control_token": "c" * 16},
    "allocate": {"prompts": [[1, 2, 3], np.arange(40, dtype=np.int64)], "salt": "m", "share_in_batch": True},
    "cached_tokens": {"prompts": [[1, 2, 3]], "salt": None},
    "append": {"seq_ids": [1, 2], "num_tokens": [1, 3], "token_ids": [[7], [8, 9, 10]]},
    "record_tokens": {"seq_ids": [1, 2], "token_ids": [[7], np.array([8, 9], dtype=np.int64)]},
    "commit": {"seq_ids": np.array([1, 2]), "upto": [None, 4]},
    "fork": {"seq_ids": 1, "n": 3},
    "free": {"seq_ids": [1]},
    "truncate": {"seq_ids": [1], "lengths": [5]},
    "swap_out": {"seq_ids": [1, 2]},
    "swap_in": {"seq_ids": [1, 2]},
    "release": {"seq_ids": [1, 2], "positions": [16, 0]},
    "batch": {"ops": [["record_tokens", {"seq_ids": [1], "token_ids": [[7]]}], ["append", {"seq_ids": [1, 2]}]]},
    "staging": {"nbytes": 4096},
    "write": {"layer": 0, "slots": np.array([16, 17, -1]), "k": [0, [3, 2, 16]], "v": [448, [3, 2, 16]]},
    "attend": {"layer": 1, "seq_ids": [1], "q": [0, [1, 4, 16]], "out": 256, "query_lens": [1], "scale": 0.25},
    "tables": {"seq_ids": [1, 2]},
    "sequences": {"seq_ids": [3]},
    "blocks": {},
    "stats": {},
    "check": {},
    "pin": {"prompts": [[1, 2, 3]], "salt": b"\x01", "keep": True},
    "unpin": {"prompts": [np.arange(40, dtype=np.int64)], "salt": ["a"], "keep": False},
    "pins": {},
    "set_quota": {"salt": None, "blocks": 12},
    "sessions": {},
    "heartbeat": {},
    "bye": {},
}


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return a == b and type(a) is type(b)


def test_every_op_has_a_sample():
    assert set(SAMPLE_ARGS) == set(OPS)


@pytest.mark.parametrize("op", sorted(OPS))
def test_request_round_trip(op):
    req = Request(id=42, op=op, args=SAMPLE_ARGS[op], session=None if op == "hello" else "abc")
    back = decode_request(req.encode(), LIMIT)
    assert (back.id, back.op, back.session, back.version) == (42, op, req.session, VERSION)
    assert _same(req.args, back.args)


@pytest.mark.parametrize("dtype", ["int64", "int32", "uint8", "bool", "float16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(0,), (5,), (3, 4), (2, 0, 3)])
def test_array_round_trip(dtype, shape):
    a = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    b = protocol.unpack(protocol.pack(a))
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def test_non_contiguous_array_is_sent_contiguous():
    a = np.arange(20).reshape(4, 5)[:, ::2]
    assert np.array_equal(protocol.unpack(protocol.pack(a)), a)


@pytest.mark.parametrize("result", [None, 3, [1, 2], {"freed": 2}, np.arange(4), [np.zeros((2, 3), np.int32), np.ones(2)]])
def test_ok_reply_round_trip(result):
    back = decode_reply(Reply(7, result).encode())
    assert back.id == 7 and back.error is None and _same(result, back.result)


@pytest.mark.parametrize("code", sorted(ERRORS_BY_CODE))
def test_error_reply_round_trip_every_code(code):
    info = ErrorInfo(code, f"something about {code}", {"seq_id": 5})
    back = decode_reply(Reply(None, error=info).encode())
    assert back.id is None and back.error == info
    exc = back.error.exception()
    assert type(exc) is ERRORS_BY_CODE[code] and str(exc) == info.message and exc.seq_id == 5


@pytest.mark.parametrize("exc", [
    OutOfBlocks(10, 3, "host"), UnknownSequence(9), SequenceSwapped(4, "append"),
    NotOwner("sequence 3 belongs to another session"), InvalidArgument("bad layer"),
])
def test_exceptions_cross_the_wire_unchanged(exc):
    back = decode_reply(Reply(1, error=ErrorInfo.from_exception(exc)).encode()).error.exception()
    assert type(back) is type(exc) and str(back) == str(exc) and vars(back) == vars(exc)


def test_unknown_error_code_keeps_the_code():
    exc = ErrorInfo("from_the_future", "new").exception()
    assert type(exc) is KVPagerError and exc.code == "from_the_future"


def test_result_codecs_round_trip():
    allocs = [Allocation(3, (4, 5), 16, np.arange(80, 90, dtype=np.int64)), Allocation(4, (6,), 0, np.zeros(0, np.int64))]
    assert protocol.decode_allocations(protocol.unpack(protocol.pack(protocol.encode_allocations(allocs)))) == allocs
    info = SequenceInfo(3, "s1", 20, 16, (4, 0), 1, True, 1)
    assert protocol.decode_info(protocol.unpack(protocol.pack(protocol.encode_info(info)))) == info
    stats = PoolStats(*range(16))
    assert protocol.decode_stats(protocol.unpack(protocol.pack(protocol.encode_stats(stats)))) == stats
    tenants = (TenantUsage("a", 5, 2, 1, 3), TenantUsage(b"\xff", 1, 1, 0, None), TenantUsage(None, 2, 0, 0, 0))
    stats = PoolStats(*range(16), pinned_blocks=4, max_pinned_blocks=9, tenants=tenants)
    assert protocol.decode_stats(protocol.unpack(protocol.pack(protocol.encode_stats(stats)))) == stats
    for pin in (PinInfo("s1", b"\x00", 32, 2, (5, 6)), PinInfo(None, None, 0, 1, ())):
        assert protocol.decode_pin(protocol.unpack(protocol.pack(protocol.encode_pin(pin)))) == pin
    session = SessionInfo("s2", "w", 12, 3, 1, 40, 1.5, 0.25, True)
    d = protocol.unpack(protocol.pack(dict(vars(session), newer_field=1)))
    assert protocol.decode_session(d) == session
    bm = BlockMap(np.array([0, 1, 3], np.uint8), np.array([0, 0, 2], np.int32), np.array([False, False, True]))
    assert protocol.decode_blocks(protocol.unpack(protocol.pack(protocol.encode_blocks(bm)))) == bm


def test_stats_from_a_newer_daemon_drop_unknown_fields():
    d = protocol.encode_stats(PoolStats(*range(16)))
    d["sessions"] = 3
    assert protocol.decode_stats(d) == PoolStats(*range(16))


def test_stats_from_an_older_daemon_have_no_pins_or_tenants():
    d = protocol.encode_stats(PoolStats(*range(16)))
    for name in ("pinned_blocks", "max_pinned_blocks", "tenants"):
        del d[name]
    st = protocol.decode_stats(d)
    assert (st.pinned_blocks, st.max_pinned_blocks, st.tenants) == (0, 0, ())


@pytest.mark.parametrize("counts", [1, 3, [1, 2, 0, 4]])
def test_slots_round_trip(counts):
    n = 4
    per = counts if isinstance(counts, list) else [counts] * n
    slots = [np.arange(c, dtype=np.int64) + 100 * i for i, c in enumerate(per)]
    flat = protocol.unpack(protocol.pack(protocol.encode_slots(np.concatenate(slots))))
    assert isinstance(flat, bytes)
    back = protocol.decode_slots(flat, n, counts)
    assert len(back) == n and all(np.array_equal(a, b) for a, b in zip(slots, back))


# -- malformed input --------------------------------------------------------------------------------
def _raw(*msg):
    return msgpack.packb(list(msg), use_bin_type=True)


@pytest.mark.parametrize("data, exc, rid", [
    (b"\xc1\xc1 not msgpack", ProtocolError, None),
    (b"", ProtocolError, None),
    (msgpack.packb({"op": "stats"}), ProtocolError, None),
    (_raw(VERSION, 1, None, "stats"), ProtocolError, None),
    (_raw(VERSION, "x", None, "stats", {}), ProtocolError, None),
    (_raw(VERSION + 1, 5, None, "stats", {}), VersionMismatch, 5),
    (_raw(True, 15, None, "stats", {}), VersionMismatch, 15),  # (equal to 1 in Python: taken before)
    (_raw(1.0, 16, None, "stats", {}), VersionMismatch, 16),
    (_raw("1", 17, None, "stats", {}), VersionMismatch, 17),
    (_raw(VERSION, 6, None, "explode", {}), UnknownOp, 6),
    (_raw(VERSION, 7, None, 3, {}), ProtocolError, 7),
    (_raw(VERSION, 8, 12, "stats", {}), ProtocolError, 8),
    (_raw(VERSION, 9, None, "stats", [1]), ProtocolError, 9),
    (_raw(VERSION, 10, "s", "free", {}), InvalidArgument, 10),
    (_raw(VERSION, 11, "s", "free", {"seq_ids": [1], "extra": 1}), InvalidArgument, 11),
    (msgpack.packb([VERSION, 12, None, "stats", {}, msgpack.ExtType(99, b"")]), ProtocolError, None),
    (msgpack.packb([VERSION, 13, None, "free", {"seq_ids": msgpack.ExtType(99, b"x")}]), ProtocolError, None),
    (msgpack.packb([VERSION, 14, None, "free", {"seq_ids": msgpack.ExtType(1, b"\x02\x01|O\x01")}]), ProtocolError, None),
])
def test_malformed_requests(data, exc, rid):
    with pytest.raises(exc) as info:
        decode_request(data, LIMIT)
    assert getattr(info.value, "request_id", None) == rid


def test_oversized_request_keeps_its_id():
    body = Request(77, "allocate", {"prompts": [list(range(300_000))]}, "s").encode()
    with pytest.raises(MessageTooLarge) as info:
        decode_request(body, LIMIT)
    assert info.value.request_id == 77


def test_array_whose_bytes_do_not_match_its_shape():
    ext = protocol.pack_array(np.arange(4))
    bad = msgpack.ExtType(ext.code, ext.data[:-3])
    with pytest.raises(ProtocolError):
        protocol.unpack(msgpack.packb(bad))


def test_unsendable_value_is_invalid_argument():
    with pytest.raises(InvalidArgument):
        protocol.pack({"x": object()})


def test_allocation_is_still_a_frozen_dataclass():
    """`Allocation` fills its fields itself (no setattr call per field): it
    must still behave as the frozen dataclass it declares."""
    import dataclasses

    slots = np.arange(8, 12, dtype=np.int64)
    a = Allocation(3, (4, 5), 16, slots)
    b = Allocation(seq_id=3, block_table=(4, 5), num_cached_tokens=16, slots=slots.copy(), num_remote_tokens=0)
    assert [f.name for f in dataclasses.fields(a)] == list(vars(a)) == [
        "seq_id", "block_table", "num_cached_tokens", "slots", "num_remote_tokens"]
    assert a == b and a.num_remote_tokens == 0
    assert a != dataclasses.replace(a, num_remote_tokens=16) and a != Allocation(3, (4, 5), 16, slots + 1)
    assert dataclasses.asdict(a)["block_table"] == (4, 5)
    assert repr(a).startswith("Allocation(seq_id=3, block_table=(4, 5), num_cached_tokens=16, slots=array(")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.seq_id = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        hash(a)


def test_an_error_text_is_cut_to_its_limit_its_length_said():
    """A message or detail over MAX_ERROR_TEXT characters (one that quotes a
    client's value whole) goes on the wire cut, saying how long it was."""
    from kvpager.protocol import MAX_ERROR_TEXT, ErrorInfo

    info = ErrorInfo("invalid_argument", "y" * 1_000_000, {"what": "z" * 500_000, "n": 3})
    assert info.message.startswith("y" * MAX_ERROR_TEXT) and info.message.endswith("(1000000 characters in all)")
    assert len(info.details["what"]) < MAX_ERROR_TEXT + 64 and info.details["n"] == 3
    short = ErrorInfo("invalid_argument", "y" * MAX_ERROR_TEXT)
    assert short.message == "y" * MAX_ERROR_TEXT


def test_other_spellings_of_dtypes_never_crowd_out_the_ones_clients_send(monkeypatch):
    """A client sending many spellings of allowed dtypes (``int64``, ``=i8``, ``>i8``...)
    filled the 64 entries of the parsed-dtype cache, and every array of the usual
    ``<i8`` was parsed again on each decode."""
    from kvpager import protocol_codec

    monkeypatch.setattr(protocol_codec, "_dtypes", {})
    spellings = [f"{order}{kind}{size}" for order in "<>=|" for kind in "iuf" for size in (1, 2, 4, 8)]
    spellings += ["int64", "int32", "float32", "float64", "uint8", "int8", "int16", "uint16", "long", "int"]
    for s in spellings:
        try:
            dt = np.dtype(s)
        except TypeError:
            continue
        body = protocol_codec.pack_array(np.zeros(2, dtype=dt)).data
        spelled = bytes((len(s),)) + s.encode() + body[1 + body[0]:]
        assert protocol_codec.unpack_array(spelled).dtype == dt
    assert all(key == protocol_codec._dtypes[key].str.encode() for key in protocol_codec._dtypes)
    protocol_codec.unpack_array(protocol_codec.pack_array(np.arange(3, dtype=np.int64)).data)
    assert b"<i8" in protocol_codec._dtypes


def test_every_error_class_is_found_by_its_code():
    """Each `KVPagerError` of `kvpager.errors` is in `ERRORS_BY_CODE` under its
    own code (docs/protocol.md lists them from there): `outside_paged_pass` was not."""
    import inspect

    from kvpager import errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, KVPagerError) and c.__module__ == errors.__name__]
    assert len(classes) == len({c.code for c in classes})
    assert {c.code: c for c in classes} == ERRORS_BY_CODE
