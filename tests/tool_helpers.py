"""Loading a script of ``tools/`` in a test, as its own module."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@contextlib.contextmanager
def tool_module(name: str) -> Iterator[ModuleType]:
    """``tools/<name>.py`` as a module, with ``tools/`` importable while the block
    runs (a tool imports the scripts beside it, some only when called)."""
    sys.path.insert(0, str(TOOLS))
    try:
        spec = importlib.util.spec_from_file_location(f"kvpager_tools_{name}", TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(TOOLS))
