"""What the planner tests share: the recorded pins, an H200's limits and a pool spec maker."""

from __future__ import annotations

import json
from pathlib import Path

from kvpager import PoolSpec

#: the planners' recorded choices (see test_kernel_plans.py's docstring)
PINS = json.loads((Path(__file__).parent / "kernel_plan_pins.json").read_text())
#: the device attributes the planners read, as an H200 reports them
H200 = {"MultiProcessorCount": 132, "MaxRegistersPerMultiprocessor": 65536,
        "MaxSharedMemoryPerMultiprocessor": 233472, "MaxThreadsPerMultiProcessor": 2048,
        "MaxSharedMemoryPerBlockOptin": 232448}
NSM = 132


def spec_of(dtype, kv_dtype, d, bs, hkv):
    return PoolSpec(num_layers=2, num_kv_heads=hkv, head_dim=d, num_blocks=64, block_size=bs, dtype=dtype,
                    kv_dtype=kv_dtype)
