"""The wire codec: msgpack values with NumPy arrays as an ExtType, the
transport's size cap, and the id of a request too large to decode."""

from __future__ import annotations

import math
import struct
import threading
from typing import Any

import msgpack
import numpy as np

from kvpager.errors import InvalidArgument, ProtocolError

#: msgpack ExtType code of a NumPy array: see `pack_array`.
EXT_NDARRAY = 1
#: Hard cap handed to ZeroMQ (MAXMSGSIZE): a bigger message drops the
#: connection instead of being buffered; between the limit and this cap the
#: daemon still answers with a typed `message_too_large` error.
TRANSPORT_SLACK = 1 << 20

# -- NumPy arrays as ExtType -------------------------------------------------------------
# Payload: u8 len(dtype.str), dtype.str, u8 ndim, ndim x u64 shape, raw C-order bytes.
# Decoding is on every reply's hot path (slot arrays): parsed dtypes are cached.
_ALLOWED_KINDS = frozenset("biuf")
_dtypes: dict[bytes, np.dtype] = {}
_shapes = [struct.Struct(f"<{n}Q") for n in range(33)]


def pack_array(a: np.ndarray) -> msgpack.ExtType:
    """A NumPy array as msgpack ExtType ``EXT_NDARRAY`` (see docs/protocol.md)."""
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    dt = a.dtype.str.encode()
    return msgpack.ExtType(EXT_NDARRAY, b"".join(
        (bytes((len(dt),)), dt, bytes((a.ndim,)), _shapes[a.ndim].pack(*a.shape), a.tobytes())))


def pack_rows(a: np.ndarray, lengths: list[int]) -> list[msgpack.ExtType]:
    """Row k's first ``lengths[k]`` entries of the 2-D array ``a``, each as
    `pack_array` packs a 1-D array: the bytes of ``a`` taken once, a row a
    slice (a page of 4,096 block tables packed one array at a time took 0.4 s)."""
    a = np.ascontiguousarray(a)
    dt = a.dtype.str.encode()
    head, shape = bytes((len(dt),)) + dt + b"\x01", _shapes[1]
    raw, width = a.tobytes(), a.shape[1] * a.itemsize
    return [msgpack.ExtType(EXT_NDARRAY, b"".join((head, shape.pack(n), raw[k * width : k * width + n * a.itemsize])))
            for k, n in enumerate(lengths)]


def _dtype(key: bytes) -> np.dtype:
    dt = _dtypes.get(key)
    if dt is None:
        try:
            dt = np.dtype(key.decode())
        except Exception as e:
            raise ProtocolError(f"malformed array dtype {key!r}: {e}") from None
        if dt.kind not in _ALLOWED_KINDS or dt.hasobject:
            raise ProtocolError(f"array dtype {dt} is not allowed")
        if key == dt.str.encode() and len(_dtypes) < 64:  # (a dtype's own spelling, as clients send it:
            _dtypes[key] = dt  # others, ``int64`` or ``=i8``, filled the cache and ours were parsed each time)
    return dt


def unpack_array(data: bytes) -> np.ndarray:
    """The (read-only) array a `pack_array` payload holds; ProtocolError if malformed."""
    try:
        dlen = data[0]
        dt = _dtype(data[1 : 1 + dlen])
        ndim = data[1 + dlen]
        off = 2 + dlen
        shape = _shapes[ndim].unpack_from(data, off)
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"malformed array: {type(e).__name__}: {e}") from None
    off += 8 * ndim
    count = math.prod(shape)
    if count * dt.itemsize != len(data) - off:
        raise ProtocolError(f"array of shape {shape} {dt} does not match its {len(data) - off} bytes")
    a = np.frombuffer(data, dt, count, off)
    return a if ndim == 1 else a.reshape(shape)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:  # (Python objects: sent as what they are, as `KVPool` reads them)
            return obj.tolist()
        if obj.dtype.kind not in _ALLOWED_KINDS:  # (the daemon refused the whole request, a protocol error)
            raise TypeError(f"cannot send an array of {obj.dtype} over the wire")
        return pack_array(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (tuple, range)):  # (a range of token ids, as `KVPool` takes one)
        return list(obj)
    if type(obj).__module__ == "torch" and hasattr(obj, "numpy"):  # a tensor of token ids, as `KVPool` takes one
        try:
            return pack_array(obj.detach().cpu().numpy())
        except (TypeError, RuntimeError):  # (bfloat16 and the float8 types have no NumPy dtype)
            raise TypeError(f"cannot send a torch tensor of {obj.dtype} over the wire") from None
    if isinstance(obj, int):  # msgpack calls here with an int only when it is out of its range
        raise TypeError(f"cannot send the integer {obj} over the wire: msgpack carries integers in "
                        "[-2**63, 2**64)")
    raise TypeError(f"cannot send a {type(obj).__name__} over the wire")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_NDARRAY:
        return unpack_array(data)
    raise ProtocolError(f"unknown msgpack ext type {code}")


# A Packer keeps its buffer between calls, so one per thread: a daemon in a
# thread and its clients in others (tests, in-process use) pack at once.
_packers = threading.local()


def pack(value: Any) -> bytes:
    """One msgpack message, NumPy arrays as ExtType."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(default=_default, use_bin_type=True, autoreset=True)
    try:
        return packer.pack(value)
    except TypeError as e:
        raise InvalidArgument(str(e)) from None
    except UnicodeEncodeError as e:  # a str with lone surrogates (an undecodable argv or file name)
        raise InvalidArgument(f"cannot send a str over the wire that UTF-8 cannot encode ({e.reason}: "
                              f"{e.object[:64]!r}); pass bytes") from None


#: A request's maps hold argument names (a batch: its ops' argument maps): the
#: most entries one map, and all of a request's maps together, may hold.
MAX_MAP_ENTRIES = 1024
MAX_MAP_ENTRIES_TOTAL = 16384


def unpack(data: bytes, max_containers: int | None = None, max_array_len: int = -1) -> Any:
    """Inverse of `pack`; ProtocolError if the bytes are not one msgpack value.
    ``max_containers``: the most arrays and maps the value may hold (a request's:
    the daemon's bound), their maps at most `MAX_MAP_ENTRIES` entries each and
    `MAX_MAP_ENTRIES_TOTAL` together; ``max_array_len``: the longest array (-1:
    the message's length). An empty array is one byte on the wire and a Python
    list of 56 bytes and more: a 16 MiB request of them took 1.2 GB and four
    seconds of the daemon's loop before its session or token was looked at (one
    map of 2.8M int keys, 420 MB and 0.8 s); past its bounds, decoding stops
    there, with a ProtocolError."""
    hooks: dict[str, Any] = {}
    bounded = max_containers is not None
    if bounded and len(data) > max_containers:  # (each takes a byte at least: else no need)
        left = max_containers
        entries = MAX_MAP_ENTRIES_TOTAL

        def count(value: Any) -> Any:
            nonlocal left
            left -= 1
            if left < 0:
                raise ProtocolError(f"a message holds at most {max_containers} arrays and maps (the daemon's bound "
                                    "from its ids limit, kvpager serve --max-ids); this one holds more")
            return value

        def count_map(value: dict[Any, Any]) -> Any:
            nonlocal entries
            entries -= len(value)
            if entries < 0:
                raise ProtocolError(f"a request's maps hold at most {MAX_MAP_ENTRIES_TOTAL} entries together "
                                    "(argument names); this one holds more")
            return count(value)

        hooks = {"list_hook": count, "object_hook": count_map}
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False,
                               max_array_len=max_array_len, **hooks,
                               **({"max_map_len": MAX_MAP_ENTRIES} if bounded else {}))
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"not a msgpack message: {type(e).__name__}: {e}") from None


def peek_id(data: bytes) -> int | None:
    """The id of a request without decoding the rest of it (for oversized ones)."""
    try:
        up = msgpack.Unpacker(max_buffer_size=len(data) or 1)
        up.feed(data)
        if up.read_array_header() < 2:
            return None
        up.skip()
        rid = up.unpack()
        return rid if isinstance(rid, int) and not isinstance(rid, bool) else None
    except Exception:
        return None
