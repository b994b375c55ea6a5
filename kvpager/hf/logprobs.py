"""Log-probabilities of generated tokens (``logprobs=`` of `PagedGeneration` / `generate`).

Each new token's log-probability under the model's own distribution at its
position: the log-softmax of the raw logits of the pass that chose it, in
float32, before any penalty, temperature or filter (what OpenAI's and vLLM's
``logprobs`` report by default). With ``logprobs=k > 0``, also the ``k`` most
likely tokens there and theirs (OpenAI's ``top_logprobs``), most likely first;
tokens tied in their logits come in an unspecified order among themselves.

All of it is computed on the device, right after the pass's logits, into one
small float64 tensor [rows, 1 + 2k] (token ids are exact in float64) that is
copied to the host with the pass's tokens: on a GPU one kernel (a CTA a row, one
read of it: `kvpager.hf.logprob_kernel`, for k up to 32; ties in the top by
lowest id), elsewhere torch's float32 log-softmax, a gather and a top-k
(`torch_logprobs`, the kernel's reference). A decode pass therefore still never waits for the
device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvpager.errors import InvalidArgument
from kvpager.hf import logprob_kernel
from kvpager.validate import described, integer

__all__ = ["Completion", "KeptLogprobs", "TokenLogprobs", "check_logprobs", "torch_logprobs"]


@dataclass
class Completion:
    """One prompt's generation with the log-probabilities of its tokens
    (`generate(..., logprobs=k)`): ``tokens`` as `generate` returns them;
    ``logprobs[j]``: the log-probability of ``tokens[j]``; ``top_logprobs[j]``:
    the ``k`` most likely tokens at that position, ``{token id: log-probability}``
    most likely first (None where ``k`` is 0)."""

    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None = None


def check_logprobs(k: Any, vocab: int | None) -> int | None:
    """``k`` as an int (None stays None): ValueError for anything but None or an
    int from 0 to the model's vocabulary size."""
    if k is None:
        return None
    n = integer(k)  # (a NumPy integer or a 0-d integer tensor: the int it holds)
    if n is None or n < 0:
        raise InvalidArgument(f"logprobs must be None or an int >= 0 (the most likely tokens to report at each "
                              f"position besides the chosen one), got {described(k)}")
    if vocab is not None and n > vocab:
        raise InvalidArgument(f"logprobs={n} asks for more tokens than the model's vocabulary holds ({vocab})")
    return n


def torch_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """float64 [n, 1 + 2k] for the ``n`` rows of ``tokens`` (their logits the first
    ``n`` rows of ``logits`` [>= n, vocab]): each row's token's log-probability, then
    the ``k`` top log-probabilities, then their token ids; by torch's operations (as a
    caller of transformers computes them from a step's logits)."""
    n = tokens.shape[0]
    lp = torch.log_softmax(logits[:n].float(), dim=-1)
    chosen = lp.gather(1, tokens.view(n, 1).long())
    if not k:
        return chosen.double()
    best, ids = torch.topk(lp, k, dim=-1)
    return torch.cat([chosen.double(), best.double(), ids.double()], dim=1)


@dataclass
class TokenLogprobs:
    """What a generation keeps of its tokens' log-probabilities: ``k`` (the top
    tokens reported at each position) and, per row, the values so far."""

    k: int
    rows: int
    values: list[list[float]] = field(init=False)
    top: list[list[dict[int, float]]] | None = field(init=False)
    first: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.values = [[] for _ in range(self.rows)]
        self.top = [[] for _ in range(self.rows)] if self.k else None
        self.first = np.zeros((self.rows, self.width))  # the prefill's rows (`of`, on the host), as its passes run
        self._kernel: logprob_kernel.LogprobKernel | None = None

    @property
    def width(self) -> int:
        """Numbers per row of a packed pass (`of`)."""
        return 1 + 2 * self.k

    def of(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """float64 [n, 1 + 2k] on the logits' device, for the ``n`` rows of ``tokens``
        (their logits the first ``n`` rows of ``logits`` [>= n, vocab]): each row's
        token's log-probability, then the ``k`` top log-probabilities, then their
        token ids. Queued; nothing waits for the device."""
        rows = logits[: tokens.shape[0]]
        if logprob_kernel.usable(rows, self.k):
            if self._kernel is None:
                self._kernel = logprob_kernel.LogprobKernel(rows.device)
            return self._kernel(rows, tokens, self.k)
        return torch_logprobs(logits, tokens, self.k)

    def add(self, row: int, packed: np.ndarray) -> None:
        """Row ``row``'s next token's entry (a row of `of`'s result, on the host)."""
        self.values[row].append(float(packed[0]))
        if self.top is not None:
            k = self.k
            self.top[row].append({int(t): float(v) for v, t in zip(packed[1 : 1 + k], packed[1 + k :])})

    def completions(self, outputs: list[list[int]]) -> list[Completion]:
        """Each row's `Completion` (its tokens ``outputs[row]``)."""
        return [Completion(list(out), self.values[i], None if self.top is None else self.top[i])
                for i, out in enumerate(outputs)]


class KeptLogprobs:
    """What a generation keeps of its tokens' log-probabilities, as its attributes
    (mixed into `PagedGeneration`: its ``_lp``, a `TokenLogprobs` or None, and its
    ``outputs``)."""

    _lp: TokenLogprobs | None
    outputs: list[list[int]]

    @property
    def token_logprobs(self) -> list[list[float]] | None:
        """Per prompt, each new token's log-probability (``logprobs`` set; else None)."""
        return None if self._lp is None else self._lp.values

    @property
    def top_logprobs(self) -> list[list[dict[int, float]]] | None:
        """Per prompt, at each new token's position, the ``logprobs`` most likely tokens'
        log-probabilities, ``{token id: log-probability}`` (``logprobs`` > 0; else None)."""
        return None if self._lp is None else self._lp.top

    def completions(self) -> list[Completion]:
        """Each prompt's `Completion`: its tokens and their log-probabilities (``logprobs`` set)."""
        if self._lp is None:
            raise InvalidArgument("completions: this generation keeps no log-probabilities (give logprobs=)")
        return self._lp.completions(self.outputs)
