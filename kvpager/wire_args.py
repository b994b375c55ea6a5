"""Checks of the daemon's request arguments as msgpack decodes them: sequence
ids (an int, a list of ints or an int array), plain integers and the token
ids of an append. Each raises InvalidArgument naming the argument, before the
handler changes anything; the pool's own checks (`kvpager.validate`) follow."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvpager.errors import InvalidArgument
from kvpager.validate import TOKEN_LIMIT, all_type


def wire_ids(value: Any, what: str = "seq_ids") -> list[int]:
    """A batch of sequence ids from the wire: an int, a list of ints or an int
    array (a 0-d one is a batch of one, as `kvpager.validate.seq_ids` takes it)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, np.ndarray) and value.ndim <= 1 and value.dtype.kind in "iu":
        return value.tolist() if value.ndim else [int(value)]
    if isinstance(value, list) and all_type(value, int):  # bools excluded: type(True) is bool
        return value
    raise InvalidArgument(f"{what} must be an int or a list of ints")


def wire_int(value: Any, what: str) -> int:
    """An integer argument (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{what} must be an integer, got {type(value).__name__}")
    return value


def check_token_ids(token_ids: Any) -> None:
    """Every token id of an append in int64 range, checked before anything
    changes: one past it would be accepted by the append and fail only at a
    later commit, after that commit had published other sequences' blocks."""
    if not isinstance(token_ids, list):
        return  # None, or malformed: KVPool says why
    try:
        if max(map(max, token_ids)) < TOKEN_LIMIT:  # the decode step: [[t], [t], ...]
            return
    except (TypeError, ValueError):
        pass  # None entries, empty lists, junk: one at a time
    for ids in token_ids:
        if (isinstance(ids, list) or isinstance(ids, np.ndarray) and ids.ndim) and len(ids):  # 0-d: KVPool says why
            try:
                hi = max(ids)
                big = bool(hi >= TOKEN_LIMIT)
            except (TypeError, ValueError):
                continue  # not numbers (or rows of arrays): KVPool says why
            if big:
                raise InvalidArgument(f"append: token id {hi} is out of range (token ids are below 2**63)")


def wire_prompts(value: Any, op: str) -> list[Any]:
    """A request's prompts: a list of token-id lists (or arrays), or a 2-D integer
    array of them, a row each (a client's tensor or array of equal-length prompts,
    which `KVPool` takes too); InvalidArgument for anything else."""
    if isinstance(value, list):
        return value
    if isinstance(value, np.ndarray) and value.ndim == 2 and value.dtype.kind in "iu":
        return list(value)
    raise InvalidArgument(f"{op}: prompts must be a list of token-id lists (or a 2-D array of them, a row each)")
