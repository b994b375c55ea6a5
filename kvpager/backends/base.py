"""The backend interface: where K/V lives and the kernels that read and move it.

A backend knows nothing of sequences or sockets. It owns two pools:
- the device pool ``[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]``
  (block-major, see DESIGN.md), block 0 being the null block;
- the host (swap) pool, the same per-block layout, ``num_host_blocks`` long.

`KVPool` validates every argument (dtypes, shapes, block ids in range) before
it calls a backend, so backends may assume well-formed input. Index arrays
arrive as NumPy arrays; tensors (k, v, q) as the backend's own array type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvpager.errors import UnsupportedConfiguration
from kvpager.plan_guard import Moves
from kvpager.spec import PoolSpec


class Backend(ABC):
    """Storage and kernels for one pool."""

    #: short name: "numpy" or "cupy"
    name: str = ""
    #: the array module of this backend's tensors (numpy or cupy)
    xp: Any = np

    def __init__(self, spec: PoolSpec):
        self.spec = spec

    @property
    def device(self) -> str:
        return "cpu"

    @abstractmethod
    def write(self, layer: int, slots: np.ndarray, k: Any, v: Any) -> None:
        """Store K/V of one layer for ``T`` tokens.

        slots: int64 [T], block * block_size + offset; -1 is padding (skipped).
        k, v: [T, num_kv_heads, head_dim] in the pool dtype."""

    @abstractmethod
    def copy_blocks(self, pairs: np.ndarray) -> None:
        """Copy whole device blocks (all layers, K and V): pairs int64 [n, 2] of
        (src, dst), all in one launch. Destinations are distinct."""

    @abstractmethod
    def swap_out(self, pairs: np.ndarray) -> None:
        """Copy device blocks to host blocks: pairs int64 [n, 2] of (device, host)."""

    @abstractmethod
    def swap_in(self, pairs: np.ndarray) -> None:
        """Copy host blocks to device blocks: pairs int64 [n, 2] of (host, device)."""

    @abstractmethod
    def attend(
        self,
        layer: int,
        q: Any,
        block_tables: np.ndarray,
        seq_lens: np.ndarray,
        query_lens: np.ndarray,
        scale: float,
        *,
        window: int | None = None,
        softcap: float | None = None,
        sinks: Any = None,
    ) -> Any:
        """Paged attention of one layer.

        q: [sum(query_lens), num_q_heads, head_dim], sequences back to back.
        block_tables: int32 [B, max_blocks], padded with block 0.
        seq_lens: int32 [B], tokens of K/V per sequence (the query's included).
        query_lens: int32 [B]; query token j of sequence b sits at position
        seq_lens[b] - query_lens[b] + j and sees K/V positions <= its own
        (causal). Query head h reads kv head h // (num_q_heads // num_kv_heads).
        Scores are scaled by ``scale``; softmax and accumulation in float32.
        ``window`` (sliding-window attention, transformers' semantics): the
        query at position i sees only keys j with i - window < j <= i.
        ``softcap``: scaled scores s become softcap * tanh(s / softcap)
        before the softmax (Gemma-2). ``sinks``: float [num_q_heads], an
        attention sink per query head, joining each softmax denominator as
        e^sink (GPT-OSS).
        Returns [sum(query_lens), num_q_heads, head_dim] in the pool dtype."""

    @abstractmethod
    def plan(self, tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray,
             slots: np.ndarray | None, **options: Any) -> Any:
        """A `kvpager.plan.StepPlan` over already validated step metadata (see
        `kvpager.plan.check_step`; `kvpager.plan.make_plan` validates and calls this)."""

    def read_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        """Copy whole device blocks to host memory (the remote tier's writes):
        ``out[i]`` (uint8, ``bytes_per_block`` long; rows may be strided)
        receives block ``blocks[i]``, complete when this returns."""
        raise UnsupportedConfiguration(f"the {self.name} backend cannot copy blocks for a remote tier")

    def write_blocks(self, blocks: np.ndarray, payloads: Sequence[Any]) -> None:
        """Copy host bytes into whole device blocks (the remote tier's
        restores) in one batched transfer, complete when this returns:
        ``payloads[i]`` (bytes-like, ``bytes_per_block`` long) into block
        ``blocks[i]`` (int64, distinct)."""
        raise UnsupportedConfiguration(f"the {self.name} backend cannot restore blocks from a remote tier")

    def synchronize(self) -> None:
        """Wait until every copy and kernel issued so far has completed."""

    @abstractmethod
    def device_array(self) -> Any:
        """The whole device pool as a 6-D array (a view, not a copy)."""

    @abstractmethod
    def host_array(self) -> Any:
        """The whole host pool as a 6-D array (a view, not a copy)."""

    def layer_kv(self, layer: int) -> tuple[Any, Any]:
        """Strided views of one layer: K and V, each [num_blocks, num_kv_heads, block_size, head_dim]."""
        kv = self.device_array()
        return kv[:, layer, 0], kv[:, layer, 1]

    #: True once `close` ran: plans made over this backend refuse their calls (`kvpager.plan.closed_pool`)
    closed = False

    @property
    def moves(self) -> Moves:
        """The count of changes that can make this pool's step plans stale
        (`kvpager.plan_guard`): moved by the pool or client that changes its
        sequences, and by `close`."""
        moves = self.__dict__.get("_moves")
        if moves is None:
            moves = self.__dict__["_moves"] = Moves()
        return moves

    def close(self) -> None:
        """Release memory. The backend is unusable afterwards."""
        self.closed = True
        self.moves.bump()
