"""Pipelined decode steps: the next pass is launched before the last one's tokens reach the host.

A greedy decode step needs the previous step's tokens only as the model's
input ids, and those can stay on the device. So, as serving engines schedule
asynchronously, `PagedGeneration` (with ``pipeline=True``, where the pool has
`record_tokens`) runs each step as

1. launch pass t+1: take its slots (`append` without token ids), refill its
   plan, gather its input ids from pass t's output on the device, run the
   forward pass (or replay its CUDA graph), and queue a copy of its tokens to
   pinned host memory;
2. complete pass t: wait for its copy, record its tokens as the ids of the
   slots pass t+1 took (`record_tokens`), commit what pass t wrote, and
   update the outputs.

The host's work for pass t+1 (the allocator, the plan, the model's Python)
overlaps the device's for pass t, and no step waits for the device to drain.

In steady steps (the same sequences pass after pass, none ending, no window
releasing blocks) the pool is told the ids and commits of up to a block's
worth of passes at once (`Owed`): one `record_tokens` of a column per pass and
one `commit`, where each pass would cost both calls' fixed work (more than
a quarter of an eager step's host time outside the model at batch 64). Each
sequence then publishes the block its ids completed up to that many passes
later, always before it is freed; a step where anything changes (a sequence
ends, a pass carries fewer rows), `close` and the last pass settle at once.
A sequence that ends on an end token in pass t has already been fed to pass
t+1: that pass's token for it is dropped, and its blocks go back once pass
t+1 has completed (its write must land before anyone else can take them).
The results are the same as the unpipelined loop's, token for token.

`DecodePasses` also holds what every pass, pipelined or not, does with its
tokens (commit, outputs, finished sequences, windows' blocks) and gives back
the slots of a pass whose forward failed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from kvpager.batch_calls import one_by_one
from kvpager.errors import KVPagerError, LimitExceeded
from kvpager.hf.passes import Owed, Pass, fed_tokens, queue_copy, to_device

#: The most token ids owed at once (`Owed`): a daemon's default tokens limit for one
#: request (`kvpager.limits.Limits.tokens`), so a default daemon never refuses them.
OWED_TOKENS = 1 << 20


class DecodePasses:
    """What `PagedGeneration` does around its forward passes (mixed into it): the
    `_launch` of a decode pass and its `_complete` (pipelined: one pass later),
    the prefill's `_record` (commit, outputs, finished sequences freed, windows'
    blocks released), and giving back the slots of a pass that failed
    (`_undo_append_on_error`)."""

    def _launch(self) -> Pass | None:
        """Launch the next decode pass of the sequences that will still need a
        token once the pass in flight (if any) has given its own; None if none."""
        prev = self._inflight
        ahead = prev is not None  # each row's newest token is still on the device
        rows = [i for i in (prev.rows if ahead else range(len(self.finished)))
                if not self.finished[i] and len(self.outputs[i]) + ahead < self._most[i]]
        if not rows:
            return None
        same = ahead and rows == prev.rows  # a steady step: the last pass's rows, a position further
        if same:
            rows = prev.rows  # the same list: `_complete` and `_owe` compare it by identity first
        ids = prev.seq_ids if same else [self.seq_ids[i] for i in rows]
        if same:
            positions = [p + 1 for p in prev.positions]
        else:
            positions = [len(self.prompts[i]) + len(self.outputs[i]) - 1 + ahead for i in rows]
        last = None if ahead else [[self.outputs[i][-1]] for i in rows]
        slots = self._append(ids, last)  # ahead: the ids come with `record_tokens`
        with self._undo_append_on_error(ids, positions):  # a pass that fails gives its slots back
            input_ids = fed_tokens(prev, rows) if prev is not None else to_device([t for [t] in last], self._device)
            # (the device adds one where the host would build and copy the same row)
            position_ids = prev.position_ids + 1 if same else to_device(positions, self._device)
            if self._recurrent is not None:  # the states of the rows that ended go
                self._recurrent.keep(rows)
            if self._graphs is not None:
                out = self._graphs.launch(ids, input_ids, position_ids, slots)
                reads = self._graphs.last
            else:  # (an eager decode step of the last one's sequences refills its plan: `DecodePlans`)
                reads = self._plans.plan(ids, np.ones(len(ids), dtype=np.int64), slots, max(positions) + 1)
                if self._recurrent is not None:  # rows of a token each, with their recurrent states
                    out = self._recurrent.decode(reads, input_ids, position_ids)
                else:
                    out = self._forward(reads, input_ids, position_ids)
            # (the pass gave logits where sampled or logprobs are kept: each row chooses its next new token)
            tokens = self._choose(out, rows, [len(self.outputs[i]) + ahead for i in rows])
            # (copied before the tokens: their event covers both)
            logprobs = None if self._lp is None else queue_copy(self._lp.of(out, tokens), self._host_logprobs,
                                                                 record=False)[0]
            if self._recurrent is not None and not ahead:  # rows whose last block the pass filled, marked
                self._recurrent.stepped(positions)  # (a pass ahead: once the pass before it completes)
        host, event = queue_copy(tokens, self._host_tokens)
        return Pass(rows, ids, positions, position_ids, tokens, host, event, reads, logprobs=logprobs)

    def _complete(self, done: Pass) -> None:
        """Complete ``done`` (pipelined: the pass before the one in flight, whose slots
        get ``done``'s tokens as their ids): what it wrote is committed, and the
        outputs and finished sequences are updated. A steady step's ids and commit
        are owed (`_owe`) until a block's worth of them, or a step that is not steady."""
        tokens = done.read()
        nxt = self._inflight
        ended = self._update(done.rows, tokens, done.read_logprobs())
        if self._recurrent is not None and nxt is not None:
            # The pass in flight filled some rows' last blocks: marked now, queued before the
            # pass after it, except rows that it ran past their end token (ended now).
            stop = set(ended)
            self._recurrent.stepped(nxt.positions, [k for k, i in enumerate(nxt.rows) if i in stop] if stop else ())
        if nxt is not None and not ended and not done.free_after and self._may_owe and (
                nxt.rows is done.rows or nxt.rows == done.rows):
            self._owe(done, tokens)
            return
        self._settle()
        if nxt is not None:
            # The ids of the slots the pass in flight took: ``done``'s tokens, as one int64
            # array [n, 1]. A row that ended now (an end token) was fed that token all the
            # same, but it is dropped: no id is recorded for its slot, which is then never
            # published, and the pool ends as the unpipelined loop leaves it.
            stop = set(ended)
            rows = [i for i in nxt.rows if i not in stop] if stop else nxt.rows
            if rows:
                of = tokens if rows == done.rows else map(dict(zip(done.rows, tokens)).__getitem__, rows)
                ids = nxt.seq_ids if rows is nxt.rows else [self.seq_ids[i] for i in rows]
                self._later("record_tokens", ids, np.fromiter(of, np.int64, len(rows)).reshape(-1, 1))
        # ``done``'s writes have landed (its event): no wait for the pass in flight
        self._later("commit", done.seq_ids, [p + 1 for p in done.positions], synchronize=False)
        fed = set(nxt.rows) if nxt is not None else ()
        # a row the next pass was fed to keeps its blocks until that pass has written them
        if nxt is not None:
            nxt.free_after += [self.seq_ids[i] for i in ended if i in fed]
        self._free([self.seq_ids[i] for i in ended if i not in fed] + done.free_after)
        self._release([i for i in done.rows if not self.finished[i]])
        if nxt is None:  # no pass in flight to carry them
            self._flush()

    def _owe(self, done: Pass, tokens: list[int]) -> None:
        """Keep a steady step's ids (``done``'s tokens, for the slots the pass in
        flight took, which are ``done``'s rows) and its commit for later; settle
        once a block's worth of passes is owed."""
        owed = self._owed
        if owed is not None and owed.rows is not done.rows and owed.rows != done.rows:
            self._settle()
            owed = None
        if owed is None:
            # a block's worth of passes, within a default daemon's tokens limit for a call
            cap = min(self.pool.spec.block_size, max(1, OWED_TOKENS // len(done.rows)))
            owed = self._owed = Owed(done.rows, done.seq_ids, np.empty((len(done.rows), cap), np.int64))
        owed.tokens[:, owed.count] = tokens
        owed.count += 1
        owed.upto = done.positions  # written through each row's fed token
        if owed.count == owed.tokens.shape[1]:
            self._settle()

    def _settle(self) -> None:
        """Tell the pool what is owed (`Owed`): the ids, then the commit; carried by
        the next call like every `_later` call."""
        owed, self._owed = self._owed, None
        if owed is not None and owed.count:
            self._later("record_tokens", owed.seq_ids, np.ascontiguousarray(owed.tokens[:, : owed.count]))
            self._later("commit", owed.seq_ids, [p + 1 for p in owed.upto], synchronize=False)

    def _later(self, method: str, *args: Any, **kwargs: Any) -> None:
        """A call on the pool that the next pass's append carries where the pool
        batches (a daemon `Client`: `Client.batch`, so a pipelined step is one round
        trip); made at once elsewhere."""
        if self._batched:
            self._deferred.append((method, *args, kwargs) if kwargs else (method, *args))
            return
        try:
            getattr(self.pool, method)(*args, **kwargs)
        except LimitExceeded as e:
            if not self._owed_ids_refused((method, *args), e):
                raise
            self._may_owe = False  # a pass's ids a call from now on
            for _, *call in self._one_pass_each(*args):
                self.pool.record_tokens(*call)

    @staticmethod
    def _owed_ids_refused(call: tuple[Any, ...], error: KVPagerError) -> bool:
        """Whether ``error`` is a daemon's tokens limit refusing the ids of several
        owed passes in one `record_tokens` (``call``), where each pass's alone may fit."""
        return (call[0] == "record_tokens" and getattr(error, "limit", None) == "tokens"
                and isinstance(call[2], np.ndarray) and call[2].ndim == 2 and call[2].shape[1] > 1)

    @staticmethod
    def _one_pass_each(seq_ids: list[int], tokens: np.ndarray) -> list[tuple[Any, ...]]:
        """Owed passes' ids (``tokens``, a column a pass) as a `record_tokens` call a pass."""
        return [("record_tokens", seq_ids, np.ascontiguousarray(tokens[:, j : j + 1])) for j in range(tokens.shape[1])]

    def _flush(self) -> None:
        """Make the calls `_later` kept, in one batch."""
        if self._deferred:
            calls, self._deferred = self._deferred, []
            self._send(calls)

    def _append(self, ids: list[int], last: list[list[int]] | None) -> Any:
        """One slot for each of ``ids`` (with ``last``'s ids, or none yet), after the calls kept."""
        if self._deferred:
            calls, self._deferred = self._deferred, []
            return self._send([*calls, ("append_flat", ids, 1, last)])[-1]
        return self.pool.append_flat(ids, 1, last)

    def _send(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        """``calls`` in one batch; one by one from then on where the daemon's limits
        refuse a step's calls together (each within them alone). Where a call
        fails, the calls from it on did not run: the sequences they would have
        freed are held again, so `close` frees them."""
        try:
            try:
                return self.pool.batch(calls)
            except LimitExceeded as e:
                if getattr(e, "index", None) is not None:  # one of them failed on its own
                    raise
                self._batched = False
                return one_by_one(self.pool, calls)
        except KVPagerError as e:  # typed: the daemon says which ran (its ``results``)
            k = getattr(e, "index", None)
            if k is not None and self._owed_ids_refused(calls[k], e):
                # Owed passes' ids over the daemon's tokens limit together (a small limit, a big
                # batch): the calls before ran; that one goes a pass's ids a call, and owing stops.
                self._may_owe = False
                split = self._one_pass_each(*calls[k][1:])
                rest = self._send([*split, *calls[k + 1 :]])
                return [*e.results, None, *rest[len(split) :]]
            ran = len(getattr(e, "results", None) or ())
            self._held.update(s for method, *args in calls[ran:] if method == "free" for s in args[0])
            raise

    @contextlib.contextmanager
    def _undo_append_on_error(self, ids: list[int], lengths: list[int]) -> Iterator[None]:
        """A pass that fails before it ran (the forward raised: out of device memory,
        an interrupt) gives back the slots it took: the sequences go back to
        ``lengths`` tokens, so the next step feeds the same tokens at the same positions."""
        try:
            yield
        except BaseException:
            self.pool.truncate(ids, lengths)
            raise

    def _record(self, rows: list[int], ids: list[int], next_tokens: list[int],
                logprobs: np.ndarray | None = None) -> None:
        """The prefill's tokens (and their packed log-probabilities, where kept):
        commit, outputs, finished sequences freed, windows' blocks released."""
        if hasattr(self.pool, "synchronize"):
            self.pool.synchronize()
        self.pool.commit(ids)
        ended = self._update(rows, next_tokens, logprobs)
        self._free([self.seq_ids[i] for i in ended])  # a finished sequence's blocks go back at once
        self._release([i for i in rows if not self.finished[i]])
        self._flush()

    def _update(self, rows: list[int], next_tokens: list[int], logprobs: np.ndarray | None = None) -> list[int]:
        """Append each unfinished row's next token to its outputs (and its packed
        log-probabilities, a row of ``logprobs`` each, to what is kept); the rows that end now."""
        ended = []
        finished, outputs, most, eos, stops = self.finished, self.outputs, self._most, self._eos, self._stops
        for k, (i, t) in enumerate(zip(rows, next_tokens)):
            if finished[i]:  # ended on an end token the pass before: this token is past it
                continue
            out = outputs[i]
            out.append(int(t))
            if logprobs is not None:
                self._lp.add(i, logprobs[k])
            if len(out) >= most[i] or t in eos or (t in stops and any(
                    len(out) >= len(s) and tuple(out[-len(s):]) == s for s in stops[t])):
                finished[i] = True
                ended.append(i)
        return ended

    def _releases_windows(self) -> bool:
        """Whether each step gives back the blocks no window reads again (`_release`)."""
        windows = self._windows
        return bool(self.release_windowed and windows and None not in windows and hasattr(self.pool, "release_before"))

    def _release(self, live: list[int]) -> None:
        """In a model whose every layer has a sliding window, give back the blocks no
        window of ``live``'s next query reads again (pipelined: the query in flight)."""
        if live and self._releases_windows():
            # the next query of sequence i sits at position(i) and sees positions after position(i) - w
            reach = max(self._windows)
            self._later("release_before", [self.seq_ids[i] for i in live],
                        [max(0, self.position(i) - reach + 1) for i in live])

    def _free(self, seq_ids: list[int]) -> None:
        seq_ids = [s for s in seq_ids if s in self._held]
        if seq_ids:
            self._later("free", seq_ids)
            self._held.difference_update(seq_ids)
