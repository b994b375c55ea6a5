"""Backends: where K/V lives and the kernels over it. `make_backend` picks one by device."""

from __future__ import annotations

import glob
import importlib.util
import logging
from typing import Any

from kvpager.backends.base import Backend
from kvpager.backends.numpy_backend import NumpyBackend
from kvpager.errors import BackendUnavailable, InvalidArgument
from kvpager.spec import PoolSpec

__all__ = ["Backend", "NumpyBackend", "make_backend", "cuda_available", "default_device"]


def cuda_available() -> bool:
    """True if CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


log = logging.getLogger("kvpager.backends")


def nvidia_gpu_present() -> bool:
    """Whether the NVIDIA driver shows a GPU here (whatever Python packages exist)."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/proc/driver/nvidia/gpus/*"))


def default_device() -> str:
    """``cuda:0`` where CuPy sees a GPU, else ``cpu``; warns when an NVIDIA GPU
    is present but CuPy is missing (the pool would silently be on the CPU)."""
    if cuda_available():
        return "cuda:0"
    if nvidia_gpu_present():
        if importlib.util.find_spec("cupy") is None:
            log.warning("an NVIDIA GPU is present but CuPy is not installed: the pool goes on the CPU; "
                        "install CuPy for the GPU (pip install 'kvpager[cuda]', or 'kvpager[cuda12]' "
                        "for a CUDA 12 driver)")
        else:
            log.warning("an NVIDIA GPU is present but CuPy cannot use it (driver or CUDA version?): "
                        "the pool goes on the CPU; check `python -c 'import cupy; cupy.show_config()'`")
    return "cpu"


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"`` -> ("cpu", 0); ``"cuda"`` / ``"cuda:N"`` -> ("cuda", N)."""
    if device == "cpu":
        return "cpu", 0
    if device == "cuda":
        return "cuda", 0
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", int(device[5:])
    raise InvalidArgument(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def make_backend(spec: PoolSpec, device: str = "cpu", **kwargs: Any) -> Backend:
    """The backend for ``device``: NumPy for ``cpu``, CuPy for ``cuda:N``."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return NumpyBackend(spec, **kwargs)
    try:
        from kvpager.backends.cupy_backend import CupyBackend
    except ImportError as e:
        raise BackendUnavailable(f"device {device!r} needs CuPy and a CUDA GPU: {e}") from None
    return CupyBackend(spec, index, **kwargs)
