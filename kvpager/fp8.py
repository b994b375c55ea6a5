"""FP8 K/V storage: quantisation on write and dequantisation on read, in NumPy.

An FP8 pool (``PoolSpec(kv_dtype="float8_e4m3" | "float8_e5m2")``) stores
``x / scale`` rounded to the nearest FP8 value (ties to even), saturated to the
format's largest finite value (448 for e4m3, 57344 for e5m2); ``scale`` is the
pool's float32 scale of the (layer, K or V, kv head). NaN stays NaN; +-inf
saturates. Reading multiplies by the scale again. These functions are the
NumPy twin of ``cuda/kv_write.cu`` (``cvt.rn.satfinite``) and of the attention
kernels' in-register dequantisation.
"""

from __future__ import annotations

import numpy as np

from kvpager.spec import PoolSpec


def quantize(x: np.ndarray, scale: np.ndarray, spec: PoolSpec) -> np.ndarray:
    """``x`` (any float dtype) / ``scale`` (broadcast), in float32, saturated and
    cast to the pool's FP8 dtype."""
    y = np.asarray(x).astype(np.float32) / np.asarray(scale, np.float32)
    lim = np.float32(spec.fp8_max)
    np.clip(y, -lim, lim, out=y)  # NaN passes through clip unchanged
    return y.astype(spec.kv_np_dtype)


def dequantize(stored: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Stored FP8 values (or any float storage) times ``scale``, as float32."""
    return stored.astype(np.float32) * np.asarray(scale, np.float32)
