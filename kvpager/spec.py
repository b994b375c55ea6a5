"""Pool geometry: `PoolSpec` and the dtypes kvpager stores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from kvpager.errors import InvalidArgument

DTYPE_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4}


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a kvpager dtype name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPE_SIZES:
        raise InvalidArgument(f"dtype must be one of {sorted(DTYPE_SIZES)}, got {name!r}")
    return np.dtype(name)


def dtype_name(dtype: object) -> str:
    """Normalise a dtype given as a string, NumPy dtype or torch dtype to a kvpager name."""
    text = str(dtype).removeprefix("torch.")
    if text in ("half", "fp16"):
        text = "float16"
    elif text in ("bf16",):
        text = "bfloat16"
    elif text in ("float", "fp32"):
        text = "float32"
    if text not in DTYPE_SIZES:
        raise InvalidArgument(f"dtype must be one of {sorted(DTYPE_SIZES)}, got {dtype!r}")
    return text


@dataclass(frozen=True)
class PoolSpec:
    """Geometry of a KV pool.

    Storage is block-major: ``[num_blocks, num_layers, 2 (K, V), num_kv_heads,
    block_size, head_dim]``, so one block of all layers is one contiguous chunk.
    Block 0 of the device pool is the reserved null block: ``num_blocks`` counts
    it, so ``num_blocks - 1`` blocks can be handed out.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int = 16
    dtype: str = "float16"
    num_host_blocks: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
        bs = self.block_size
        if not isinstance(bs, (int, np.integer)) or not 8 <= bs <= 128 or bs & (bs - 1):
            raise InvalidArgument(f"block_size must be a power of two from 8 to 128, got {bs!r}")
        nb = self.num_blocks
        if not isinstance(nb, (int, np.integer)) or isinstance(nb, bool) or nb < 2:
            raise InvalidArgument(f"num_blocks must be an integer >= 2 (block 0 is reserved), got {nb!r}")
        nh = self.num_host_blocks
        if not isinstance(nh, (int, np.integer)) or isinstance(nh, bool) or nh < 0:
            raise InvalidArgument(f"num_host_blocks must be a non-negative integer, got {nh!r}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size", "num_host_blocks"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block: (layers, 2, kv heads, block size, head dim)."""
        return (self.num_layers, 2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, K and V."""
        return int(np.prod(self.block_shape)) * self.itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    @property
    def device_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @property
    def host_bytes(self) -> int:
        return self.num_host_blocks * self.bytes_per_block

    @property
    def np_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)

    def replace(self, **changes: object) -> PoolSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PoolSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise InvalidArgument(f"unknown PoolSpec fields: {sorted(unknown)}")
        return cls(**data)  # type: ignore[arg-type]

    @classmethod
    def for_memory(
        cls,
        device_bytes: int,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = 16,
        dtype: str = "float16",
        host_bytes: int = 0,
    ) -> PoolSpec:
        """Size a pool to fit a memory budget: as many whole blocks as fit in
        ``device_bytes`` (and ``host_bytes`` for the swap pool)."""
        probe = cls(num_layers, num_kv_heads, head_dim, 2, block_size, dtype)
        per_block = probe.bytes_per_block
        num_blocks = int(device_bytes) // per_block
        if num_blocks < 2:
            raise InvalidArgument(
                f"device_bytes={device_bytes} holds {num_blocks} blocks of {per_block} bytes; need at least 2"
            )
        return probe.replace(num_blocks=num_blocks, num_host_blocks=int(host_bytes) // per_block)


# Geometry of a few well-known models (per-layer K/V shape), for `--model` presets.
MODEL_PRESETS: dict[str, dict[str, object]] = {
    "llama-3-8b": dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16"),
    "llama-3-70b": dict(num_layers=80, num_kv_heads=8, head_dim=128, dtype="bfloat16"),
    "mistral-7b": dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16"),
    "qwen2-7b": dict(num_layers=28, num_kv_heads=4, head_dim=128, dtype="bfloat16"),
    "tiny": dict(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32"),
}
