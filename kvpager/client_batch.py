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

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kvpager.batch_calls import BATCHED, parse_calls, stopped
from kvpager.client_ids import packed, packed_rows, read_ids, scalar
from kvpager.client_seqs import one_shot_counts
from kvpager.errors import InternalError, InvalidArgument, UnsupportedConfiguration
from kvpager.protocol import decode_batch, decode_slots
from kvpager.protocol_codec import pack, pack_array


def wire_args(method: str, named: dict[str, Any]) -> dict[str, Any]:
    """The daemon op's arguments of a call of ``method`` with arguments ``named``."""
    wire = {k: v for k, v in named.items() if v is not None}  # (a None count refused: `parse_calls`)
    if method == "append_flat" and "num_tokens" in wire:
        n = wire["num_tokens"] if type(wire["num_tokens"]) is int else scalar(one_shot_counts(wire["num_tokens"]))
        if type(n) is int and n == 1:
            del wire["num_tokens"]  # as a single append sends it
        else:
            wire["num_tokens"] = n
    return wire


def on_wire(wire: dict[str, Any], ids: Any) -> dict[str, Any]:
    """``wire`` as the request carries it, its ``seq_ids`` sent as ``ids``; large
    lists of token ids and ``upto`` packed (`packed_rows`, `packed`)."""
    out = dict(wire, seq_ids=ids)
    if "token_ids" in out:
        out["token_ids"] = packed_rows(out["token_ids"])
    if "upto" in out:
        out["upto"] = packed(out["upto"])
    return out


def follow(mirror: Any, method: str, wire: dict[str, Any], ids: list[int] | None, result: Any) -> Any:
    """Update ``mirror`` from an op that ran (on ``ids``, its ``seq_ids`` as
    `id_list` reads them; None where it could not read them, though the daemon
    took them: the mirror then loses track, `TableMirror.lost_track`); the
    method's return value."""
    if method == "append_flat":
        slots = decode_slots(result, 1, None)[0]
        if ids is None:
            mirror.lost_track()
        else:
            mirror.appended(ids, wire.get("num_tokens", 1), slots)
        return slots
    if ids is None and method in ("free", "truncate", "release_before", "commit"):
        mirror.lost_track()
        return result
    if method == "free":
        mirror.freed(ids)
    elif method == "commit":
        mirror.committed(ids, wire.get("upto"))
    elif method == "truncate":
        mirror.truncated(ids, wire["lengths"])
    elif method == "release_before" and ids is not None:
        mirror.released(ids, result)
    return result


class ClientBatch:
    """Mixed into `Client` (``ops``, ``_mirror``, ``_mutate``, ``synchronize``)."""

    def batch(self, calls: Sequence[Any]) -> list[Any]:
        """Make ``calls`` in one round trip (see `kvpager.batch_calls`: a tuple
        (method name, positional arguments...) each, with an optional trailing dict
        of keyword arguments): ``append_flat``, ``record_tokens``, ``commit``,
        ``free``, ``truncate``, ``release_before``, with their usual arguments and
        results (the list of them, in order). They run in order, each all or
        nothing; the first that fails raises its typed error with ``index`` and
        ``results`` (of the calls before it, which stay done). A ``commit`` waits
        for this process's device writes first, as `commit` does, unless given
        ``synchronize=False``. UnsupportedConfiguration from a daemon that has no
        ``batch`` op."""
        if "batch" not in self.ops:
            raise UnsupportedConfiguration("this daemon predates the batch op; make the calls one by one")
        parsed = parse_calls(calls)
        # A step's ops mostly share one list of ids: each list is read, packed and
        # encoded once (an ExtType goes into the message as it is).
        seen: dict[int, tuple[list[int] | None, Any]] = {}
        wires: list[dict[str, Any]] = []
        refused: InvalidArgument | None = None  # a call refused here: those before it run, as `KVPool.batch` runs them
        try:
            for method, named, _ in parsed:
                w = wire_args(method, named)
                v = w["seq_ids"]
                if id(v) not in seen:
                    checked, sent = read_ids(v)
                    seen[id(v)] = (checked, pack_array(sent) if isinstance(sent, np.ndarray) else sent)
                wires.append(w)
        except InvalidArgument as e:
            refused = e
        if any(extra.get("synchronize", True) for method, _, extra in parsed[: len(wires)] if method == "commit"):
            self.synchronize()  # (the flags checked by `parse_calls`)
        ids = [seen[id(w["seq_ids"])][0] for w in wires]
        ops = [[BATCHED[m], on_wire(w, seen[id(w["seq_ids"])][1])] for (m, _, _), w in zip(parsed, wires)]
        followed: list[Any] = []  # [(the calls' results, the error that stopped the batch)]

        def follow_all(reply: Any) -> None:  # (in `_mutate`: an exception while it runs forgets the ids)
            results, error = decode_batch(reply)
            followed.append(([follow(self._mirror, m, w, i, r) for (m, _, _), w, i, r
                              in zip(parsed, wires, ids, results)], error))

        try:
            self._send(ops, ids, refused, follow_all)
        except InvalidArgument as e:
            k = unsendable(ops)  # (a value the wire cannot carry, an int past 64 bits: nothing was sent)
            if k is None:
                raise
            refused, ops, wires, ids = e, ops[:k], wires[:k], ids[:k]
            self._send(ops, ids, refused, follow_all)
        [(out, error)] = followed
        if error is not None:
            exc = error.exception()
            if isinstance(exc, InternalError):  # (a daemon bug mid-op: it may have applied, as `_mutate` has it)
                failed = ids[len(out)]
                if failed is None:
                    self._mirror.lost_track()
                elif failed:
                    self._mirror.forget(failed)
            raise stopped(exc, len(out), out)
        if refused is not None:
            raise stopped(refused, len(out), out)
        return out

    def _send(self, ops: list[Any], ids: list[list[int] | None], refused: InvalidArgument | None,
              then: Callable[[Any], None]) -> Any:
        """The batch request of ``ops`` (on ``ids``, `read_ids`' readings), its reply
        given to ``then``; ``refused`` (with index 0) where no call comes before the
        one refused here."""
        if not ops:
            raise stopped(refused, 0, [])  # type: ignore[arg-type] - (ops are cut only where one was refused)
        # (an op's ids not read here: an unclear outcome loses track, as a success of that op does)
        every = None if any(each is None for each in ids) else [s for each in ids for s in each]
        return self._mutate("batch", {"ops": ops}, every, then, always=True)


def unsendable(ops: list[Any]) -> int | None:
    """The first of a batch's ``ops`` the wire cannot carry (an int past 64 bits), or None."""
    for k, op in enumerate(ops):
        try:
            pack(op)
        except InvalidArgument:
            return k
    return None
