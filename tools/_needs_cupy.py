"""Imported first by the GPU-only benchmarks: where CuPy is missing, the script exits
with what it needs (``--help`` included), not an import traceback."""

import importlib.util
import os
import sys

if importlib.util.find_spec("cupy") is None:
    sys.exit(f"{os.path.basename(sys.argv[0])}: needs CuPy and a CUDA GPU "
             "(pip install 'kvpager[cuda]', or 'kvpager[cuda12]' for a CUDA 12 driver)")
