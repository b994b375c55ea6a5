"""The CuPy backend: the pool on a CUDA GPU, kernels from `cuda/` (see `kvpager.kernels`).

The device pool is one raw ``cudaMalloc`` slab (not CuPy's memory pool), so one
CUDA IPC handle covers it; the host (swap) pool is pinned memory mapped into
the device's address space, so a single kernel moves any number of scattered
blocks each way. The remote tier's whole-block copies go through a pinned
staging buffer (`cupy_staging`); step plans are `cupy_plan`'s.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

import numpy as np

try:
    import cupy
    from cupy.cuda import runtime
except ImportError as e:  # make_backend turns this into BackendUnavailable
    raise ImportError(f"the cupy backend needs CuPy: {e}") from None

from kvpager import block_moves, cuda_release, kernels
from kvpager.backends.base import Backend
from kvpager.backends.cupy_staging import (
    HOST_ALLOC_MAPPED,
    HOST_ALLOC_PORTABLE,
    Staging,
    mapped_pointer,
)
from kvpager.backends.cupy_uploads import Uploads
from kvpager.errors import BackendUnavailable, InvalidArgument
from kvpager.kernel_config import KernelConfig, check_config
from kvpager.spec import PoolSpec


def storage_dtype(spec: PoolSpec) -> np.dtype:
    """The dtype of the CuPy arrays: the pool dtype, or uint16 bits for
    bfloat16 where this CuPy has no bfloat16."""
    try:
        cupy.empty(1, dtype=spec.np_dtype)
        return spec.np_dtype
    except Exception:
        if spec.dtype == "bfloat16":
            return np.dtype(np.uint16)
        raise


def _storage(backend: CupyBackend, spec: PoolSpec) -> None:
    """Set the backend's array dtypes (``dtype``: q, output and write inputs; ``kv_dtype``:
    the pool's CuPy arrays, raw uint8 bits for FP8) and, for FP8, its scales on the device."""
    backend.dtype = storage_dtype(spec)
    backend.kv_dtype = np.dtype(np.uint8) if spec.is_fp8 else backend.dtype
    backend.scales = cupy.asarray(spec.scales) if spec.is_fp8 else None


#: cudaErrorMemoryAllocation: what cudaMalloc / cudaHostAlloc answer where there is no room
_NO_MEMORY = 2


def _allocate(alloc: Any, nbytes: int, what: str, device: int) -> int:
    """``alloc(nbytes)``; BackendUnavailable naming the bytes (and, for the device,
    what is free) where the GPU, or the host's pinned memory, has no room for them."""
    try:
        return alloc(nbytes)
    except runtime.CUDARuntimeError as e:
        if getattr(e, "status", None) != _NO_MEMORY:
            raise
    free = ""
    if what == "device":
        try:
            free_bytes, total = runtime.memGetInfo()
            free = f" ({free_bytes:,} of its {total:,} bytes free)"
        except Exception:
            pass
    where = f"cuda:{device}" if what == "device" else "pinned host memory"
    raise BackendUnavailable(
        f"no room in {where}{free} for the {what} pool's {nbytes:,} bytes: make the pool smaller (fewer "
        "blocks or host blocks: kvpager serve --blocks / --memory / --host-blocks)") from None


def _release(device: int, dev_ptr: int, host_ptr: int) -> None:
    with cupy.cuda.Device(device):
        if dev_ptr:
            runtime.free(dev_ptr)
        if host_ptr:
            runtime.freeHost(host_ptr)


class CupyBackend(Backend):
    """K/V on ``cuda:device_index``: a raw device slab plus a mapped pinned host pool.
    ``config`` (`kvpager.KernelConfig`, default the production one): the kernels' tuning
    knobs for its block copies and, unless a plan is given its own, its step plans."""

    name = "cupy"
    xp = cupy

    def __init__(self, spec: PoolSpec, device_index: int = 0, config: KernelConfig | None = None):
        super().__init__(spec)
        self.config = check_config(config)
        kernels.check_geometry(spec.dtype, spec.head_dim, spec.block_size, spec.kv_dtype)
        try:
            count = runtime.getDeviceCount()
        except Exception as e:
            raise BackendUnavailable(f"CUDA is not usable here: {e}") from None
        if not 0 <= device_index < count:
            raise BackendUnavailable(f"cuda:{device_index} requested but {count} CUDA device(s) found")
        kernels.check_fp8(spec, int(device_index))
        self.index = int(device_index)
        self.uploads = Uploads()  # pinned buffers of step-plan uploads
        self.tma_maps: dict[int, Any] = {}  # the pool's TMA tensor maps by box rows (`cupy_tma.pool_map`)
        self._dev_ptr = self._host_ptr = 0
        self.staging = Staging(spec, self.index)  # the remote tier's block copies
        shape = (spec.num_blocks, *spec.block_shape)
        host_shape = (spec.num_host_blocks, *spec.block_shape)
        with cupy.cuda.Device(self.index):
            _storage(self, spec)
            self.num_sms = cupy.cuda.Device(self.index).attributes["MultiProcessorCount"]
            cuda_release.flush()  # what finalizers kept during a capture, before taking more
            self._dev_ptr = _allocate(runtime.malloc, spec.device_bytes, "device", self.index)
            self._finalizer = weakref.finalize(self, cuda_release.release, _release, self.index, self._dev_ptr, 0)
            runtime.memset(self._dev_ptr, 0, spec.device_bytes)
            mem = cupy.cuda.UnownedMemory(self._dev_ptr, spec.device_bytes, self, device_id=self.index)
            self.kv = cupy.ndarray(shape, dtype=self.kv_dtype, memptr=cupy.cuda.MemoryPointer(mem, 0))
            if spec.host_bytes:
                try:
                    self._host_ptr = _allocate(lambda n: runtime.hostAlloc(n, HOST_ALLOC_MAPPED | HOST_ALLOC_PORTABLE),
                                               spec.host_bytes, "host (swap)", self.index)
                except BackendUnavailable:
                    self._finalizer()  # the device pool goes now, not at the next collection
                    raise
                self._finalizer.detach()
                self._finalizer = weakref.finalize(
                    self, cuda_release.release, _release, self.index, self._dev_ptr, self._host_ptr)
                ctypes.memset(self._host_ptr, 0, spec.host_bytes)
                self._host_dev_ptr = mapped_pointer(self._host_ptr)
                buf = (ctypes.c_byte * spec.host_bytes).from_address(self._host_ptr)
                self.host_kv = np.frombuffer(buf, dtype=spec.kv_np_dtype).reshape(host_shape)
            else:
                self._host_dev_ptr = 0
                self.host_kv = np.zeros(host_shape, dtype=spec.kv_np_dtype)

    @classmethod
    def over_pointer(cls, spec: PoolSpec, device_index: int, ptr: int, owner: Any = None,
                     config: KernelConfig | None = None) -> CupyBackend:
        """A backend over an existing device pool of ``spec.device_bytes`` at ``ptr``
        (e.g. another process's slab opened with cudaIpcOpenMemHandle). It frees
        nothing (``owner`` keeps the memory alive: its views reference it) and has
        no host pool: write, copy_blocks and attend work, swaps are the owner's."""
        kernels.check_geometry(spec.dtype, spec.head_dim, spec.block_size, spec.kv_dtype)
        self = cls.__new__(cls)
        Backend.__init__(self, spec)
        self.config = check_config(config)
        self.index = int(device_index)
        self.uploads = Uploads()
        self.tma_maps = {}
        self._dev_ptr, self._host_ptr, self._host_dev_ptr = int(ptr), 0, 0
        self.staging = Staging(spec, self.index)  # the remote tier's block copies
        self._finalizer = weakref.finalize(self, int)  # nothing to release
        self.host_kv = np.zeros((0, *spec.block_shape), dtype=spec.kv_np_dtype)
        kernels.check_fp8(spec, self.index)
        with cupy.cuda.Device(self.index):
            _storage(self, spec)
            self.num_sms = cupy.cuda.Device(self.index).attributes["MultiProcessorCount"]
            mem = cupy.cuda.UnownedMemory(self._dev_ptr, spec.device_bytes, owner, device_id=self.index)
            self.kv = cupy.ndarray((spec.num_blocks, *spec.block_shape), dtype=self.kv_dtype,
                                   memptr=cupy.cuda.MemoryPointer(mem, 0))
        return self

    # -- identity, for the daemon ----------------------------------------------------
    @property
    def device(self) -> str:
        return f"cuda:{self.index}"

    @property
    def slab_nbytes(self) -> int:
        return self.spec.device_bytes

    def ipc_handle(self) -> bytes:
        """cudaIpcGetMemHandle of the device slab: another process opens the whole pool with it."""
        self._check_open()
        with cupy.cuda.Device(self.index):
            return bytes(runtime.ipcGetMemHandle(self._dev_ptr))

    def device_uuid(self) -> str:
        """The GPU's UUID as nvidia-smi prints it (GPU-xxxxxxxx-...)."""
        raw = bytes(runtime.getDeviceProperties(self.index)["uuid"])
        h = raw.hex()
        return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"

    # -- storage ---------------------------------------------------------------------
    def device_array(self) -> Any:
        self._check_open()
        return self.kv

    def host_array(self) -> np.ndarray:
        self._check_open()
        return self.host_kv

    # -- kernels ---------------------------------------------------------------------
    def write(self, layer: int, slots: np.ndarray, k: Any, v: Any) -> None:
        self._check_open()
        with cupy.cuda.Device(self.index):
            block_moves.write(self.kv, self.spec, int(layer), slots, k, v, self.index, self.dtype, self.scales)

    def copy_blocks(self, pairs: np.ndarray) -> None:
        self._check_open()
        with cupy.cuda.Device(self.index):
            block_moves.copy_blocks(self.kv, self.spec, pairs, self.index, self.config)

    def swap_out(self, pairs: np.ndarray) -> None:
        self._check_open()
        with cupy.cuda.Device(self.index):
            block_moves.swap(self._dev_ptr, self._host_dev_ptr, self.spec, pairs, self.spec.num_blocks,
                         self.spec.num_host_blocks, self.index, "swap_out")
            # The host pool is read through a NumPy view: the copy must be done first.
            cupy.cuda.get_current_stream().synchronize()

    def swap_in(self, pairs: np.ndarray) -> None:
        self._check_open()
        with cupy.cuda.Device(self.index):
            block_moves.swap(self._host_dev_ptr, self._dev_ptr, self.spec, pairs,
                         self.spec.num_host_blocks, self.spec.num_blocks, self.index, "swap_in")

    # -- the remote tier: whole blocks through a pinned staging buffer ------------------
    def read_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        """One swap launch per staging chunk (device -> pinned host), then a host copy into ``out``."""
        self._check_open()
        self.staging.read_blocks(self._dev_ptr, blocks, out)

    def write_blocks(self, blocks: np.ndarray, payloads: Any) -> None:
        """Host copies into the pinned staging buffer, then one swap launch per
        chunk (pinned host -> device), synchronised: the K/V is in place on return."""
        self._check_open()
        self.staging.write_blocks(self._dev_ptr, blocks, payloads)

    def plan(self, tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray,
             slots: np.ndarray | None, **options: Any) -> Any:
        """A `CupyPlan`: the step uploaded once; ``options``: ``num_rows`` / ``width``
        capacities (in-place updates for CUDA graphs), ``num_splits`` (overrides the
        decode split-K planner), ``num_q_heads`` (prepare the launches now),
        ``cascade`` (shared-prefix attention: None when it pays, True, False),
        ``host_bound`` (a decode step paced by its host: cascade only from
        `kvpager.cascade.HOST_BOUND_MIN_SAVED` bytes spared a layer, and no
        split-K, whose merge is a launch a layer, where the unsplit decode has a
        CTA for every SM),
        ``config`` (`kvpager.KernelConfig`; default: this backend's)."""
        from kvpager.backends.cupy_plan import CupyPlan
        from kvpager.plan import check_plan_options

        check_plan_options(options)
        self._check_open()
        with cupy.cuda.Device(self.index):
            return CupyPlan(self, tables, seq_lens, query_lens, slots, **options)

    def attend(self, layer: int, q: Any, block_tables: np.ndarray, seq_lens: np.ndarray,
               query_lens: np.ndarray, scale: float, out: Any = None,
               num_splits: int | None = None, *, window: int | None = None,
               softcap: float | None = None, config: KernelConfig | None = None, sinks: Any = None) -> Any:
        """See `Backend.attend`: a one-layer plan. ``out`` (optional) receives the
        result; ``num_splits`` overrides the decode split-K planner and ``config``
        the backend's kernel config (tests, benchmarks)."""
        from kvpager.plan import check_step

        self._check_open()
        if getattr(q, "ndim", 0) != 3:
            raise InvalidArgument(f"q must be [tokens, num_q_heads, head_dim], got {getattr(q, 'shape', None)}")
        step = check_step(self.spec, block_tables, seq_lens, query_lens)
        with cupy.cuda.Device(self.index):  # this pool's GPU, whichever is current (a rank of several)
            plan = self.plan(*step, num_splits=num_splits, config=config)
            return plan.attend(int(layer), q, scale, out, window=window, softcap=softcap, sinks=sinks)

    def synchronize(self) -> None:
        with cupy.cuda.Device(self.index):
            cupy.cuda.Device(self.index).synchronize()

    def close(self) -> None:
        self.closed = True  # this pool's plans refuse their calls from now on: the slab is freed below
        self.moves.bump()
        if self._dev_ptr:
            self.synchronize()
            self.staging.free()
            self.tma_maps.clear()
            self.kv = None
            self.host_kv = np.zeros((0, *self.spec.block_shape), dtype=self.spec.kv_np_dtype)
            self._finalizer()
            self._dev_ptr = self._host_ptr = self._host_dev_ptr = 0

    def _check_open(self) -> None:
        if not self._dev_ptr:
            raise InvalidArgument("this CupyBackend is closed")
