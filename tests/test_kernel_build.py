"""`kvpager.kernel_build` on the CPU, with a stand-in for CuPy's NVRTC bindings: the
cubin's disk cache (keyed by source, options, target and NVRTC version; a second
compile reads the file), the target passed as ``-arch``, and every way a build
can fail (no NVRTC, a target it lacks, a compile error with its log) as a typed
`UnsupportedConfiguration`, leaving no cache file behind."""

from __future__ import annotations

import os

import pytest

from kvpager import kernel_build
from kvpager.errors import UnsupportedConfiguration

nvrtc_pkg = pytest.importorskip("cupy_backends.cuda.libs")


class FakeNvrtc:
    """The five calls kernel_build makes, recording what it asked."""

    class NVRTCError(Exception):
        pass

    def __init__(self, version=(12, 6), archs=(75, 80, 86, 89, 90)):
        self.version, self.archs = version, list(archs)
        self.compiled: list[tuple[str, list[str]]] = []
        self.destroyed = 0

    def getVersion(self):  # noqa: N802 (CuPy's names)
        return self.version

    def getSupportedArchs(self):  # noqa: N802
        return self.archs

    def createProgram(self, src, name, headers, include_names):  # noqa: N802
        return {"src": src, "name": name}

    def compileProgram(self, prog, options):  # noqa: N802
        self.compiled.append((prog["src"], list(options)))
        if "#error" in prog["src"]:
            raise self.NVRTCError("NVRTC_ERROR_COMPILATION (6)")

    def getCUBIN(self, prog):  # noqa: N802
        return ("cubin of " + prog["src"] + " " + " ".join(self.compiled[-1][1])).encode()

    def getProgramLog(self, prog):  # noqa: N802
        return "kernel.cu(1): error: the log"

    def destroyProgram(self, prog):  # noqa: N802
        self.destroyed += 1


@pytest.fixture
def fake(monkeypatch, tmp_path):
    f = FakeNvrtc()
    monkeypatch.setattr(nvrtc_pkg, "nvrtc", f, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return f


def test_a_cubin_is_compiled_once_and_then_read_from_disk(fake, tmp_path):
    path = kernel_build.compile_cubin("int x;", "k.cu", ("-DA=1",), "sm_90a")
    assert path.startswith(str(tmp_path / "kvpager" / "cubin")) and path.endswith(".cubin")
    with open(path, "rb") as f:
        assert f.read() == b"cubin of int x; -DA=1 -arch=sm_90a"
    assert fake.compiled == [("int x;", ["-DA=1", "-arch=sm_90a"])] and fake.destroyed == 1
    assert kernel_build.compile_cubin("int x;", "k.cu", ("-DA=1",), "sm_90a") == path
    assert len(fake.compiled) == 1  # the second call compiled nothing
    other = {kernel_build.compile_cubin("int y;", "k.cu", ("-DA=1",), "sm_90a"),
             kernel_build.compile_cubin("int x;", "k.cu", ("-DA=2",), "sm_90a"),
             kernel_build.compile_cubin("int x;", "k.cu", ("-DA=1",), "sm_80")}
    assert len(other) == 3 and path not in other and len(fake.compiled) == 4
    assert list((tmp_path / "kvpager" / "cubin").glob("*.tmp")) == []


def test_the_cache_key_covers_every_input():
    base = ("src", ("-DA=1",), "sm_90a", (12, 6))
    keys = {kernel_build.cache_key(*base), kernel_build.cache_key("src2", *base[1:]),
            kernel_build.cache_key("src", ("-DA=2",), "sm_90a", (12, 6)),
            kernel_build.cache_key("src", ("-DA=1",), "sm_90", (12, 6)),
            kernel_build.cache_key("src", ("-DA=1",), "sm_90a", (12, 8)),
            kernel_build.cache_key("src", ("-DA", "=1"), "sm_90a", (12, 6))}
    assert len(keys) == 6 and kernel_build.cache_key(*base) == kernel_build.cache_key(*base)


def test_a_target_nvrtc_lacks_is_refused_before_compiling(fake):
    fake.archs = [75, 80, 86, 89]
    with pytest.raises(UnsupportedConfiguration, match="NVRTC 12.6 cannot build for sm_90a"):
        kernel_build.compile_cubin("int x;", "k.cu", (), "sm_90a")
    assert fake.compiled == []


def test_a_compile_error_is_typed_and_carries_the_log(fake, tmp_path):
    with pytest.raises(UnsupportedConfiguration, match="(?s)could not build k.cu.*the log"):
        kernel_build.compile_cubin("#error no", "k.cu", ("-DA=1",), "sm_90a")
    assert fake.destroyed == 1
    assert list(tmp_path.rglob("*.cubin")) == []


def test_no_nvrtc_is_typed(monkeypatch):
    class Broken:
        def getVersion(self):  # noqa: N802
            raise OSError("libnvrtc.so.12: cannot open shared object file")

    monkeypatch.setattr(nvrtc_pkg, "nvrtc", Broken(), raising=False)
    with pytest.raises(UnsupportedConfiguration, match="NVRTC is not available"):
        kernel_build.compile_cubin("int x;", "k.cu", (), "sm_90a")
    assert kernel_build.supports("sm_90a") is False


def test_targets_are_parsed():
    assert kernel_build.arch_number("sm_90a") == 90 and kernel_build.arch_number("sm_120") == 120
    for bad in ("compute_90a", "sm_", "90"):
        with pytest.raises(UnsupportedConfiguration, match="not a CUDA target"):
            kernel_build.arch_number(bad)


def test_an_unwritable_cache_still_gives_a_cubin(fake, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where the cache folder would go
    path = kernel_build.compile_cubin("int x;", "k.cu", (), "sm_90a")
    try:
        with open(path, "rb") as f:
            assert f.read() == b"cubin of int x; -arch=sm_90a"
    finally:
        os.unlink(path)
