"""What one decode pass carries and the device-side helpers of the pipelined loop
(`kvpager.hf.pipeline`): the pass in flight (`Pass`), what steady passes owe the
pool (`Owed`), the pinned buffers and events its tokens are copied through
(`HostBuffers`, `queue_copy`; its log-probabilities' too, where kept), and input ids made on the device (`to_device`,
`fed_tokens`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Pass:
    """A decode pass launched and not yet completed."""

    rows: list[int]  # indices of the generation's sequences, in the pass's order
    seq_ids: list[int]
    positions: list[int]  # the position each row's fed token sits at
    position_ids: torch.Tensor  # [1, n] ``positions``, on the model's device
    tokens: torch.Tensor  # [n] the pass's tokens (greedy or drawn), on the model's device
    host: torch.Tensor  # [>= n] where they are copied to (pinned on a GPU)
    event: Any  # a torch.cuda.Event recorded after that copy; None on the CPU
    #: what the pass's kernels read (its plan, or its captured graph and plan): kept alive
    #: until the pass completes, whatever the generation plans or captures meanwhile
    reads: Any = None
    free_after: list[int] = field(default_factory=list)  # sequences to free once this pass completes
    #: [n, width] its tokens' packed log-probabilities (`kvpager.hf.logprobs`), where the generation
    #: keeps them: on the host, copied before ``event``
    logprobs: Any = None

    def read(self) -> list[int]:
        """The pass's tokens (waits for their copy)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host[: len(self.rows)].tolist()

    def read_logprobs(self) -> np.ndarray | None:
        """The pass's packed log-probabilities (after `read`), None where not kept."""
        return None if self.logprobs is None else self.logprobs.numpy()


@dataclass
class Owed:
    """What steady pipelined passes owe the pool (`DecodePasses._owe`): the ids of
    the slots each next pass took, a column a pass, and the commit of the last
    completed pass's writes."""

    rows: list[int]
    seq_ids: list[int]
    tokens: np.ndarray  # int64 [len(rows), capacity]; columns [0, count) filled
    upto: list[int] = field(default_factory=list)  # each row's tokens whose K/V is written
    count: int = 0


class HostBuffers:
    """Pinned host buffers (of ``dtype``) for passes' tokens and the events recorded after their
    copies, two of each taking turns (a pass's buffer is read, its event waited
    for, before the pass two later is launched), grown as needed. Events are
    made once: a new one costs a driver call a pass (11-13 us on an H200's host)."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.long):
        self.device = device
        self.dtype = dtype
        self.bufs: list[torch.Tensor] = []
        self.events: list[Any] = []
        self.turn = 0

    def take(self, n: int) -> tuple[torch.Tensor, Any]:
        """This turn's buffer of at least ``n`` and its event (None on the CPU)."""
        self.turn ^= 1
        if len(self.bufs) < 2:
            self.bufs = [self._new(n), self._new(n)]
            self.events = [torch.cuda.Event() for _ in range(2)] if self.device.type == "cuda" else [None, None]
        if self.bufs[self.turn].numel() < n:
            self.bufs[self.turn] = self._new(max(n, 2 * self.bufs[self.turn].numel()))
        return self.bufs[self.turn], self.events[self.turn]

    def _new(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=self.dtype, pin_memory=self.device.type == "cuda")


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """[1, n] int64 on ``device`` without waiting for it (`array_to_device`)."""
    return array_to_device(np.asarray([values], dtype=np.int64), device)


def array_to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """``host`` (a new array: on the CPU its memory is taken as it is) on ``device``
    without waiting for it: a pinned staging tensor and an asynchronous copy
    (torch's host allocator keeps the staging memory until the copy ran). The
    staging tensor is taken pinned and filled, not built and then pinned (a
    second tensor and a copy: 14-17 against 18-20 us a call on an H200's host)."""
    if device.type != "cuda":
        return torch.from_numpy(host)
    t = torch.empty(host.shape, dtype=torch.from_numpy(host[:0]).dtype, pin_memory=True)
    t.numpy()[...] = host
    return t.to(device, non_blocking=True)


def fed_tokens(prev: Pass, rows: list[int]) -> torch.Tensor:
    """[1, n] input ids of the next pass over ``rows`` (a subsequence of ``prev``'s):
    ``prev``'s tokens for them, gathered on the device."""
    if rows == prev.rows:
        return prev.tokens.view(1, -1)
    where = {r: k for k, r in enumerate(prev.rows)}
    index = to_device([where[r] for r in rows], prev.tokens.device)[0]
    return prev.tokens.index_select(0, index).view(1, -1)


def queue_copy(values: torch.Tensor, buffers: HostBuffers, record: bool = True) -> tuple[torch.Tensor, Any]:
    """Queue the copy of a pass's ``values`` (its tokens, or their packed
    log-probabilities) to a host buffer; (its view of ``values``' shape, the event
    recorded after the copy: None where not ``record``, or on the CPU, where
    ``values`` are their own host copy)."""
    if values.device.type != "cuda":
        return values, None
    host, event = buffers.take(values.numel())
    host = host[: values.numel()].view(values.shape)
    host.copy_(values, non_blocking=True)  # on the current stream of the values' GPU
    if not record:
        return host, None
    event.record(torch.cuda.current_stream(values.device))  # that GPU's, whichever is current
    return host, event
