"""The daemon's argument checks (`kvpager.wire_args`) on values as msgpack
decodes them: what each accepts (and returns), and a typed error naming the
argument for everything else."""

from __future__ import annotations

import numpy as np
import pytest

from kvpager.errors import InvalidArgument
from kvpager.wire_args import TOKEN_LIMIT, check_token_ids, wire_ids, wire_int


@pytest.mark.parametrize("value, ids", [
    (7, [7]), ([], []), ([3, 1, 2], [3, 1, 2]), (np.array([4, 5], dtype=np.int32), [4, 5]),
    (np.array([9], dtype=np.uint8), [9]), (np.zeros(0, dtype=np.int64), []),
    (np.array(6), [6]), (np.array(2, dtype=np.uint16), [2]),  # a 0-d integer array: one id, as KVPool takes it
])
def test_wire_ids_accepts_ints_lists_and_int_arrays(value, ids):
    out = wire_ids(value)
    assert out == ids and all(type(i) is int for i in out)


@pytest.mark.parametrize("value", [
    True, 1.0, "1", b"1", None, [1, True], [1, 2.0], [[1]], (1, 2), {1: 2},
    np.array([1.0]), np.array([[1, 2]]), np.array([True]), np.int64(3), np.array(True), np.array(1.0),
])
def test_wire_ids_refuses_the_rest_by_name(value):
    with pytest.raises(InvalidArgument, match="^parents must be an int or a list of ints$"):
        wire_ids(value, "parents")


def test_wire_int():
    assert wire_int(0, "n") == 0 and wire_int(-5, "n") == -5 and wire_int(1 << 70, "n") == 1 << 70
    for bad, name in ((True, "bool"), (1.0, "float"), ("3", "str"), (None, "NoneType"), (np.int64(3), "int64")):
        with pytest.raises(InvalidArgument, match=f"^limit must be an integer, got {name}$"):
            wire_int(bad, "limit")


def test_check_token_ids():
    for ok in (None, "junk", [], [[1], [2]], [[TOKEN_LIMIT - 1]], [None, [5]], [[], [1, 2]], [["a"], [1]],
               [np.array([TOKEN_LIMIT - 1], dtype=np.uint64)], [np.array(5)]):
        check_token_ids(ok)  # in range, or malformed: left to the pool's own checks
    for bad in ([[TOKEN_LIMIT]], [[1], [2, TOKEN_LIMIT + 5]], [None, [TOKEN_LIMIT]],
                [np.array([TOKEN_LIMIT], dtype=np.uint64)], [np.array(5), [TOKEN_LIMIT]]):
        with pytest.raises(InvalidArgument, match="out of range"):
            check_token_ids(bad)
