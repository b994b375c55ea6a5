"""PoolSpec geometry: validation naming the field, sizes, sizing from a budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvpager import InvalidArgument, PoolSpec


def test_bytes_per_block_and_token():
    s = PoolSpec(num_layers=32, num_kv_heads=8, head_dim=128, num_blocks=10, block_size=16, dtype="bfloat16")
    assert s.bytes_per_block == 32 * 2 * 8 * 16 * 128 * 2  # 2 MiB
    assert s.bytes_per_token == s.bytes_per_block // 16
    assert s.device_bytes == 10 * s.bytes_per_block
    assert s.block_shape == (32, 2, 8, 16, 128)


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_layers", 0), ("num_kv_heads", -1), ("head_dim", 1.5), ("num_blocks", 1),
        ("block_size", 24), ("block_size", 4), ("block_size", 256), ("dtype", "int8"),
        ("num_host_blocks", -3), ("num_layers", True),
    ],
)
def test_invalid_geometry_names_the_field(field, value):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=8)
    args[field] = value
    with pytest.raises(InvalidArgument, match=field):
        PoolSpec(**args)


@pytest.mark.parametrize("alias, name", [("fp16", "float16"), ("torch.bfloat16", "bfloat16"), ("float", "float32")])
def test_dtype_aliases(alias, name):
    assert PoolSpec(1, 1, 64, 4, dtype=alias).dtype == name


def test_for_memory_fits_whole_blocks():
    per_block = PoolSpec(2, 2, 64, 2, 16, "float16").bytes_per_block
    s = PoolSpec.for_memory(10 * per_block + per_block // 2, num_layers=2, num_kv_heads=2, head_dim=64,
                            host_bytes=3 * per_block)
    assert (s.num_blocks, s.num_host_blocks) == (10, 3)
    with pytest.raises(InvalidArgument, match="device_bytes"):
        PoolSpec.for_memory(per_block, num_layers=2, num_kv_heads=2, head_dim=64)


def test_round_trip_dict():
    s = PoolSpec(2, 2, 64, 8, 32, "bfloat16", 4)
    assert PoolSpec.from_dict(s.to_dict()) == s
    with pytest.raises(InvalidArgument, match="bogus"):
        PoolSpec.from_dict({**s.to_dict(), "bogus": 1})


def test_default_device_warns_of_a_gpu_without_cupy(monkeypatch, caplog):
    import importlib.util

    import kvpager.backends as backends

    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    monkeypatch.setattr(backends, "nvidia_gpu_present", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    with caplog.at_level("WARNING", logger="kvpager.backends"):
        assert backends.default_device() == "cpu"
    assert "NVIDIA GPU is present but CuPy is not installed" in caplog.text and "kvpager[cuda]" in caplog.text
    monkeypatch.setattr(backends, "nvidia_gpu_present", lambda: False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="kvpager.backends"):
        assert backends.default_device() == "cpu"
    assert not caplog.text


def test_package_surface():
    import importlib.metadata

    import kvpager
    from kvpager.client import Client

    assert kvpager.Client is Client and "Client" in kvpager.__all__
    assert all(hasattr(kvpager, name) for name in kvpager.__all__)
    assert importlib.metadata.version("kvpager") == kvpager.__version__  # one place for the version
    assert (Path(kvpager.__file__).parent / "py.typed").is_file()
