"""How a `Client` reads the ids and token ids its callers give and puts them
on the wire: ``seq_ids`` as the daemon takes them (`as_ids`), as a list of
ints where one can be read (`id_list`, `read_ids`), a 0-d array as its int
(`scalar`), and batches of at least `PACK_AT` ids or rows of token ids
packed into one int64 array (`packed`, `packed_rows`)."""

from __future__ import annotations

from operator import itemgetter
from typing import Any

import numpy as np

from kvpager.validate import all_type, check_ordered, host, is_tensor, listed, one_id_each

#: A batch of at least this many ids (or a decode step's token ids for that many
#: sequences) goes on the wire packed, as one int64 array (docs/protocol.md): the
#: daemon reads it without making an int of each id, and finds a decode loop's
#: repeated batch by comparing bytes. Smaller ones go as lists.
PACK_AT = 16


def as_ids(value: Any) -> Any:
    """Sequence ids given as another iterable than a list, a tuple or an array (a
    generator, a range) read once into a list, as `KVPool` reads them, before the
    client reads or sends them (an object array too: its mirror then follows the op); ids in no order (a set, a dict) refused as `KVPool`
    refuses them; a tensor as the array it holds, as `KVPool` takes it; anything
    else as given."""
    if isinstance(value, np.ndarray) and value.dtype == object:  # (ints as Python objects: read as `KVPool` reads them)
        return value.tolist()
    if isinstance(value, (list, tuple, np.ndarray, str, bytes)) or not hasattr(value, "__iter__"):
        return value
    if is_tensor(value):  # as `KVPool` takes one: the array it holds (a 0-d one: one id)
        return host(value, "seq_ids")
    check_ordered(value)
    return listed(value, "seq_ids must be an int or a list of ints")


def id_list(value: Any) -> list[int] | None:
    """A batch of sequence ids as the daemon reads one (an int, a list of ints,
    a 1-D integer array; a 0-d one is one id), or None if it is none of those
    (the daemon says why)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return [int(value)]
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu" or value.ndim > 1:
            return None
        return value.tolist() if value.ndim else [int(value)]
    if isinstance(value, (list, tuple)):
        if all_type(value, int):  # bools excluded: type(True) is bool
            return list(value)
        # NumPy integers, int subclasses, or a mix with ints: the wire carries each as an int
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in value):
            return [int(v) for v in value]
    return None


def packed(value: Any, checked: bool = False) -> Any:
    """A list of at least `PACK_AT` ints (sequence ids, commit's ``upto``) as one
    int64 array; anything else as given (the daemon checks it). ``checked``: the
    list is known to hold only ints (`id_list`'s)."""
    if type(value) is list and len(value) >= PACK_AT and (checked or all_type(value, int)):
        try:
            return np.fromiter(value, np.int64, len(value))
        except OverflowError:  # out of int64 range: the daemon says why
            pass
    return value


def packed_rows(value: Any) -> Any:
    """A decode step's token ids (a list of at least `PACK_AT` lists of one int
    each, in int64 range) as one int64 array ``[n, 1]``; anything else as given."""
    if type(value) is list and len(value) >= PACK_AT and one_id_each(value):
        return np.fromiter(map(itemgetter(0), value), np.int64, len(value)).reshape(-1, 1)
    return value


def read_ids(value: Any) -> tuple[list[int] | None, Any]:
    """A batch of sequence ids read once: (`id_list`'s reading, what the request
    carries: a batch of `PACK_AT` or more packed, anything else as given)."""
    value = as_ids(value)
    ids = id_list(value)
    return ids, value if ids is None else packed(ids, checked=True)


def scalar(value: Any) -> Any:
    """A 0-d integer array as the int it holds (as the daemon's pool takes it); anything else as is."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        return int(value)
    return value
