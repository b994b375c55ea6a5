"""The compiled decode step (``kvpager._native``, built from
``native/decode_step.c`` at install), or None where it was not built.

`seq_append._decode` is the NumPy reference for it; a `SequenceManager` takes
the compiled step when it exists (``SequenceManager.native``; tests run both
and compare). ``KVPAGER_NATIVE=0`` turns it off for a process. The install
builds it as an optional extension: without a C compiler it is skipped, and
everything runs on NumPy as before.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kvpager import env


def load(name: str = "_native") -> ModuleType | None:
    """The compiled module ``kvpager.<name>`` (the decode step by default; the
    CPU attention kernel is ``_cpu_attention``), or None (not built, or turned
    off by KVPAGER_NATIVE=0)."""
    if not env.native():
        return None
    try:
        return importlib.import_module(f"kvpager.{name}")
    except ImportError:
        return None


#: This process's compiled decode step (None: NumPy only).
DECODE = load()
