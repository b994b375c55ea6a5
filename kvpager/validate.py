"""Argument checks shared by `KVPool`'s methods: each raises InvalidArgument
naming the bad value, before anything changes."""

from __future__ import annotations

import math
import reprlib
from collections.abc import Sequence as Seq
from operator import countOf, itemgetter
from typing import Any

import numpy as np

from kvpager.errors import InvalidArgument
from kvpager.owners import unhashable
from kvpager.spec import PoolSpec


def all_type(values: list[Any], kind: type) -> bool:
    """Whether every item of ``values`` is exactly of type ``kind`` (True for an empty
    list; bools are not ints here: ``type(True) is bool``). One C-speed pass: a
    256-id list in about 5 us, where ``set(map(type, values)) <= {kind}`` took 8.5."""
    return countOf(map(type, values), kind) == len(values)


#: Token ids are int64 (block keys hash their bytes): in [-TOKEN_LIMIT, TOKEN_LIMIT).
TOKEN_LIMIT = 1 << 63


def one_id_each(ids_list: list[Any]) -> bool:
    """Whether ``ids_list`` (non-empty) holds lists of one int each, in int64 range, as
    a decode step's token ids arrive: checked at C speed (else the caller takes
    each the slow way)."""
    n = len(ids_list)
    if not (all_type(ids_list, list) and countOf(map(len, ids_list), 1) == n):
        return False
    first = list(map(itemgetter(0), ids_list))
    return all_type(first, int) and min(first) >= -TOKEN_LIMIT and max(first) < TOKEN_LIMIT


def is_int(v: Any) -> bool:
    """An int or NumPy integer, not a bool."""
    return type(v) is int or isinstance(v, (int, np.integer)) and not isinstance(v, bool)


#: What iterates as ints but holds text or bytes: never a list of ids or counts
#: (``b"y"`` would have been a count of 121, ``bytearray(b"\\x01")`` sequence 1).
BYTES_LIKE = (str, bytes, bytearray, memoryview)


def is_tensor(value: Any) -> bool:
    """A torch tensor (without importing torch)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "numpy") and hasattr(value, "detach")


def host(value: Any, what: str) -> Any:
    """A torch tensor as the NumPy array it holds (detached, on the host), as a
    `Client` sends one: integer arguments and id lists take tensors as they take
    arrays, on both sides; anything else as it is."""
    if not is_tensor(value):
        return value
    try:
        return value.detach().cpu().numpy()
    except (TypeError, RuntimeError):  # (bfloat16 and the float8 types have no NumPy dtype)
        raise InvalidArgument(f"{what} must be an int or a list of ints, got a tensor of {value.dtype}") from None


def salt_value(salt: Any) -> Any:
    """``salt`` as given, InvalidArgument for a bytearray or a memoryview (alone or in
    a list): a `Client` sent them as bytes, which `KVPool` refuses (``salt must be
    str, bytes or None``)."""
    for s in salt if isinstance(salt, (list, tuple)) else (salt,):
        if isinstance(s, (bytearray, memoryview)):
            raise InvalidArgument(f"salt must be str, bytes or None, got {type(s).__name__}")
    return salt


def zero_d(value: np.ndarray, what: str) -> int:
    """The int a 0-d integer array holds: a scalar spelled as an array, taken
    wherever a NumPy integer is. Any other 0-d array (bool, float, str,
    object) raises InvalidArgument naming ``what``."""
    if value.dtype.kind not in "iu":
        raise InvalidArgument(f"{what} must be a scalar or a list, got a 0-d {value.dtype} array "
                              "(only a 0-d integer array is taken, as the int it holds)")
    return int(value)


def whole(value: Any) -> int | None:
    """``value`` as the int it is: a Python int, a NumPy integer or a 0-d integer
    array or tensor (not a bool); None for anything else (the caller names what it wanted)."""
    if is_tensor(value) and getattr(value, "ndim", None) == 0:
        value = host(value, "a count")
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        return int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    return None


def unwrap(value: Any) -> Any:
    """The Python value a NumPy scalar or a 0-d array or tensor holds (anything with
    ``ndim`` 0 and ``item()``: NumPy's, torch's), else ``value`` itself. A config or
    a tokenizer hands out ``np.float32(0.7)`` or ``tensor(2)`` for a number; its
    ``item()`` is the int, float, bool or complex it is, for the caller to check."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)) \
            and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except Exception:  # (a meta tensor holds no value: the caller names what it got)
            return value
    return value


def real(value: Any) -> float | None:
    """``value`` as the float it is: an int or float, NumPy's integer and floating
    scalars, or a 0-d integer or float array or tensor (`unwrap`); None for a bool,
    a complex or anything else (the caller names what it wanted)."""
    v = unwrap(value)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v)
    except OverflowError:  # (an int past float's range: infinite, for the caller's range check)
        return math.inf if v > 0 else -math.inf


def integer(value: Any) -> int | None:
    """As `whole`, and a 0-d integer tensor too (`unwrap`); None for a bool or a float."""
    v = unwrap(value)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _short_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 4, 8
    r.maxstring, r.maxother, r.maxlong = 60, 60, 40
    return r


_SHORT = _short_repr()


def shown(value: Any) -> str:
    """``value``'s repr for an error message, cut short: a refused 100,000-id list
    once came back whole in its error (300,000 characters). Lists, strings and
    long ints show their start; an array or a tensor its own (summarized) repr."""
    return repr(value) if isinstance(value, np.ndarray) or is_tensor(value) else _SHORT.repr(value)


def described(value: Any) -> str:
    """``value``'s repr and what it is (its type; an array's or a tensor's dimensions
    and dtype), for an error that says what it got: ``tensor(6.)`` alone does not say
    that a float tensor is what was refused."""
    dtype, ndim = getattr(value, "dtype", None), getattr(value, "ndim", None)
    if dtype is None or ndim is None or isinstance(value, np.generic):
        return f"{shown(value)} ({type(value).__name__})"
    return f"{shown(value)} (a {ndim}-d {dtype} {type(value).__name__})"


def whole_in(value: Any, what: str, lo: int, hi: int | None = None) -> int:
    """``value`` as an int (`whole`) in [lo, hi) (no upper bound without ``hi``);
    InvalidArgument naming ``what`` otherwise."""
    n = whole(value)
    if n is None or n < lo or (hi is not None and n >= hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise InvalidArgument(f"{what} must be an int {span}, got {shown(value)}")
    return n


def flag(value: Any, what: str) -> bool:
    """A bool option (a NumPy bool too); InvalidArgument naming ``what`` for anything
    else (``"no"`` is not False)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgument(f"{what} must be True or False, got {shown(value)}")
    return bool(value)


def seq_ids(value: int | Seq[int], what: str = "seq_ids") -> list[int]:
    """A batch of sequence ids; a single int (or a 0-d integer array) is a batch of one."""
    if type(value) is list and len(value) == 1 and type(value[0]) is int:  # one sequence: no sets
        return value
    if type(value) is int:
        return [value]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return [int(value)]
    value = host(value, what)
    if isinstance(value, np.ndarray):
        if value.ndim == 1 and value.dtype.kind in "iu":  # packed ids (the wire's int64 array)
            return value.tolist()
        if value.ndim == 0:
            return [zero_d(value, what)]
    if isinstance(value, BYTES_LIKE) or not hasattr(value, "__iter__"):
        raise InvalidArgument(f"{what} must be an int or a list of ints, got {type(value).__name__}")
    check_ordered(value, what)
    out = value if type(value) is list else listed(value, f"{what} must be an int or a list of ints")
    if all_type(out, int):  # the common case, checked at C speed
        return out
    for s in out:
        if not isinstance(s, (int, np.integer)) or isinstance(s, bool):
            raise InvalidArgument(f"{what} must hold ints, got {shown(s)}")
    return [int(s) for s in out]


def listed(value: Any, wanted: str) -> list[Any]:
    """``list(value)``; InvalidArgument (``wanted``, and what ``value`` is) where that
    raises TypeError: a 0-d tensor has ``__iter__`` and ``__len__`` but refuses both
    (``free(ids[i])`` of a tensor of ids was a bare TypeError)."""
    try:
        return list(value)
    except TypeError:
        raise InvalidArgument(f"{wanted}, got {described(value)}") from None


def check_ordered(value: Any, what: str = "seq_ids") -> None:
    """InvalidArgument for ids given in no order (a set; a dict, whose keys a caller
    may take for the ids or not): an op's results come back in its ids' order."""
    if isinstance(value, (set, frozenset, dict)):
        raise InvalidArgument(f"{what} must come in an order (an int, a list, a tuple, an array or another "
                              f"iterable), got a {type(value).__name__}: results follow the ids' order")


def owner(value: Any) -> Any:
    """An owner (a daemon's session; None on an embedded pool): anything hashable,
    else InvalidArgument, before an op takes blocks or pins for it."""
    try:
        hash(value)
    except TypeError:
        raise unhashable(value) from None
    return value


def batch_ids(value: Any) -> list[int] | np.ndarray:
    """The ``seq_ids`` of a decode step's op (append, record_tokens, commit):
    as `seq_ids`, but packed ids (a 1-D int64 array, as the wire carries a
    batch) stay that array. The step's lookup compares their bytes with the
    recent batches' (`RecentBatches`), and no id becomes a Python int unless it must."""
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype == np.int64:
        return value
    return seq_ids(value)


def per_seq(value: Any, n: int, what: str) -> list[Any]:
    """Broadcast a scalar (or None) to n entries; check a list's length.

    A 0-d integer array is a scalar (the int it holds, as a NumPy integer is);
    any other 0-d array, like anything neither a scalar nor a list, raises
    InvalidArgument. Entries are checked by the caller."""
    if value is None or isinstance(value, (int, np.integer, str, bytes)):
        return [value] * n
    value = host(value, what)
    if isinstance(value, range):  # (ordered, read once as the list it is: a client sends it so)
        value = list(value)
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise InvalidArgument(f"{what} must be a scalar or a list, got {type(value).__name__}")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return [zero_d(value, what)] * n
    out = value.tolist() if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu" \
        else list(value)
    if len(out) != n:
        raise InvalidArgument(f"{what} has {len(out)} entries for {n} sequences")
    return out


def truncate_lengths(value: Any, n: int) -> list[Any]:
    """Truncate's ``lengths``: `per_seq`, each an integer (never a bool) >= 0,
    checked before the ids are looked up (each one's upper bound, its
    sequence's length, is the op's to check)."""
    out = per_seq(value, n, "lengths")
    for v in out:
        if not is_int(v) or v < 0:
            raise InvalidArgument(f"truncate: lengths must be integers >= 0, got {shown(v)}")
    return out


def query_lens(value: Any, seq_ids: list[int], seq_lens: np.ndarray) -> np.ndarray:
    """An attend's ``query_lens`` (None: 1 each) as int64, one per sequence, each an
    integer (never a bool) in [1, its sequence's length]: `KVPool.attend`'s and a
    mapped `Client.attend`'s one reading (a scalar or 0-d array broadcast, a list,
    a tuple, a 1-D array, an object array of ints; anything else refused)."""
    q = per_seq(1 if value is None else value, len(seq_ids), "query_lens")
    if not all_type(q, int):
        for s, ql in zip(seq_ids, q):
            if not isinstance(ql, (int, np.integer)) or isinstance(ql, (bool, np.bool_)):
                raise InvalidArgument(f"query_lens for sequence {s} must be an integer, got {ql!r}")
    try:
        arr = np.array(q, dtype=np.int64) if q else np.zeros(0, np.int64)
    except OverflowError:  # (an int past int64: out of range, as any count past a sequence's length)
        arr = np.array([ql if -2**63 <= ql < 2**63 else 0 for ql in q], dtype=np.int64)
    bad = (arr < 1) | (arr > seq_lens)
    if bad.any():
        k = int(np.argmax(bad))
        raise InvalidArgument(f"query_lens for sequence {seq_ids[k]} must be in [1, {int(seq_lens[k])}], "
                              f"got {q[k]!r}")
    return arr


def token_rows(value: Any, n: int, what: str = "token_ids") -> np.ndarray | None:
    """Token ids given as one 2-D integer array, a row per sequence (every
    sequence the same number of ids, as a decode step's ``[n, 1]``): checked
    (``n`` rows, every id in int64 range) and returned; None for any other
    form (a list of lists, checked by the op)."""
    if not isinstance(value, np.ndarray) or value.ndim != 2:
        return None
    if value.dtype.kind not in "iu":
        raise InvalidArgument(f"{what} must hold integers, got a {value.dtype} array")
    if len(value) != n:
        raise InvalidArgument(f"{what} has {len(value)} rows for {n} sequences")
    if value.dtype.kind == "u" and value.size and int(value.max()) >> 63:
        raise InvalidArgument(f"{what}: token id {int(value.max())} is out of int64 range")
    return value


def counts(value: Any) -> int | np.integer | list[Any]:
    """`append`'s ``num_tokens``: an int (a NumPy integer, or a 0-d integer
    array: the int it holds) for every sequence, else a list of counts (each
    checked by the append). A bool or anything not iterable raises InvalidArgument."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return value
    value = host(value, "append: count")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return zero_d(value, "append: count")
    if isinstance(value, (bool, np.bool_, *BYTES_LIKE, dict, set, frozenset)) or not hasattr(value, "__iter__"):
        # (bytes iterate as ints: b"y" would have been a count of 121)
        raise InvalidArgument(f"append: count must be an integer >= 0 or a list of them, got {shown(value)}")
    return listed(value, "append: count must be an integer >= 0 or a list of them")


def prompts(value: Any) -> None:
    """A list of token-id lists (not one flat list)."""
    if type(value) is list and len(value) == 1 and type(value[0]) in (list, np.ndarray):  # one prompt
        return
    if (isinstance(value, np.ndarray) or is_tensor(value)) and value.ndim == 2:
        return  # a row a prompt (a tokenizer's batch of equal lengths), as a Client sends a tensor of them
    if isinstance(value, (*BYTES_LIKE, np.ndarray, dict, set, frozenset)) or not hasattr(value, "__len__") \
            or getattr(value, "ndim", None) in (0, 1):  # (a 0-d tensor has __len__, and len() of it raises TypeError)
        raise InvalidArgument("prompts must be a list of token-id lists (or a 2-D array of them, a row each)")
    if len(value) and isinstance(value[0], (int, np.integer)):
        raise InvalidArgument("prompts must be a list of token-id lists: pass [tokens] for one prompt")


def layer(value: Any, spec: PoolSpec) -> int:
    return whole_in(value, "layer", 0, spec.num_layers)
