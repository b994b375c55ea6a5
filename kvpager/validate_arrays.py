"""Array arguments of `KVPool`'s K/V methods and step plans: slot ids, index
arrays, K/V tensors. Each raises InvalidArgument naming the bad value, before
anything changes (the other arguments: `kvpager.validate`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvpager.errors import InvalidArgument
from kvpager.spec import PoolSpec


def int_array(a: Any, name: str, ndim: int, dtype: type) -> np.ndarray:
    """``a`` as a contiguous ``ndim``-D integer array of ``dtype``; InvalidArgument for
    anything else, values past ``dtype``'s range included (a cast would wrap them:
    a block id of 2**32 + 5 would read block 5)."""
    try:
        arr = np.asarray(a)
    except (ValueError, TypeError, OverflowError):  # ragged nesting, or ints past int64 and uint64
        raise InvalidArgument(f"{name} must be a {ndim}-D integer array, got {type(a).__name__}") from None
    if arr.ndim != ndim or (arr.size and arr.dtype.kind not in "iu"):
        raise InvalidArgument(f"{name} must be a {ndim}-D integer array, got {arr.dtype} {arr.shape}")
    if arr.dtype != dtype and arr.size and not np.can_cast(arr.dtype, dtype):
        info = np.iinfo(dtype)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise InvalidArgument(f"{name} holds {lo if lo < info.min else hi}, past {np.dtype(dtype).name}")
    return np.ascontiguousarray(arr, dtype=dtype)


#: (`append` answers an array a sequence; a step's write or plan takes them in one)
_ONE_ARRAY = " (one array for the step: concatenate append's per-sequence arrays, as append_flat returns them)"


def slots(value: Any, spec: PoolSpec) -> np.ndarray:
    """Slot ids as int64: each a slot of a real block, or -1 (padding)."""
    try:
        arr = np.asarray(value.get() if type(value).__module__.startswith("cupy") else value)  # a CuPy array: to host
    except (ValueError, TypeError, OverflowError):  # ragged nesting, or ints past int64 and uint64
        raise InvalidArgument(f"slots must be a 1-D integer array, got {type(value).__name__}{_ONE_ARRAY}") from None
    if arr.dtype == object and arr.ndim == 1 and all(  # ints as Python objects: the ints they are
            isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in arr.tolist()):
        try:
            arr = np.array(arr.tolist(), dtype=np.int64) if arr.size else np.zeros(0, np.int64)
        except OverflowError:
            raise _slot_outside(max(arr.tolist()), spec) from None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise InvalidArgument(f"slots must be a 1-D integer array, got dtype {arr.dtype} shape {arr.shape}"
                              f"{_ONE_ARRAY if arr.ndim > 1 else ''}")
    limit = spec.num_blocks * spec.block_size
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) >> 63:  # the cast would wrap it (2**64 - 1 to -1)
        raise _slot_outside(int(arr.max()), spec)
    arr = arr.astype(np.int64, copy=False)
    if not arr.size or (arr.min() >= spec.block_size and arr.max() < limit):  # no padding: the common case
        return arr
    bad = (arr < -1) | (arr >= limit) | ((arr >= 0) & (arr < spec.block_size))
    if bad.any():
        raise _slot_outside(int(arr[bad][0]), spec)
    return arr


def _slot_outside(slot: int, spec: PoolSpec) -> InvalidArgument:
    return InvalidArgument(f"slot {slot} is outside [{spec.block_size}, {spec.num_blocks * spec.block_size}) "
                           "(block 0 is the null block; -1 marks padding)")


def tensor(x: Any, name: str, shape: tuple[int, ...], spec: PoolSpec, xp: Any) -> Any:
    """An ``xp`` array (DLPack objects are taken) of ``shape`` in the pool dtype."""
    if not isinstance(x, xp.ndarray):
        if hasattr(x, "__dlpack__"):
            try:
                x = xp.from_dlpack(x)
            except Exception as e:
                raise InvalidArgument(f"{name}: cannot take a {type(x).__name__} as a {xp.__name__} array: {e}") from None
        else:
            raise InvalidArgument(f"{name} must be a {xp.__name__} array, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise InvalidArgument(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.dtype != spec.np_dtype:
        raise InvalidArgument(f"{name} must have dtype {spec.dtype}, got {x.dtype}")
    return x
