"""Independent float64 references computed from dense, contiguous K/V.

Nothing here reads the paged pool: tests keep their own dense copy of every
sequence's K/V and compare the pool's answers with these."""

from __future__ import annotations

import numpy as np


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, window: int | None = None,
              softcap: float | None = None, sinks: np.ndarray | None = None) -> np.ndarray:
    """Causal attention for the last ``len(q)`` positions of one sequence.

    q: [ql, Hq, D]; k, v: [n, H, D] dense (position order). Float64 throughout,
    one query head at a time, GQA by integer division of the head index.
    ``window``: position p sees positions p - window + 1 .. p (transformers'
    sliding window); ``softcap``: scaled scores s become softcap * tanh(s / softcap);
    ``sinks`` [Hq]: one more logit per head in the softmax (no value: the sink's
    probability is dropped, as GPT-OSS does)."""
    ql, num_q, _ = q.shape
    n, num_kv, _ = k.shape
    group = num_q // num_kv
    out = np.zeros(q.shape, dtype=np.float64)
    for j in range(ql):
        pos = n - ql + j
        first = 0 if window is None else max(0, pos - window + 1)
        for h in range(num_q):
            kh = k[first : pos + 1, h // group].astype(np.float64)
            vh = v[first : pos + 1, h // group].astype(np.float64)
            s = kh @ q[j, h].astype(np.float64) * scale
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            if sinks is not None:
                s = np.append(s, float(sinks[h]))
            p = np.exp(s - s.max())
            p /= p.sum()
            out[j, h] = p[: len(vh)] @ vh
    return out


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    out = np.asarray(out, dtype=np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
