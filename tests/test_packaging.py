"""The package as installed: `__all__` complete, the transformers integration
importable as `kvpager.hf`, and a wheel installed into a fresh environment
working outside a checkout (`kvpager.hf`, `kvpager bench`, the kernel sources)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from daemon_helpers import REPO

import kvpager
from kvpager import errors, types


def test_all_names_every_public_error_and_result_type():
    for name in kvpager.__all__:
        assert getattr(kvpager, name) is not None
    error_classes = {n for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, errors.KVPagerError)}
    result_types = {n for n, c in vars(types).items() if inspect.isclass(c) and dataclasses.is_dataclass(c)}
    assert error_classes <= set(kvpager.__all__), error_classes - set(kvpager.__all__)
    assert result_types <= set(kvpager.__all__), result_types - set(kvpager.__all__)
    assert {"KVPool", "PoolSpec", "Client", "__version__"} <= set(kvpager.__all__)
    assert sorted(kvpager.__all__) == kvpager.__all__


def test_import_kvpager_pulls_in_neither_torch_nor_zmq():
    code = "import sys, kvpager; print(sorted(m for m in ('torch', 'zmq', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=REPO), check=True)
    assert out.stdout.strip() == "[]"


def test_the_old_clients_names_are_the_new_modules():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    sys.path.insert(0, REPO)
    import clients.kvpager_graphs
    import clients.kvpager_hf
    import clients.kvpager_hf_model
    import kvpager.hf

    assert clients.kvpager_hf is kvpager.hf.generation and clients.kvpager_graphs is kvpager.hf.graphs
    assert clients.kvpager_hf_model is kvpager.hf.model
    # what code written against them imported from there still resolves (the salt has a module of its own now)
    from clients.kvpager_hf import PagedGeneration, default_salt, spec_for_model  # noqa: F401
    from clients.kvpager_hf_model import check_call, default_salt, layer_windows, spec_for_model  # noqa: F401, F811

    assert default_salt is kvpager.hf.default_salt
    # the checks that moved to kvpager.hf.checks are still answered by kvpager.hf.model (and so by the shim)
    import kvpager.hf.checks
    from clients.kvpager_hf_model import check_model, check_model_and_pool, end_tokens  # noqa: F401

    assert (check_model, check_model_and_pool, end_tokens) == (
        kvpager.hf.checks.check_model, kvpager.hf.checks.check_model_and_pool, kvpager.hf.checks.end_tokens)
    with pytest.raises(AttributeError, match="no attribute 'no_such_check'"):
        kvpager.hf.model.no_such_check  # noqa: B018
    assert kvpager.hf.generate is kvpager.hf.generation.generate and set(kvpager.hf.__all__) <= set(dir(kvpager.hf))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel of this checkout installed (without dependencies) into a fresh
    environment that borrows this one's installed dependencies."""
    tmp = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), REPO],
                   check=True, timeout=600, capture_output=True)
    [wheel] = (tmp / "dist").glob("kvpager-*.whl")
    env_dir = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # numpy, zmq, torch, ... from this environment; kvpager only from the wheel
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                    "--prefix", str(env_dir), str(wheel)], check=True, timeout=600, capture_output=True)
    outside = tmp / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return python, wheel, outside, env


@pytest.mark.slow
def test_the_wheel_holds_the_package_kernels_and_tools(installed):
    _, wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for path in ("kvpager/hf/__init__.py", "kvpager/hf/generation.py", "kvpager/hf/model.py",
                 "kvpager/hf/graphs.py", "kvpager/py.typed", "kvpager/top.py"):
        assert path in names
    # the kernel sources and the benchmarks as package data, no data-files
    assert "kvpager/_cuda/paged_decode.cu" in names and "kvpager/_cuda/kvpager_common.cuh" in names
    assert "kvpager/_tools/bench_allocator.py" in names
    assert not any(".data/data/" in n for n in names)
    assert not any(n.startswith(("clients/", "tests/", "tools/")) for n in names)


@pytest.mark.slow
def test_installed_outside_a_checkout(installed):
    python, _, outside, env = installed
    code = ("import kvpager, kvpager.hf, kvpager.kernels as k; from kvpager.hf import generate, spec_for_model; "
            "print(kvpager.__file__); print(k.cuda_dir())")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300, cwd=outside,
                         env=env)
    assert out.returncode == 0, out.stderr
    where, cuda = out.stdout.split()
    env_dir = str(python.parent.parent)
    assert where.startswith(env_dir) and cuda == str(Path(where).parent / "_cuda")
    out = subprocess.run([str(python), "-c", "import clients"], capture_output=True, text=True, cwd=outside, env=env)
    assert out.returncode != 0  # no generic top-level module comes with the wheel
    bench = subprocess.run([str(python), "-m", "kvpager", "bench", "--json", "allocator", "attention"],
                           capture_output=True, text=True, timeout=600, cwd=outside, env=env)
    assert bench.returncode == 0, bench.stderr
    data = json.loads(bench.stdout)
    assert data["results"]["allocator"]["rows"] and data["failed"] == {}
    assert data["skipped"]["attention"] in ("no GPU",) or data["skipped"]["attention"].startswith("needs cupy")
