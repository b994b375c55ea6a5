"""Every cuda/*.cu builds with the machine's nvcc for sm_80 and sm_90 (no GPU needed);
the wgmma kernels (SM90A) for sm_90a only, without register spills.

Each file is built with its default specialisation (the #ifndef defaults in
the source: bfloat16, head dim 128, block size 16, group 4; float32 for the
CUDA-core decode) plus, for the attention kernels, other dtypes and shapes, so
a broken kernel fails CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvpager import env

CUDA_DIR = Path(__file__).resolve().parent.parent / "cuda"
NVCC = shutil.which("nvcc")
ARCHES = ["sm_80", "sm_90", *env.cuda_arch_list()]
EXTRA = {
    "paged_decode.cu": [["-DSUBGROUP=8"], ["-DHEAD_DIM=48", "-DCH=8"], ["-DHEAD_DIM=208", "-DSUBGROUP=1"],
                        ["-DCH=1", "-DBLOCK_SIZE=64"], ["-DHEAD_DIM=512", "-DSUBGROUP=2", "-DCH=1"],
                        ["-DHEAD_DIM=272", "-DSUBGROUP=2", "-DCH=1"], ["-DHEAD_DIM=512", "-DSUBGROUP=1", "-DCH=1"],
                        ["-DSUBGROUP=7"], ["-DHEAD_DIM=64", "-DSUBGROUP=3"]],
    "merge_splits.cu": [["-DKV_DTYPE=0", "-DHEAD_DIM=64"], ["-DKV_DTYPE=2", "-DHEAD_DIM=256"],
                        ["-DKV_DTYPE=1", "-DHEAD_DIM=512"], ["-DKV_DTYPE=0", "-DHEAD_DIM=272"],
                        ["-DHEAD_DIM=80"], ["-DHEAD_DIM=32"], ["-DHEAD_DIM=96"]],
    "block_copy.cu": [["-DUNROLL=1"], ["-DUNROLL=32"]],
    "sample_rows.cu": [["-DLOGIT_DTYPE=0"], ["-DLOGIT_DTYPE=2"]],
    "token_logprobs.cu": [["-DTOP=0", "-DLOGIT_DTYPE=0"], ["-DTOP=32", "-DLOGIT_DTYPE=2", "-DTHREADS=256"]],
    "paged_decode_tc.cu": [["-DKV_DTYPE=0", "-DHEAD_DIM=96", "-DGROUP=16", "-DBLOCK_SIZE=8",
                            "-DSTAGES=4"], ["-DHEAD_DIM=256", "-DGROUP=1", "-DSTAGES=2"],
                           ["-DHPC=8", "-DWPH=1"], ["-DKV_DTYPE=0", "-DHPC=2", "-DWPH=4", "-DGROUP=16"],
                           ["-DHPC=4", "-DWPH=1", "-DBLOCK_SIZE=8", "-DHEAD_DIM=64"],
                           ["-DHEAD_DIM=80", "-DGROUP=8"], ["-DHEAD_DIM=32", "-DHPC=4", "-DWPH=1"],
                           ["-DCP_EVICT_FIRST=1", "-DCP_L2_PREFETCH=128"], ["-DCP_EVICT_FIRST=1", "-DKV_DTYPE=0"],
                           # heads wider than 256: two warps a tile (DSPLIT), pad columns at 272
                           ["-DHEAD_DIM=512", "-DWPH=2", "-DSTAGES=2"],
                           ["-DKV_DTYPE=0", "-DHEAD_DIM=272", "-DGROUP=16", "-DWPH=2", "-DBLOCK_SIZE=8"],
                           ["-DHEAD_DIM=448", "-DGROUP=1", "-DHPC=2", "-DWPH=1", "-DSTAGES=2", "-DBLOCK_SIZE=64"],
                           # groups of any count up to 16 (Qwen2.5's 7, Llama-3.2-3B's 3, StarCoder2's 12)
                           ["-DGROUP=7"], ["-DGROUP=12", "-DHPC=4", "-DWPH=1"], ["-DKV_DTYPE=0", "-DGROUP=3"],
                           # past 16: chunks of 16 heads sharing each staged tile (Falcon-7B's 71,
                           # StarCoder's 48, 128 over one kv head); heads wider than 256: a CTA a chunk
                           ["-DGROUP=71", "-DHEAD_DIM=64", "-DWPH=3"], ["-DKV_DTYPE=0", "-DGROUP=29", "-DWPH=2"],
                           ["-DGROUP=48", "-DWPH=4", "-DSTAGES=4"], ["-DGROUP=128", "-DWPH=1", "-DBLOCK_SIZE=8"],
                           ["-DHEAD_DIM=64", "-DGROUP=128", "-DWPH=2"], ["-DHEAD_DIM=256", "-DGROUP=48", "-DWPH=2"],
                           ["-DHEAD_DIM=512", "-DGROUP=20", "-DWPH=2", "-DSTAGES=2"]],
    "cascade_prefix.cu": [["-DKV_DTYPE=0", "-DHEAD_DIM=64", "-DGROUP=1"],
                          ["-DHEAD_DIM=256", "-DGROUP=16", "-DBLOCK_SIZE=8"], ["-DHEAD_DIM=80", "-DMT=1"],
                          ["-DGROUP=7"], ["-DHEAD_DIM=64", "-DGROUP=12", "-DMT=1"], ["-DHEAD_DIM=64", "-DGROUP=71"]],
    "paged_prefill.cu": [["-DKV_DTYPE=0", "-DHEAD_DIM=96", "-DGROUP=1"],
                         ["-DHEAD_DIM=256", "-DGROUP=16", "-DBLOCK_SIZE=8"], ["-DMT=1"],
                         ["-DHEAD_DIM=80", "-DGROUP=4"], ["-DHEAD_DIM=240", "-DGROUP=2"],
                         # heads wider than 256: two warps a query row (DSPLIT), pad columns at 272 and 400
                         ["-DHEAD_DIM=512", "-DGROUP=2", "-DMT=1"], ["-DKV_DTYPE=0", "-DHEAD_DIM=272", "-DMT=1",
                                                                   "-DGROUP=16", "-DBLOCK_SIZE=8"],
                         ["-DHEAD_DIM=400", "-DMT=1", "-DGROUP=1", "-DBLOCK_SIZE=64"],
                         ["-DGROUP=7"], ["-DKV_DTYPE=0", "-DHEAD_DIM=64", "-DGROUP=3", "-DMT=1"], ["-DGROUP=12"],
                         ["-DHEAD_DIM=64", "-DGROUP=71"], ["-DHEAD_DIM=256", "-DGROUP=48", "-DMT=1"],
                         # a large group in chunks of HCH heads a tile (Falcon-7B's 71 in 9 of 8)
                         ["-DHEAD_DIM=64", "-DGROUP=71", "-DHCH=8"], ["-DHEAD_DIM=256", "-DGROUP=71", "-DHCH=8",
                                                                      "-DMT=1"],
                         ["-DKV_DTYPE=0", "-DGROUP=20", "-DHCH=6", "-DBLOCK_SIZE=8"]],
}
# FP8 pools (KV_FP8 1: e4m3, 2: e5m2): the conversions need sm_89 or later, so these
# build only for such arches (kvpager refuses FP8 pools on older GPUs).
FP8_EXTRA = {
    "kv_write.cu": [["-DKV_FP8=1"], ["-DKV_FP8=2", "-DKV_DTYPE=0"]],
    "paged_decode_tc.cu": [["-DKV_FP8=1"], ["-DKV_FP8=2", "-DKV_DTYPE=0", "-DGROUP=16", "-DBLOCK_SIZE=8"],
                           ["-DKV_FP8=1", "-DGROUP=48", "-DWPH=4", "-DSTAGES=6"],
                           ["-DKV_FP8=1", "-DHEAD_DIM=48", "-DHPC=4", "-DWPH=1"],
                           ["-DKV_FP8=1", "-DHEAD_DIM=256", "-DGROUP=1", "-DSTAGES=2"],
                           ["-DKV_FP8=2", "-DHEAD_DIM=80", "-DGROUP=8", "-DCP_L2_PREFETCH=128"],
                           ["-DKV_FP8=1", "-DCP_EVICT_FIRST=1", "-DCP_L2_PREFETCH=256"]],
    "paged_prefill.cu": [["-DKV_FP8=1"], ["-DKV_FP8=2", "-DKV_DTYPE=0", "-DHEAD_DIM=96", "-DGROUP=1"],
                         ["-DKV_FP8=1", "-DHEAD_DIM=256", "-DGROUP=16", "-DBLOCK_SIZE=8"],
                         ["-DKV_FP8=1", "-DHEAD_DIM=80", "-DMT=1"],
                         ["-DKV_FP8=1", "-DHEAD_DIM=64", "-DGROUP=71", "-DHCH=8"]],
    "cascade_prefix.cu": [["-DKV_FP8=1"], ["-DKV_FP8=2", "-DKV_DTYPE=0", "-DHEAD_DIM=64", "-DGROUP=1"],
                          ["-DKV_FP8=1", "-DHEAD_DIM=256", "-DGROUP=16", "-DBLOCK_SIZE=8"],
                          ["-DKV_FP8=2", "-DHEAD_DIM=80", "-DMT=1"]],
}

# Kernels on wgmma: built for sm_90a alone (-gencode=arch=compute_90a,code=sm_90a), each
# specialisation checked for register spills; the plain targets refuse them (#error).
SM90A = {
    "paged_prefill_sm90.cu": [
        ["-DKV_DTYPE=0"], ["-DHEAD_DIM=64"], ["-DKV_DTYPE=0", "-DHEAD_DIM=64", "-DGROUP=1", "-DBLOCK_SIZE=8"],
        ["-DGROUP=8", "-DBLOCK_SIZE=64"], ["-DGROUP=16", "-DBLOCK_SIZE=8", "-DWG=1"],
        ["-DGROUP=1", "-DBN=128", "-DSTAGES=2"], ["-DKV_DTYPE=0", "-DHEAD_DIM=64", "-DBN=128", "-DGROUP=16"],
        ["-DHEAD_DIM=64", "-DWG=1", "-DBN=64", "-DSTAGES=4", "-DBLOCK_SIZE=64", "-DGROUP=8"],
        ["-DVN=64"], ["-DKV_DTYPE=0", "-DWG=1", "-DBN=128", "-DGROUP=2", "-DBLOCK_SIZE=32"],
        ["-DOVERLAP=1"], ["-DOVERLAP=1", "-DKV_DTYPE=0", "-DHEAD_DIM=64", "-DBN=128", "-DGROUP=16"],
        ["-DOVERLAP=1", "-DWG=1", "-DBN=128", "-DBLOCK_SIZE=8", "-DGROUP=1"],
        ["-DOVERLAP=1", "-DSTAGES=4", "-DBLOCK_SIZE=64", "-DGROUP=8", "-DVN=64"],
        ["-DWS=1"], ["-DWS=1", "-DOVERLAP=1", "-DKV_DTYPE=0", "-DGROUP=16", "-DBLOCK_SIZE=8"],
        ["-DWS=1", "-DHEAD_DIM=64", "-DBN=128", "-DSTAGES=2", "-DGROUP=1"],
        ["-DWS=1", "-DOVERLAP=1", "-DHEAD_DIM=64", "-DBN=128", "-DBLOCK_SIZE=64", "-DGROUP=4"],
        ["-DWS=1", "-DBN=128", "-DSTAGES=3", "-DGROUP=2", "-DBLOCK_SIZE=32"],
        ["-DWS=1", "-DOVERLAP=1", "-DBN=128"], ["-DWS=1", "-DOVERLAP=1", "-DBN=128", "-DPINGPONG=0"],
        ["-DWS=1", "-DOVERLAP=1", "-DKV_DTYPE=0", "-DHEAD_DIM=64", "-DBN=128", "-DSTAGES=4", "-DGROUP=8"],
        ["-DWS=1", "-DBN=128", "-DSTAGES=3", "-DTMA=1"], ["-DWS=1", "-DTMA=1", "-DBLOCK_SIZE=8", "-DGROUP=8"],
        ["-DWS=1", "-DTMA=1", "-DKV_DTYPE=0", "-DHEAD_DIM=64", "-DBN=128", "-DSTAGES=2", "-DBLOCK_SIZE=256"],
        ["-DWS=1", "-DOVERLAP=1", "-DBN=128", "-DTMA=1", "-DBLOCK_SIZE=32", "-DGROUP=2"],
        ["-DWS=1", "-DBN=128", "-DSTAGES=3", "-DTMA=1", "-DPERSIST=1"],
        ["-DWS=1", "-DPERSIST=1", "-DKV_DTYPE=0", "-DHEAD_DIM=64", "-DBN=128", "-DSTAGES=2", "-DGROUP=16"],
        ["-DWS=1", "-DPERSIST=1", "-DTMA=1", "-DBLOCK_SIZE=8", "-DGROUP=1"],
        ["-DHEAD_DIM=256", "-DVN=64", "-DBN=64", "-DSTAGES=2", "-DWS=1", "-DTMA=1", "-DPERSIST=1"],
        ["-DHEAD_DIM=256", "-DVN=64", "-DBN=64", "-DSTAGES=2", "-DKV_DTYPE=0", "-DGROUP=16", "-DBLOCK_SIZE=8"],
        ["-DHEAD_DIM=256", "-DVN=64", "-DBN=64", "-DSTAGES=2", "-DWG=1", "-DGROUP=1", "-DBLOCK_SIZE=64"],
        ["-DWS=1", "-DOVERLAP=1", "-DBN=128", "-DGROUP=7"], ["-DWG=1", "-DGROUP=6"], ["-DWS=1", "-DGROUP=12", "-DTMA=1"],
        ["-DWS=1", "-DHEAD_DIM=64", "-DGROUP=71", "-DTMA=1", "-DPERSIST=1"], ["-DGROUP=48", "-DOVERLAP=1"],
        # a large group in chunks of HCH heads a tile
        ["-DWS=1", "-DHEAD_DIM=64", "-DBN=128", "-DSTAGES=2", "-DGROUP=71", "-DHCH=8", "-DTMA=1", "-DPERSIST=1"],
        ["-DWS=1", "-DBN=128", "-DSTAGES=3", "-DGROUP=48", "-DHCH=16", "-DTMA=1", "-DPERSIST=1"],
        ["-DWG=1", "-DGROUP=71", "-DHCH=8"], ["-DGROUP=20", "-DHCH=6", "-DOVERLAP=1"],
        ["-DHEAD_DIM=256", "-DVN=64", "-DBN=64", "-DSTAGES=2", "-DWS=1", "-DTMA=1", "-DPERSIST=1", "-DGROUP=22",
         "-DHCH=11"],
    ],
    "cascade_prefix_sm90.cu": [
        ["-DGROUP=7"], ["-DWS=1", "-DGROUP=12", "-DWG=2"], ["-DWS=1", "-DHEAD_DIM=64", "-DGROUP=71"], ["-DKV_DTYPE=0"], ["-DHEAD_DIM=64", "-DGROUP=1"], ["-DGROUP=16", "-DBLOCK_SIZE=8", "-DWG=1"],
        ["-DKV_DTYPE=0", "-DHEAD_DIM=64", "-DBN=128", "-DSTAGES=2", "-DGROUP=8", "-DBLOCK_SIZE=64"],
        ["-DOVERLAP=1"], ["-DOVERLAP=1", "-DWG=1", "-DBN=128", "-DBLOCK_SIZE=32", "-DGROUP=2"],
        ["-DWS=1"], ["-DWS=1", "-DKV_DTYPE=0", "-DHEAD_DIM=64", "-DBN=128", "-DSTAGES=2", "-DGROUP=16"],
        ["-DWS=1", "-DOVERLAP=1", "-DGROUP=1", "-DBLOCK_SIZE=8"],
        ["-DWS=1", "-DBN=128", "-DSTAGES=2", "-DGROUP=8", "-DBLOCK_SIZE=64", "-DVN=64"],
        ["-DWS=1", "-DOVERLAP=1", "-DBN=128"],
        ["-DWS=1", "-DBN=128", "-DSTAGES=3", "-DTMA=1"],
        ["-DWS=1", "-DTMA=1", "-DKV_DTYPE=0", "-DHEAD_DIM=64", "-DBN=128", "-DSTAGES=2", "-DBLOCK_SIZE=64",
         "-DGROUP=16"],
        ["-DHEAD_DIM=256", "-DVN=64", "-DBN=64", "-DSTAGES=2", "-DWS=1", "-DTMA=1", "-DGROUP=2"],
        ["-DHEAD_DIM=256", "-DVN=64", "-DBN=64", "-DSTAGES=2", "-DKV_DTYPE=0", "-DGROUP=8", "-DBLOCK_SIZE=32"],
    ],
}


def _fp8_arch(arch: str) -> bool:
    digits = "".join(ch for ch in arch if ch.isdigit())
    return bool(digits) and int(digits) >= 89


def _jobs() -> list[tuple[str, str, list[str]]]:
    jobs = []
    for src in sorted(CUDA_DIR.glob("*.cu")):
        if src.name in SM90A:
            jobs += [(src.name, "sm_90a", defines) for defines in [[], *SM90A[src.name]]]
            continue
        for arch in ARCHES:
            fp8 = FP8_EXTRA.get(src.name, []) if _fp8_arch(arch) else []
            for defines in [[], *EXTRA.get(src.name, []), *fp8]:
                jobs.append((src.name, arch, defines))
    return jobs


def _build(job: tuple[str, str, list[str]], out_dir: str) -> tuple[tuple, int, str]:
    name, arch, defines = job
    out = os.path.join(out_dir, f"{name}.{arch}.{'_'.join(defines)}.cubin")
    target = ["-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v"] if arch == "sm_90a" else [f"-arch={arch}"]
    cmd = [NVCC, "--cubin", *target, "-std=c++17", "--use_fast_math", "-Werror",
           "all-warnings", f"-I{CUDA_DIR}", *defines, "-o", out, str(CUDA_DIR / name)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if arch == "sm_90a" and proc.returncode == 0 and "0 bytes spill stores, 0 bytes spill loads" not in log:
        return job, 1, f"register spills:\n{log}"
    return job, proc.returncode, log


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_every_kernel_file_compiles():
    jobs = _jobs()
    assert any("-DKV_FP8=2" in j[2] for j in jobs)  # sm_90 is always built
    assert {j[0] for j in jobs} >= {"paged_decode.cu", "paged_decode_tc.cu", "paged_prefill.cu", "merge_splits.cu",
                                    "cascade_prefix.cu", "kv_write.cu", "block_copy.cu", "swap.cu",
                                    "paged_prefill_sm90.cu", "cascade_prefix_sm90.cu"}
    assert {j[1] for j in jobs if j[0] in SM90A} == {"sm_90a"}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(os.cpu_count() or 2) as ex:
        results = list(ex.map(lambda j: _build(j, tmp), jobs))
    failed = [f"{job}: {log}" for job, rc, log in results if rc != 0 or "warning" in log]
    assert not failed, "\n".join(failed)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("name", sorted(SM90A))
def test_wgmma_kernels_refuse_other_targets(name):
    """Built for plain sm_90 (no wgmma) a wgmma kernel stops at its #error, not in ptxas."""
    with tempfile.TemporaryDirectory() as tmp:
        _, rc, log = _build((name, "sm_90", []), tmp)
    assert rc != 0 and "need the sm_90a target" in log


def test_every_source_opens_with_a_description():
    for src in CUDA_DIR.glob("*.cu"):
        first = src.read_text().splitlines()[0]
        assert first.startswith(f"// {src.name}:"), src.name


def test_the_loader_pastes_every_local_header():
    """NVRTC gets `kvpager.kernels.source`'s text, with no include path: every local
    `#include "x.cuh"` must be pasted (a line the loader's pattern misses, e.g. one with a
    trailing comment, would reach NVRTC and fail there, not under nvcc)."""
    from kvpager import kernels

    for src in sorted(CUDA_DIR.glob("*.cu")):
        text = kernels.source(src.name)
        assert '#include "' not in text, src.name
        for header in CUDA_DIR.glob("*.cuh"):
            if f'#include "{header.name}"' in src.read_text():
                assert header.read_text() in text, (src.name, header.name)
