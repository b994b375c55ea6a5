"""kvpager: a paged KV-cache memory manager for LLM inference.

Embedded use::

    from kvpager import KVPool, PoolSpec
    pool = KVPool(PoolSpec(num_layers=32, num_kv_heads=8, head_dim=128, num_blocks=4096))

A worker of the daemon: ``from kvpager import Client`` (the same methods).
The transformers integration: ``kvpager.hf`` (``pip install 'kvpager[torch]'``).
"""

from typing import Any

from kvpager.errors import (
    BackendUnavailable,
    DaemonUnavailable,
    IntegrityError,
    InternalError,
    InvalidArgument,
    KVPagerError,
    LimitExceeded,
    MessageTooLarge,
    NotOwner,
    NotPinned,
    NotSwapped,
    OutOfBlocks,
    OutsidePagedPass,
    ProtocolError,
    RankTaken,
    RequestTimeout,
    SequenceSwapped,
    SessionLost,
    StalePlan,
    Unauthorized,
    UnknownOp,
    UnknownSequence,
    UnsupportedConfiguration,
    UnsupportedModel,
    VersionMismatch,
)
from kvpager.events import EventSink
from kvpager.kernel_config import KernelConfig
from kvpager.pool import KVPool
from kvpager.pool_rank import PoolRank
from kvpager.spec import PoolSpec
from kvpager.types import (
    Allocation,
    BlockMap,
    CacheProbe,
    PinInfo,
    PoolCounters,
    PoolStats,
    RemoteStats,
    SequenceInfo,
    SessionInfo,
    TenantUsage,
)

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "BackendUnavailable",
    "BlockMap",
    "CacheProbe",
    "Client",
    "DaemonUnavailable",
    "EventSink",
    "IntegrityError",
    "InternalError",
    "InvalidArgument",
    "KVPagerError",
    "KVPool",
    "KernelConfig",
    "LimitExceeded",
    "MessageTooLarge",
    "NotOwner",
    "NotPinned",
    "NotSwapped",
    "OutOfBlocks",
    "OutsidePagedPass",
    "PinInfo",
    "PoolCounters",
    "PoolRank",
    "PoolSpec",
    "PoolStats",
    "ProtocolError",
    "RankTaken",
    "RemoteStats",
    "RequestTimeout",
    "SequenceInfo",
    "SequenceSwapped",
    "SessionInfo",
    "SessionLost",
    "StalePlan",
    "TenantUsage",
    "Unauthorized",
    "UnknownOp",
    "UnknownSequence",
    "UnsupportedConfiguration",
    "UnsupportedModel",
    "VersionMismatch",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """`Client` on first use: the embedded pool does not need ZeroMQ imported."""
    if name == "Client":
        from kvpager.client import Client

        return Client
    raise AttributeError(f"module 'kvpager' has no attribute {name!r}")
