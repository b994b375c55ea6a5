"""The GPU tests' shared preamble."""

from __future__ import annotations

from typing import Any

import pytest


def cupy_or_skip() -> Any:
    """CuPy, or skip the calling test module where CuPy or a CUDA device is missing."""
    cupy = pytest.importorskip("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        count = 0
    if count == 0:
        pytest.skip("no CUDA device", allow_module_level=True)
    return cupy


def cupy_torch_or_skip() -> tuple[Any, Any]:
    """CuPy and torch, or skip the calling test module where either, a CUDA device
    or torch's CUDA is missing."""
    cupy = cupy_or_skip()
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here", allow_module_level=True)
    return cupy, torch
