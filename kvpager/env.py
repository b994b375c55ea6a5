"""Every environment variable kvpager reads, in one place (all prefixed KVPAGER_)."""

from __future__ import annotations

import os


def _get(name: str, default: str) -> str:
    return os.environ.get(f"KVPAGER_{name}", default)


def endpoint() -> str | None:
    """KVPAGER_ENDPOINT: the daemon endpoint clients and CLI commands use."""
    return os.environ.get("KVPAGER_ENDPOINT") or None


def timeout_s() -> float:
    """KVPAGER_TIMEOUT: seconds a client waits for a reply before TimeoutError."""
    return float(_get("TIMEOUT", "10"))


def heartbeat_timeout_s() -> float:
    """KVPAGER_HEARTBEAT_TIMEOUT: seconds of silence after which the daemon ends a session."""
    return float(_get("HEARTBEAT_TIMEOUT", "5"))


def runtime_dir() -> str:
    """KVPAGER_RUNTIME_DIR: directory (mode 0700) for the default ipc:// socket;
    default ``$XDG_RUNTIME_DIR/kvpager``, else ``/tmp/kvpager-<uid>``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    default = os.path.join(xdg, "kvpager") if xdg else f"/tmp/kvpager-{os.getuid()}"
    return _get("RUNTIME_DIR", default)


def cuda_arch_list() -> list[str]:
    """KVPAGER_CUDA_ARCH: extra nvcc -arch values for kernel compile checks (comma separated)."""
    raw = _get("CUDA_ARCH", "")
    return [a for a in raw.split(",") if a]


def max_message_bytes() -> int:
    """KVPAGER_MAX_MESSAGE: largest wire message in bytes (default 16 MiB); tensors
    go through shared memory, so only very large prompt batches come near it."""
    return int(_get("MAX_MESSAGE", str(16 << 20)))
