"""Moved to `kvpager.hf.model` (importable after `pip install 'kvpager[torch]'`):
this name stays for code written against the checkout's `clients/`, and is the
same module object, private names included."""

import sys

from kvpager.hf import model as _moved

sys.modules[__name__] = _moved
