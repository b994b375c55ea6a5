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
