"""Shared memory of each attention kernel's CTA, and how many CTAs fit on an SM.

One function per kernel, the formula of its source's header comment; the
planners (`kvpager.backends.cupy_decode`, `cupy_prefill`, `cupy_launches`)
size their layouts with it and the launches pass the same figure.
"""

from __future__ import annotations

from typing import Any

from kvpager.errors import UnsupportedConfiguration


def head_split(head_dim: int) -> int:
    """The tensor-core attention kernels' DSPLIT: the warps that share a query row (decode:
    a tile), each the MMAs of its part of the head dim (2 for heads wider than 256, whose
    row of O would not fit one warp's registers)."""
    return 2 if head_dim > 256 else 1


def head_part(head_dim: int) -> int:
    """The columns of a K/V row one warp reads where the head dim is split (`head_split`):
    the head dim rounded up to whole k-steps of 16 a part; the head dim itself otherwise."""
    split = head_split(head_dim)
    return -(-head_dim // (16 * split)) * 16 if split > 1 else head_dim


def decode_swizzled(head_dim: int, itemsize: int) -> bool:
    """Whether paged_decode_tc.cu keeps its stages' rows unpadded in the 128-byte XOR
    swizzle (its SW): rows of whole 128-byte lines (16-bit pools whose head dim, or a
    warp's part of a wider one, is whole 64-value regions, FP8 pools whose head dim is a
    multiple of 128)."""
    return head_part(head_dim) * itemsize % 128 == 0


def decode_row_bytes(head_dim: int, itemsize: int) -> int:
    """Bytes of a K/V row (a warp's part of it, `head_part`) in paged_decode_tc.cu's shared
    memory: unpadded where it swizzles (`decode_swizzled`), else padded by 16 bytes
    (itemsize 1, FP8: to an odd number of 16-byte chunks), so ldmatrix rows fall in
    different banks either way."""
    head_dim = head_part(head_dim)
    if decode_swizzled(head_dim, itemsize):
        return head_dim * itemsize
    if itemsize == 1:
        return head_dim if (head_dim // 16) % 2 else head_dim + 16
    return (head_dim + 8) * itemsize


def decode_tc_smem(head_dim: int, itemsize: int, warps: int, stages: int, group: int,
                   sets: int | None = None) -> int:
    """paged_decode_tc.cu with ``warps`` = HPC * WPH (a group past 16 heads: chunks x WPH):
    the stages of its ``sets`` stage sets (default: a set a warp; a group's chunks share
    one a place among WPH), each two 16-row K and V tiles a stage (swizzled ones with 128
    bytes to align them), and at least the float32 rows (``group``, at most 16, a warp) of
    the final merge (which reuses them). Heads wider than 256 (`head_split`): twice the
    warps, each with stages of its part of the rows, and each warp's partial scores of two
    tiles (2 x 8 floats a lane)."""
    split = head_split(head_dim)
    align = 128 if decode_swizzled(head_dim, itemsize) else 0
    scores = warps * split * 2 * 8 * 32 * 4 if split > 1 else 0
    sets = warps if sets is None else sets
    return max(sets * split * stages * 2 * 16 * decode_row_bytes(head_dim, itemsize) + align + scores,
               warps * group * head_dim * 4)


def prefill_smem(head_dim: int, mt: int, bn: int, stages: int, fp8: bool) -> int:
    """paged_prefill.cu: the query tile (64 * mt rows) and ``stages`` K and V tiles of
    ``bn`` rows, 16-bit rows padded by 8 elements; FP8: one converted K and V tile,
    the stages as stored (one byte an element, unpadded). Heads wider than 256
    (`head_split`): rows of the head dim rounded up to 32 (`head_part`), and each of the 8
    warps' partial scores (float32, ``mt`` x 16 rows x ``bn``)."""
    if fp8:
        return (64 * mt + 2 * bn) * (head_dim + 8) * 2 + 2 * stages * bn * head_dim
    split = head_split(head_dim)  # (a CTA runs 4 * split warps)
    if split == 1:
        return (64 * mt + 2 * stages * bn) * (head_dim + 8) * 2
    padded = head_part(head_dim) * split
    return (64 * mt + 2 * stages * bn) * (padded + 8) * 2 + 4 * split * mt * 16 * bn * 4


def prefill_sm90_smem(head_dim: int, warpgroups: int, bn: int, stages: int) -> int:
    """paged_prefill_sm90.cu: the query tile (64 rows per warpgroup) and ``stages`` K and V
    tiles of ``bn`` rows, unpadded (128-byte swizzle), and 1024 bytes to align them."""
    return (64 * warpgroups + 2 * stages * bn) * head_dim * 2 + 1024


def cascade_smem(head_dim: int, mt: int, bn: int, stages: int, fp8: bool = False) -> int:
    """cascade_prefix.cu: the member tile (64 * mt rows) and ``stages`` K and V tiles of
    ``bn`` rows, rows padded by 8 elements (FP8: one converted K and V tile, the stages as
    stored): the multi-token kernel's layout."""
    return prefill_smem(head_dim, mt, bn, stages, fp8)


def check_fits(smem: int, attrs: dict[str, Any], what: str) -> None:
    """UnsupportedConfiguration when a CTA's ``smem`` bytes exceed what one CTA may
    take on a device with ``attrs`` (a config's knobs can ask for more)."""
    most = int(attrs.get("MaxSharedMemoryPerBlockOptin", 232448))
    if smem > most:
        raise UnsupportedConfiguration(f"{what} needs {smem} bytes of shared memory per CTA; "
                                       f"this GPU allows {most}")


def resident(attrs: dict[str, Any], regs: int, static_smem: int, threads: int, smem: int) -> int:
    """CTAs of a kernel (``regs`` per thread, 0: unknown, taken as 128; ``static_smem``
    bytes of static shared memory) that fit on one SM of a device with ``attrs``
    (CUDA device attributes) at once: by registers, shared memory (1 KiB reserved
    per CTA) and threads."""
    regs = regs or 128
    by_regs = attrs.get("MaxRegistersPerMultiprocessor", 65536) // (threads * (-(-regs // 8) * 8))
    by_smem = attrs.get("MaxSharedMemoryPerMultiprocessor", 233472) // (smem + static_smem + 1024)
    by_threads = attrs.get("MaxThreadsPerMultiProcessor", 2048) // threads
    return int(max(1, min(by_regs, by_smem, by_threads)))
