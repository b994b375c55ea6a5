"""A model's captured decode steps kept across generations (`CapturedSteps`).

A generation's `DecodeGraphs` go with it; a serving loop that calls
``generate`` again and again would capture every bucket anew each call.
`CapturedSteps` keeps them, one `DecodeGraphs` per kind of caller, checked
against each call (the weights' addresses, the contexts' lengths).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from typing import Any

from kvpager.errors import InvalidArgument
from kvpager.hf.graphs import DecodeGraphs, check_graph_options


class CapturedSteps:
    """A model's captured decode steps over ``pool``, kept across generations:
    ``generate(model, pool, ..., cuda_graphs=steps)`` (or `PagedGeneration`)
    replays the steps an earlier call captured and captures only what is
    missing, where ``cuda_graphs=True`` captures every call's anew (about 45 ms a
    batch-size bucket for a 1B model, more for larger ones: a short generation's
    whole decode may cost less). ``compile``: the steps compiled by
    ``torch.compile``, as ``compile=True`` captures them.

    - The graphs read the model's weights where they were at capture: a call
      finding any parameter or buffer elsewhere (replaced, not updated in
      place) drops them all and captures again. Weights updated in place
      (``copy_``) are read as they are.
    - Steps of greedy passes and of passes that give logits (sampling,
      penalties, ``logprobs``) are kept apart, and so per ``cascade`` setting
      and a beam search's (``beam_search(..., cuda_graphs=steps)``: every beam
      a row) from a generation's.
    - A kept graph whose longest context at capture is more than `graphs.LENGTH_SPAN`
      times off the call's is captured again (its split count was chosen for
      those lengths); tables outgrowing the graphs' width capture them all again
      twice as wide, as within a call.
    - One generation at a time: a call while another generation holds them
      (not closed yet, in this thread or another) is refused; `close` (or
      leaving a ``with`` block) frees the graphs and their memory.
    - A model with recurrent layers: its graphs read and write the states of
      the bucket's rows at fixed addresses, kept with them; each call's rows are
      loaded into those (`kvpager.hf.recurrent_states.fixed_states`), and a call
      of more rows than they hold makes larger ones, its graphs captured again.
    """

    def __init__(self, model: Any, pool: Any, *, compile: bool = False):
        check_graph_options(model, pool, True, compile)
        self.model, self.pool, self.compile = model, pool, bool(compile)
        self._sets: dict[tuple[str, bool, Any], DecodeGraphs] = {}
        self._weights = self._where_weights_are()
        self._user: weakref.ref[Any] | None = None
        self._lock = threading.Lock()
        self._dropped = 0  # captures of graphs dropped
        self.closed = False

    @property
    def captures(self) -> int:
        """Graphs captured so far, over every call (those dropped included)."""
        return sum(g.captures for g in self._sets.values()) + self._dropped

    def _where_weights_are(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in itertools.chain(self.model.parameters(), self.model.buffers()))

    def take(self, user: Any, model: Any, pool: Any, make_batch: Callable[[Any], Any], width: int,
             cascade: bool | None, logits: bool, compile: bool, kind: str = "generate",
             forward: Callable[..., Any] | None = None) -> DecodeGraphs:
        """The steps for ``user`` (a generation or a beam search, ``kind``; held until
        `release`; ``forward``: the step it captures, where not the model's own pass:
        one over its recurrent states): InvalidArgument for another model or pool,
        ``compile`` where these are not, closed steps, or steps another generation
        holds."""
        if model is not self.model or pool is not self.pool:
            raise InvalidArgument("these CapturedSteps were made for another model or pool; make them for this one")
        if compile and not self.compile:
            raise InvalidArgument("compile=True with CapturedSteps made without it: make them with "
                                  "CapturedSteps(model, pool, compile=True)")
        with self._lock:
            if self.closed:
                raise InvalidArgument("these CapturedSteps are closed; make new ones")
            held = self._user() if self._user is not None else None
            if held is not None and held is not user and not getattr(held, "_closed", True):
                raise InvalidArgument("these CapturedSteps serve another generation, not closed yet: one "
                                      "generation at a time replays them (close it, or give this one its own)")
            self._user = weakref.ref(user)
        weights = self._where_weights_are()
        if weights != self._weights:  # (the graphs would read the old memory)
            self._drop()
            self._weights = weights
        key = (kind, bool(logits), cascade)
        graphs = self._sets.get(key)
        if graphs is None:
            graphs = self._sets[key] = DecodeGraphs(model, pool, make_batch, width, cascade=cascade,
                                                    compile=self.compile, forward=forward)
        else:
            graphs.rejoin(make_batch, forward)
        return graphs

    def release(self, user: Any) -> None:
        """``user`` is done with the steps (its generation closed); closed steps go now."""
        with self._lock:
            if self._user is not None and self._user() is user:
                self._user = None
                drop = self.closed
            else:
                drop = False
        if drop:
            self._drop()

    def _drop(self) -> None:
        self._dropped += sum(g.captures for g in self._sets.values())
        for graphs in self._sets.values():
            graphs.graphs.clear()
            graphs.last = graphs.states = None
        self._sets.clear()

    def close(self) -> None:
        """Free the graphs and their memory (once the generation holding them, if any,
        closes: its step in flight may still be reading a graph's output); later
        calls with them are refused."""
        with self._lock:
            self.closed = True
            held = self._user() if self._user is not None else None
            if held is not None and not getattr(held, "_closed", True):
                return  # (its `release` drops them)
            self._user = None
        self._drop()

    def __enter__(self) -> CapturedSteps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
