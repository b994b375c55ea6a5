"""Whether a `PagedCache` pass feeds each row's tokens at their indices in the
row's sequence: what a block's K/V must have been computed at for another
prompt to share it. A row fed elsewhere (left padding and no ``position_ids``:
a model then counts cache columns, pads included; transformers 4.57's chunked
prefill of a padded batch) keeps its K/V to itself: allocated under a salt of
its own (`own_salt`), never committed."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch


def placed(position_ids: Any, real: np.ndarray, lens: np.ndarray, columns: int, takes_positions: bool,
           read: np.ndarray | None = None) -> np.ndarray:
    """Per row, bool: whether a pass of ``real`` tokens (bool [rows, width]) after
    ``lens`` tokens a row (``columns`` cache columns, pads included) feeds each at
    its index. Without ``position_ids`` a model that takes them counts cache
    columns (one that takes none, ALiBi's, derives nothing from positions).
    ``read``: the positions already read (`cache_mask.read`: [rows, width]).
    Positions that cannot be read count as elsewhere."""
    rows, width = real.shape
    if position_ids is None and not takes_positions:
        return np.ones(rows, dtype=bool)
    if read is None and isinstance(position_ids, torch.Tensor) and position_ids.shape == (rows, width):
        read = position_ids.detach().cpu().numpy()
    if read is not None and real.all():  # (a decode pass's: one axis, every column a token)
        return (read == lens[:, None] + np.arange(width)).all(axis=1)
    want = lens[:, None] + np.cumsum(real, axis=1) - 1
    try:
        got = (np.arange(columns, columns + width) if position_ids is None else read if read is not None
               else torch.as_tensor(position_ids).detach().cpu().numpy())
        if got.ndim < 3:
            got = got.reshape((1,) * (3 - got.ndim) + got.shape)
        got = np.broadcast_to(got, (got.shape[0], rows, width))
    except (TypeError, ValueError, RuntimeError):
        return np.zeros(rows, dtype=bool)
    # (multi-axis positions, M-RoPE's: a text token's are its index on every axis)
    return ((got == want[None]) | ~real[None]).all(axis=(0, 2))


def own_salt(salt: str | bytes) -> str | bytes:
    """``salt`` made unmatchable: a sequence's own, for blocks no other may share."""
    nonce = "\x00own-" + os.urandom(8).hex()
    return salt + (nonce.encode() if isinstance(salt, bytes) else nonce)
