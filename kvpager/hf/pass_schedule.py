"""Which passes run a batch of prompt segments whose rows cannot be padded
(`kvpager.hf.recurrent`): segments resumed from held recurrent states, whose
states a padding token would move, and on the CPU segments from no state, where
padding costs as much as a token.

A pass runs rows of one length, so segments of distinct lengths took a pass
each: 32 conversations' next turns, 32 passes, each a forward of the whole model
over a row or two. Here each segment is cut into parts, run in order, so that
every pass is a length its rows share: no padding, each token computed once,
every segment's last part ending where it ends (its first new token, its states
after it). Three ways, the fewest passes taken (ties: the shortest sum of pass
lengths, what a layer's scan over its rows runs in order):

- ``peel``: the distinct lengths in order; pass j runs the segments that reach
  the j-th length from the one before it (a pass a distinct length, the first
  over every segment);
- ``base``: every segment runs the shortest length, then the rest in powers of
  two from the largest (1 + the distinct bits of the remainders);
- ``bits``: each length in powers of two (its set bits), from the largest; not
  where every segment must be in the first pass (``first_whole``: segments from
  no state start together, from a new cache).

32 lengths from 256 to 768: 32 passes by length, 10 here."""

from __future__ import annotations

from collections.abc import Sequence

#: a pass: (tokens each of its rows runs, the indices of the segments in it)
Pass = tuple[int, list[int]]


def schedule(lens: Sequence[int], *, first_whole: bool = False) -> list[Pass]:
    """Passes that run segments of ``lens`` tokens (each >= 1) in parts, each
    segment's parts in pass order and summing to its length (the module
    docstring); ``first_whole``: every segment in the first pass."""
    if not lens:
        return []
    if min(lens) < 1:
        raise ValueError(f"segments of at least one token, got {min(lens)}")
    ways = [_peel(lens), _base(lens)]
    if not first_whole:
        ways.append(_bits(lens, [0] * len(lens)))
    return min(ways, key=lambda p: (len(p), sum(n for n, _ in p)))


def _peel(lens: Sequence[int]) -> list[Pass]:
    out, done = [], 0
    for n in sorted(set(lens)):
        out.append((n - done, [i for i, m in enumerate(lens) if m >= n]))
        done = n
    return out


def _base(lens: Sequence[int]) -> list[Pass]:
    low = min(lens)
    return [(low, list(range(len(lens)))), *_bits(lens, [low] * len(lens))]


def _bits(lens: Sequence[int], done: Sequence[int]) -> list[Pass]:
    rest = [m - d for m, d in zip(lens, done)]
    top = max(rest).bit_length()
    return [(1 << b, members) for b in range(top - 1, -1, -1)
            if (members := [i for i, r in enumerate(rest) if r >> b & 1])]
