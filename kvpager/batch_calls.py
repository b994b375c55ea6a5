"""`batch`: several sequence calls of a scheduler step at once, the same on an
embedded `KVPool` (`PoolBatch`) and on a daemon `Client` (one round trip:
`kvpager.client_batch`).

A call is a tuple (method name, positional arguments...) with an optional
trailing dict of keyword arguments, e.g. ``("record_tokens", ids, tokens)``,
``("commit", ids, {"upto": ends})``, ``("append_flat", ids, 1)``. The calls
run in order, each all or nothing; the first that fails raises its typed
error with ``index`` (its place in the calls) and ``results`` (those of the
calls before it, which stay done); the rest do not run. A batch a call of which
cannot be made (no such method, arguments it does not take, one it needs
missing or None, a flag that is no bool) is refused whole, before any runs,
by a `KVPool` as by a `Client`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvpager.errors import InvalidArgument, KVPagerError, LimitExceeded, UnknownSequence
from kvpager.protocol import BATCH_MAX_OPS
from kvpager.validate import counts, flag

#: The methods a batch may call, and the daemon op each one is.
BATCHED = {"append_flat": "append", "record_tokens": "record_tokens", "commit": "commit", "free": "free",
           "truncate": "truncate", "release_before": "release"}
#: Each method's arguments, in order (``commit`` also takes ``synchronize``, a keyword).
PARAMS = {"append_flat": ("seq_ids", "num_tokens", "token_ids"), "record_tokens": ("seq_ids", "token_ids"),
          "commit": ("seq_ids", "upto"), "free": ("seq_ids",), "truncate": ("seq_ids", "lengths"),
          "release_before": ("seq_ids", "positions")}
#: The arguments each method cannot do without (nor take as None).
REQUIRED = {"append_flat": ("seq_ids",), "record_tokens": ("seq_ids", "token_ids"), "commit": ("seq_ids",),
            "free": ("seq_ids",), "truncate": ("seq_ids", "lengths"), "release_before": ("seq_ids", "positions")}


def parse_calls(calls: Sequence[Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Each call as (method, its arguments by name, its other keywords: ``synchronize``
    of a commit); InvalidArgument for anything a batch cannot make, before any runs."""
    if not isinstance(calls, (list, tuple)) or not 0 < len(calls) <= BATCH_MAX_OPS:
        raise InvalidArgument(f"batch: a list of 1 to {BATCH_MAX_OPS} calls, got {calls!r:.80}")
    out = []
    for call in calls:
        if not isinstance(call, (tuple, list)) or not call or not isinstance(call[0], str):
            raise InvalidArgument(f"batch: each call is a tuple (method name, arguments...), got {call!r:.80}")
        method, *args = call
        kwargs = dict(args.pop()) if args and isinstance(args[-1], dict) else {}
        params = PARAMS.get(method)
        if params is None:
            raise InvalidArgument(f"batch: {method!r} cannot be batched; a batch calls {', '.join(BATCHED)}")
        extra = {"synchronize": kwargs.pop("synchronize")} if method == "commit" and "synchronize" in kwargs else {}
        if len(args) > len(params) or set(kwargs) - set(params) or set(params[: len(args)]) & set(kwargs):
            raise InvalidArgument(f"batch: {method} takes {', '.join(params)}; got {len(args)} positional "
                                  f"and {sorted(map(repr, kwargs))}")  # (keys of any kind: repr sorts them)
        named = {**dict(zip(params, args)), **kwargs}
        missing = [p for p in REQUIRED[method] if named.get(p) is None]
        if missing:  # (checked before any call runs: a KVPool ran the calls before it, then a TypeError)
            raise InvalidArgument(f"batch: {method} needs {', '.join(missing)}")
        if method == "append_flat" and "num_tokens" in named and named["num_tokens"] is None:
            counts(None)  # refused, as a single append refuses it
        if "synchronize" in extra:
            flag(extra["synchronize"], "batch: commit's synchronize")
        out.append((method, named, extra))
    return out


def stopped(error: KVPagerError, index: int, results: list[Any]) -> KVPagerError:
    """``error`` of the call at ``index``, with that index and the results before it."""
    error.index = index
    error.results = results
    return error


def one_by_one(pool: Any, calls: Sequence[Any]) -> list[Any]:
    """Make ``calls`` on ``pool`` (a `KVPool` or a `Client`) as single calls, with a
    batch's results and its stop at the first that fails."""
    results: list[Any] = []
    for i, (method, named, extra) in enumerate(parse_calls(calls)):
        try:
            results.append(getattr(pool, method)(**named, **extra))
        except KVPagerError as e:
            raise stopped(e, i, results) from None
    return results


def free_all(pool: Any, seq_ids: list[int]) -> None:
    """Free ``seq_ids`` on ``pool`` whatever stood in the way of one call: an id no
    longer live (freed by a request that timed out and ran later, when the client
    sent it again) is left out, and a list over a daemon's ids limit is freed in
    halves (a cleanup after the limit refused a step's call was refused by it too,
    leaving every sequence held and hiding the step's error)."""
    ids = list(seq_ids)
    while ids:
        try:
            pool.free(ids)
            return
        except UnknownSequence as e:
            if e.seq_id not in ids:
                raise
            ids.remove(e.seq_id)
        except LimitExceeded:
            if len(ids) < 2:
                raise
            half = len(ids) // 2
            free_all(pool, ids[:half])
            free_all(pool, ids[half:])
            return


class PoolBatch:
    """Mixed into `KVPool`: `batch` as a daemon `Client` makes it, here call by call."""

    def batch(self, calls: Sequence[Any]) -> list[Any]:
        """Make ``calls`` (see `kvpager.batch_calls`): ``append_flat``,
        ``record_tokens``, ``commit``, ``free``, ``truncate``, ``release_before``,
        with their usual arguments; their results, in order."""
        return one_by_one(self, calls)
