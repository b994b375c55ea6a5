"""`Client.batch`: several sequence ops of a scheduler step in one round trip.

A pipelined decode loop on a daemon worker makes, each step, an append (the
next pass's slots), a `record_tokens` and a commit (the pass before), and
sometimes a free and a release: one `batch` request carries them all. The
daemon runs them in order, each all or nothing; the first that fails stops
the batch (the ones before it stay done, the rest do not run). This client's
mirror of its block tables follows every op that ran, exactly as the single
calls make it (`follow`), so plans stay right after a partial batch too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvpager.client_tables import id_list, scalar
from kvpager.errors import InvalidArgument, UnsupportedConfiguration
from kvpager.protocol import BATCH_MAX_OPS, decode_batch, decode_slots

#: The `Client` methods a batch may call, and the daemon op each one is.
BATCHED = {"append_flat": "append", "record_tokens": "record_tokens", "commit": "commit", "free": "free",
           "truncate": "truncate", "release_before": "release"}
#: Each method's arguments, in order (``commit``'s ``synchronize`` is a keyword of its own).
_PARAMS = {"append_flat": ("seq_ids", "num_tokens", "token_ids"), "record_tokens": ("seq_ids", "token_ids"),
           "commit": ("seq_ids", "upto"), "free": ("seq_ids",), "truncate": ("seq_ids", "lengths"),
           "release_before": ("seq_ids", "positions")}


def wire_args(method: str, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The daemon op's arguments of a call ``method(*args, **kwargs)`` (InvalidArgument
    for a method a batch cannot call or arguments it does not take)."""
    params = _PARAMS.get(method)
    if params is None:
        raise InvalidArgument(f"batch: {method!r} cannot be batched; a batch calls {', '.join(BATCHED)}")
    if len(args) > len(params) or set(kwargs) - set(params) or set(params[: len(args)]) & set(kwargs):
        raise InvalidArgument(f"batch: {method} takes {', '.join(params)}; got {len(args)} positional "
                              f"and {sorted(kwargs)}")
    named = {**dict(zip(params, args)), **kwargs}
    if "seq_ids" not in named:
        raise InvalidArgument(f"batch: {method} needs seq_ids")
    wire = {k: v for k, v in named.items() if v is not None}
    if method == "append_flat" and "num_tokens" in wire:
        n = wire["num_tokens"] if type(wire["num_tokens"]) is int else scalar(wire["num_tokens"])
        if type(n) is int and n == 1:
            del wire["num_tokens"]  # as a single append sends it
        else:
            wire["num_tokens"] = n
    return wire


def follow(mirror: Any, method: str, wire: dict[str, Any], result: Any) -> Any:
    """Update ``mirror`` from an op that ran; the method's return value."""
    ids = id_list(wire["seq_ids"])
    if method == "append_flat":
        slots = decode_slots(result, 1, None)[0]
        mirror.appended(ids, wire.get("num_tokens", 1), slots)
        return slots
    if method == "free":
        mirror.freed(ids)
    elif method == "truncate":
        mirror.truncated(ids, wire["lengths"])
    elif method == "release_before" and ids is not None:
        mirror.released(ids, result)
    return result


class ClientBatch:
    """Mixed into `Client` (``ops``, ``_mirror``, ``_mutate``, ``synchronize``)."""

    def batch(self, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Make ``calls`` in one round trip: each a tuple (method name, positional
        arguments...) with an optional trailing dict of keyword arguments, e.g.
        ``("record_tokens", ids, tokens)``, ``("commit", ids, {"upto": ends})``,
        ``("append_flat", ids, 1)``. Methods: ``append_flat``, ``record_tokens``,
        ``commit``, ``free``, ``truncate``, ``release_before``, with their usual
        arguments and results (the list of them, in order). They run in order,
        each all or nothing; the first that fails raises its typed error with
        ``index`` (its place in ``calls``) and ``results`` (those of the calls
        before it, which stay done). A ``commit`` waits for this process's
        device writes first, as `commit` does, unless given ``synchronize=False``.
        UnsupportedConfiguration from a daemon that has no ``batch`` op."""
        if "batch" not in self.ops:
            raise UnsupportedConfiguration("this daemon predates the batch op; make the calls one by one")
        if not 0 < len(calls) <= BATCH_MAX_OPS:
            raise InvalidArgument(f"batch: 1 to {BATCH_MAX_OPS} calls, got {len(calls)}")
        methods, wires, touched, wait = [], [], [], False
        for call in calls:
            if not isinstance(call, tuple) or not call or not isinstance(call[0], str):
                raise InvalidArgument(f"batch: each call is a tuple (method name, arguments...), got {call!r}")
            method, *args = call
            kwargs = dict(args.pop()) if args and isinstance(args[-1], dict) else {}
            if method == "commit":
                wait = wait or kwargs.pop("synchronize", True) is not False
            wire = wire_args(method, args, kwargs)
            methods.append(method)
            wires.append(wire)
            touched += id_list(wire["seq_ids"]) or []
        if wait:
            self.synchronize()
        reply = self._mutate("batch", {"ops": [[BATCHED[m], w] for m, w in zip(methods, wires)]}, touched)
        results, error = decode_batch(reply)
        out = [follow(self._mirror, m, w, r) for m, w, r in zip(methods, wires, results)]
        if error is not None:
            exc = error.exception()
            exc.results = out
            raise exc
        return out
