"""`kvpager.launch`'s ctypes mirrors of the CUDA driver's launch structures match the
driver ABI (cuda.h, CUDA 12 and 13: CUlaunchConfig 56 bytes with the stream at offset 32;
CUlaunchAttribute 72 bytes with its 64-byte value union at offset 8), so a programmatic
launch hands the driver what it reads. No GPU needed."""

from __future__ import annotations

import ctypes

from kvpager.launch import (
    _CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
    _LaunchAttribute,
    _LaunchConfig,
)


def test_launch_config_layout_matches_the_driver():
    assert ctypes.sizeof(_LaunchConfig) == 56
    offsets = {name: getattr(_LaunchConfig, name).offset for name, _ in _LaunchConfig._fields_}
    assert offsets == {"grid": 0, "block": 12, "smem": 24, "stream": 32, "attrs": 40, "num_attrs": 48}


def test_launch_attribute_layout_matches_the_driver():
    assert ctypes.sizeof(_LaunchAttribute) == 72
    assert _LaunchAttribute.value.offset == 8
    a = _LaunchAttribute(id=_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    raw = bytes(a)
    assert raw[:4] == (6).to_bytes(4, "little") and raw[8:12] == (1).to_bytes(4, "little")
    assert raw[12:] == bytes(60)
