"""Pool geometry: `PoolSpec` and the dtypes kvpager stores."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from kvpager.errors import InvalidArgument

DTYPE_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4}
#: FP8 storage dtypes (``kv_dtype``): name -> (ml_dtypes name, largest finite value)
FP8_DTYPES = {"float8_e4m3": ("float8_e4m3fn", 448.0), "float8_e5m2": ("float8_e5m2", 57344.0)}
_FP8_ALIASES = {"fp8": "float8_e4m3", "fp8_e4m3": "float8_e4m3", "float8_e4m3fn": "float8_e4m3",
                "e4m3": "float8_e4m3", "fp8_e5m2": "float8_e5m2", "e5m2": "float8_e5m2"}


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a kvpager dtype name (bfloat16 through ml_dtypes); made once
    per name (`PoolSpec.np_dtype` asks it four times a layer on the CPU backend)."""
    if not isinstance(name, str) or name not in DTYPE_SIZES:
        raise InvalidArgument(f"dtype must be one of {sorted(DTYPE_SIZES)}, got {name!r}")
    return _numpy_dtype(name)


@functools.cache
def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def kv_dtype_name(kv_dtype: object) -> str | None:
    """Normalise a storage dtype: None (the compute dtype), or an FP8 name
    ("fp8" and vLLM's "fp8_e4m3" / "fp8_e5m2" are taken)."""
    if kv_dtype is None:
        return None
    text = str(kv_dtype).removeprefix("torch.")
    text = _FP8_ALIASES.get(text, text)
    if text in FP8_DTYPES:
        return text
    try:
        return dtype_name(kv_dtype)
    except InvalidArgument:  # (it named the argument dtype)
        raise InvalidArgument(f"kv_dtype must be None (= dtype), the compute dtype or one of "
                              f"{sorted(FP8_DTYPES)}, got {kv_dtype!r}") from None


def fp8_numpy_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, FP8_DTYPES[name][0]))


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


#: The most blocks a pool holds (block ids are int32) and the most bytes of either of its pools.
MAX_BLOCKS = (1 << 31) - 1
MAX_POOL_BYTES = 1 << 50

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
    #: storage dtype of K/V: None (the same as ``dtype``), "float8_e4m3" or "float8_e5m2";
    #: queries, outputs and the K/V given to ``write`` stay in ``dtype``
    kv_dtype: str | None = None
    #: FP8 dequantisation scales, float32 [num_layers, 2 (K, V), num_kv_heads] flattened
    #: (stored = x / scale, read = stored * scale); None: every scale 1.0
    kv_scales: tuple[float, ...] | None = None

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
        kvd = kv_dtype_name(self.kv_dtype)
        object.__setattr__(self, "kv_dtype", None if kvd == self.dtype else kvd)
        if self.kv_dtype is not None and self.kv_dtype not in FP8_DTYPES:
            raise InvalidArgument(f"kv_dtype must be None (= dtype) or one of {sorted(FP8_DTYPES)}, "
                                  f"got {self.kv_dtype!r}")
        if self.kv_dtype is not None and self.dtype == "float32":
            raise InvalidArgument(f"kv_dtype={self.kv_dtype} needs dtype float16 or bfloat16 (queries and "
                                  "outputs), not float32")
        object.__setattr__(self, "kv_scales", self._check_scales(self.kv_scales))
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size", "num_host_blocks"):
            object.__setattr__(self, name, int(getattr(self, name)))
        # (Python ints: in int64 a block of 3e9 heads of 3e9 dims wrapped to a negative size, and sizes
        # past 2**63 reached the OS as a traceback)
        if self.num_blocks > MAX_BLOCKS or self.num_host_blocks > MAX_BLOCKS:
            raise InvalidArgument(f"at most {MAX_BLOCKS} blocks (block ids are int32), got "
                                  f"{max(self.num_blocks, self.num_host_blocks)}")
        if max(self.device_bytes, self.host_bytes) > MAX_POOL_BYTES:
            raise InvalidArgument(f"a pool of {max(self.device_bytes, self.host_bytes)} bytes is past the most "
                                  f"kvpager takes ({MAX_POOL_BYTES} bytes): fewer blocks, layers, heads or a "
                                  "smaller head dim")

    def _check_scales(self, scales: object) -> tuple[float, ...] | None:
        if scales is None:
            return None
        if self.kv_dtype is None:
            raise InvalidArgument("kv_scales are for an FP8 pool: give kv_dtype too")
        want = self.num_layers * 2 * self.num_kv_heads
        if hasattr(scales, "detach") and callable(scales.detach):  # a torch tensor (one that requires grad too)
            scales = scales.detach().cpu()
        try:
            arr = np.asarray(scales)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidArgument(f"kv_scales must be numbers, got {type(scales).__name__}") from None
        if arr.dtype.kind not in "iuf" or _holds_bool(scales):  # bools (mixed with numbers too), strings, ragged
            raise InvalidArgument(f"kv_scales must be numbers, got {type(scales).__name__} of {arr.dtype}"
                                  + (" holding a bool" if arr.dtype.kind in "iuf" else ""))
        arr = arr.astype(np.float64)
        if arr.size != want or arr.ndim not in (1, 3) or (arr.ndim == 3 and arr.shape != (
                self.num_layers, 2, self.num_kv_heads)):
            raise InvalidArgument(f"kv_scales must hold [num_layers={self.num_layers}, 2, num_kv_heads="
                                  f"{self.num_kv_heads}] values (nested or flat), got shape {arr.shape}")
        info = np.finfo(np.float32)  # judged in float64: a cast of 1e300 warned of its overflow first
        bad = ~np.isfinite(arr) | (arr < info.tiny) | (arr > info.max)
        if bad.any():
            raise InvalidArgument(f"kv_scales must be positive, finite float32 normals, "
                                  f"got {float(arr.ravel()[bad.ravel()][0])!r}")
        return tuple(float(x) for x in arr.astype(np.float32).ravel())

    @property
    def storage_dtype(self) -> str:
        """The dtype K/V is stored in (``kv_dtype``, else ``dtype``)."""
        return self.kv_dtype or self.dtype

    @property
    def is_fp8(self) -> bool:
        return self.kv_dtype is not None

    @property
    def itemsize(self) -> int:
        """Bytes of one stored K/V element."""
        return 1 if self.kv_dtype else DTYPE_SIZES[self.dtype]

    @property
    def compute_itemsize(self) -> int:
        """Bytes of one element of q, the output and the K/V given to ``write``."""
        return DTYPE_SIZES[self.dtype]

    @property
    def kv_np_dtype(self) -> np.dtype:
        """The NumPy dtype of the stored K/V (ml_dtypes' float8 types for FP8)."""
        return fp8_numpy_dtype(self.kv_dtype) if self.kv_dtype else self.np_dtype

    @property
    def fp8_max(self) -> float:
        """The largest finite value of the FP8 storage dtype."""
        if not self.kv_dtype:
            raise InvalidArgument("fp8_max: this pool does not store FP8")
        return FP8_DTYPES[self.kv_dtype][1]

    @property
    def scales(self) -> np.ndarray:
        """float32 [num_layers, 2, num_kv_heads]: the dequantisation scales (ones if none given)."""
        shape = (self.num_layers, 2, self.num_kv_heads)
        if self.kv_scales is None:
            return np.ones(shape, np.float32)
        return np.asarray(self.kv_scales, np.float32).reshape(shape)

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block: (layers, 2, kv heads, block size, head dim)."""
        return (self.num_layers, 2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, K and V."""
        return math.prod(self.block_shape) * self.itemsize

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
        """The fields as plain values; ``kv_dtype`` / ``kv_scales`` only when set,
        so a pool without FP8 reads as before to older peers."""
        out = dataclasses.asdict(self)
        for name in ("kv_dtype", "kv_scales"):
            if out[name] is None:
                del out[name]
        if out.get("kv_scales") is not None:
            out["kv_scales"] = list(out["kv_scales"])
        return out

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
        kv_dtype: str | None = None,
        kv_scales: object = None,
    ) -> PoolSpec:
        """Size a pool to fit a memory budget: as many whole blocks as fit in
        ``device_bytes`` (and ``host_bytes`` for the swap pool)."""
        device_bytes, host_bytes = _bytes(device_bytes, "device_bytes"), _bytes(host_bytes, "host_bytes")
        probe = cls(num_layers, num_kv_heads, head_dim, 2, block_size, dtype, kv_dtype=kv_dtype,
                    kv_scales=kv_scales)  # type: ignore[arg-type]
        per_block = probe.bytes_per_block
        num_blocks = device_bytes // per_block
        if num_blocks < 2:
            raise InvalidArgument(
                f"device_bytes={device_bytes} holds {num_blocks} blocks of {per_block} bytes; need at least 2"
            )
        return probe.replace(num_blocks=num_blocks, num_host_blocks=host_bytes // per_block)


def _bytes(value: object, name: str) -> int:
    """A memory budget as whole bytes: a number >= 0 (a float's fraction of a byte
    dropped); InvalidArgument for anything else (a str, a bool, NaN, infinity)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or isinstance(value, (float, np.floating)) and not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{name} must be a number of bytes >= 0, got {value!r}")
    return int(value)


# Geometry of a few well-known models (per-layer K/V shape), for `--model` presets.
MODEL_PRESETS: dict[str, dict[str, object]] = {
    "llama-3-8b": dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16"),
    "llama-3-70b": dict(num_layers=80, num_kv_heads=8, head_dim=128, dtype="bfloat16"),
    "mistral-7b": dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16"),
    "qwen2-7b": dict(num_layers=28, num_kv_heads=4, head_dim=128, dtype="bfloat16"),
    "tiny": dict(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32"),
}


def _holds_bool(value: object) -> bool:
    """Whether nested lists or tuples ``value`` hold a bool anywhere (NumPy reads
    ``[True, 0.5]`` as numbers: a bool mixed in passed for 1.0)."""
    if isinstance(value, (bool, np.bool_)):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_bool(v) for v in value)
    return False
