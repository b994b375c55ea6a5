"""Kernels for an architecture-specific target (``sm_90a``: Hopper's wgmma).

`cupy.RawModule` compiles for the device's plain target (``-arch=sm_90``),
which has no wgmma; a kernel that needs ``sm_90a`` is compiled here with
NVRTC directly (the bindings CuPy ships) into a cubin, kept on disk under a
key of the source text, the options, the target and the NVRTC version (so a
second process loads it without compiling), and loaded with
`cupy.RawModule` (``path=``), whose functions the launches use as any other.

`kvpager.kernels.get_kernel` (``arch=``) calls `compile_cubin`; an NVRTC that
cannot build the target raises `UnsupportedConfiguration`, which the planners
turn into the portable kernel (`kvpager.backends.cupy_prefill`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from kvpager.errors import UnsupportedConfiguration

log = logging.getLogger("kvpager.kernels")
_warned: set[str] = set()


def arch_number(arch: str) -> int:
    """The compute capability digits of a target: ``"sm_90a"`` -> 90."""
    digits = "".join(ch for ch in arch if ch.isdigit())
    if not arch.startswith("sm_") or not digits:
        raise UnsupportedConfiguration(f"not a CUDA target: {arch!r} (expected e.g. 'sm_90a')")
    return int(digits)


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the loaded NVRTC; UnsupportedConfiguration where there is none."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        return tuple(nvrtc.getVersion())  # type: ignore[return-value]
    except Exception as exc:  # no libnvrtc: CuPy's error types differ by version
        raise UnsupportedConfiguration(f"NVRTC is not available: {exc}") from exc


def supports(arch: str) -> bool:
    """Whether the loaded NVRTC lists ``arch``'s compute capability (``sm_90a`` needs 12.0+)."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        return arch_number(arch) in set(nvrtc.getSupportedArchs())
    except Exception:
        return False


def cache_dir() -> Path:
    """Where compiled cubins are kept: ``$XDG_CACHE_HOME/kvpager/cubin`` (``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "kvpager" / "cubin"


def cache_key(source: str, options: tuple[str, ...], arch: str, version: tuple[int, int]) -> str:
    """SHA-256 of everything that decides the cubin's bytes."""
    h = hashlib.sha256()
    for part in (source, "\0".join(options), arch, f"{version[0]}.{version[1]}"):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()


def compile_cubin(source: str, name: str, options: tuple[str, ...], arch: str) -> str:
    """The path of a cubin of ``source`` built for ``arch`` with ``options``: from the
    disk cache, else compiled with NVRTC and written there (a temporary file where
    the cache cannot be written). UnsupportedConfiguration when NVRTC is missing,
    lacks ``arch`` or fails to compile (with its log)."""
    version = nvrtc_version()
    if not supports(arch):
        raise UnsupportedConfiguration(f"NVRTC {version[0]}.{version[1]} cannot build for {arch}")
    key = cache_key(source, options, arch, version)
    path = cache_dir() / f"{key}.cubin"
    if path.is_file():
        return str(path)
    cubin = _nvrtc_cubin(source, name, (*options, f"-arch={arch}"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        fd, tmp = tempfile.mkstemp(suffix=".cubin")
        path = Path(tmp)
    with os.fdopen(fd, "wb") as f:
        f.write(cubin)
    if Path(tmp) != path:
        os.replace(tmp, path)  # atomic: a concurrent reader sees all of it or nothing
    return str(path)


def _nvrtc_cubin(source: str, name: str, options: tuple[str, ...]) -> bytes:
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, name, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as exc:
            raise UnsupportedConfiguration(f"NVRTC could not build {name} ({' '.join(options)}): "
                                           f"{exc}\n{nvrtc.getProgramLog(prog)}") from exc
        return bytes(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)


def warn_once(what: str, reason: Exception | str) -> None:
    """Log (once per ``what``) that a kernel fell back to its portable twin, and why."""
    if what not in _warned:
        _warned.add(what)
        log.warning("%s unavailable, using the portable kernel: %s", what, reason)
