"""kvpager: a paged KV-cache memory manager for LLM inference.

Embedded use::

    from kvpager import KVPool, PoolSpec
    pool = KVPool(PoolSpec(num_layers=32, num_kv_heads=8, head_dim=128, num_blocks=4096))

A worker of the daemon: ``from kvpager import Client`` (the same methods).
"""

from typing import Any

from kvpager.errors import (
    IntegrityError,
    InvalidArgument,
    KVPagerError,
    NotOwner,
    NotSwapped,
    OutOfBlocks,
    SequenceSwapped,
    UnknownSequence,
    UnsupportedConfiguration,
)
from kvpager.events import EventSink
from kvpager.pool import KVPool
from kvpager.spec import PoolSpec
from kvpager.types import Allocation, BlockMap, PoolCounters, PoolStats, SequenceInfo

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "BlockMap",
    "Client",
    "EventSink",
    "IntegrityError",
    "InvalidArgument",
    "KVPagerError",
    "KVPool",
    "NotOwner",
    "NotSwapped",
    "OutOfBlocks",
    "PoolCounters",
    "PoolSpec",
    "PoolStats",
    "SequenceInfo",
    "SequenceSwapped",
    "UnknownSequence",
    "UnsupportedConfiguration",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """`Client` on first use: the embedded pool does not need ZeroMQ imported."""
    if name == "Client":
        from kvpager.client import Client

        return Client
    raise AttributeError(f"module 'kvpager' has no attribute {name!r}")
