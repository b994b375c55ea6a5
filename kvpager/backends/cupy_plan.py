"""The step plan of the CuPy backend: a step's metadata on the GPU and its launches.

At construction the step's block tables, per-item lengths and slots are
packed into one host buffer and uploaded with one copy on the caller's
stream into one device buffer. The first ``attend`` with a given number of
query heads picks the kernel (decode on tensor cores, CUDA-core decode for
float32, or the multi-token kernel), its layout and split count, and packs
the launch arguments (`kvpager.launch.Launch`). Every later ``write`` /
``attend`` sets a few pointers and launches: no validation beyond the
tensors, no upload, no synchronization, no allocation but the output.

With ``num_rows`` / ``width`` capacities a decode plan can be refilled in
place by `CupyPlan.update` (rows past the step's sequences are padding: they
read nothing, write nothing and attend to zeros), which is what a captured
CUDA graph needs: the same buffers at the same addresses, the same grid.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from kvpager import kernels
from kvpager.errors import InvalidArgument
from kvpager.launch import Launch, current_stream, f32, i32, ptr, torch_stream
from kvpager.plan import StepPlan, check_layer, check_q_shape, check_scale, check_step

_LOG2E = 1.4426950408889634


class CupyPlan(StepPlan):
    """See the module docstring. Build it through `kvpager.plan.make_plan` or `KVPool.plan`."""

    def __init__(self, backend: Any, tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray,
                 slots: np.ndarray | None, *, num_rows: int | None = None, width: int | None = None,
                 num_splits: int | None = None, num_q_heads: int | None = None):
        import cupy

        spec = self.spec = backend.spec
        self.backend, self.device = backend, backend.index
        nseq = len(seq_lens)
        self.rows = int(num_rows or nseq)
        self.width = int(max(width or 0, tables.shape[1], 1))
        if self.rows < nseq:
            raise InvalidArgument(f"num_rows={num_rows} is less than the step's {nseq} sequences")
        self.decode = bool((query_lens == 1).all()) or spec.dtype == "float32"
        if self.rows > nseq and not (query_lens == 1).all():
            raise InvalidArgument("padding rows (num_rows) need a decode step: one query token per sequence")
        self.num_splits = num_splits
        self.has_slots = slots is not None
        # Items: decode kernels run one per query token (one per row when padded).
        self.items = self.rows if self.rows > nseq else int(query_lens.sum())
        self._tokens = self.items if self.decode else int(query_lens.sum())
        n32 = self.rows * self.width + 2 * self.items + 3 * self.rows
        self._n32 = -(-n32 // 2) * 2  # slots (int64) start 8-byte aligned
        nbytes = self._n32 * 4 + self.items * 8
        self._host = np.empty(nbytes, dtype=np.uint8)  # _fill writes every field
        self._dev = cupy.empty(nbytes, dtype=cupy.uint8)  # the backend made this device current
        base = self._dev.data.ptr
        w = self.rows * self.width
        self._offsets = {"tables": 0, "item_seq": w, "item_len": w + self.items,
                         "seq_lens": w + 2 * self.items, "query_lens": w + 2 * self.items + self.rows,
                         "q_start": w + 2 * self.items + 2 * self.rows}
        self.ptrs = {k: base + 4 * off for k, off in self._offsets.items()}
        self.ptrs["slots"] = base + 4 * self._n32
        self._attn: dict[int, list[Launch]] = {}
        self._write: Launch | None = None
        self._kv_shape = (self.num_tokens, spec.num_kv_heads, spec.head_dim)
        self._scale = check_scale(None, spec.head_dim) * _LOG2E
        self._last_scale: Any = None
        self._scale_given = self._scale
        self._torch_type, self._torch_dtype, self._stream = _torch_kinds(spec.dtype)
        self._fill(tables, seq_lens, query_lens, slots)
        if num_q_heads is not None:
            self._prepare(int(num_q_heads))

    # -- metadata ---------------------------------------------------------------------
    def _view(self, name: str, n: int) -> np.ndarray:
        off = self._offsets[name]
        return self._host[4 * off : 4 * (off + n)].view(np.int32)

    def _fill(self, tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray,
              slots: np.ndarray | None) -> None:
        """Pack the step into the host buffer and upload it on the caller's stream."""
        from cupy.cuda import runtime

        nseq, w = tables.shape
        self.tables, self.seq_lens, self.query_lens, self.slots = tables, seq_lens, query_lens, slots
        t = self._view("tables", self.rows * self.width).reshape(self.rows, self.width)
        t[:nseq, :w] = tables
        t[:nseq, w:] = 0
        t[nseq:] = 0
        item_seq, item_len = self._view("item_seq", self.items), self._view("item_len", self.items)
        if not self.decode:  # the multi-token kernel reads the per-sequence fields only
            item_len = seq_lens
        elif self.items == nseq or self.items > int(query_lens.sum()):  # one item per row
            item_seq[:] = np.arange(self.items, dtype=np.int32)
            item_len[:nseq] = seq_lens
            item_len[nseq:] = 0  # padding: reads nothing
        else:  # one item per query token (float32 multi-token)
            starts = np.cumsum(query_lens) - query_lens
            item_seq[:] = np.repeat(np.arange(nseq, dtype=np.int32), query_lens)
            j = np.arange(self.items, dtype=np.int32) - np.repeat(starts, query_lens).astype(np.int32)
            item_len[:] = np.repeat(seq_lens - query_lens, query_lens) + j + 1
        for name, arr in (("seq_lens", seq_lens), ("query_lens", query_lens),
                          ("q_start", np.cumsum(query_lens) - query_lens)):
            view = self._view(name, self.rows)
            view[:nseq] = arr
            view[nseq:] = 0
        s = self._host[4 * self._n32 :].view(np.int64)
        if slots is not None:
            s[: len(slots)] = slots
            s[len(slots) :] = -1
        else:
            s[:] = -1
        self.max_len = int(item_len.max()) if self.items else 0
        with_stream = current_stream(self.device)
        runtime.memcpyAsync(self._dev.data.ptr, self._host.ctypes.data, self._host.nbytes,
                            runtime.memcpyHostToDevice, with_stream)

    def update(self, tables: Any, seq_lens: Any, query_lens: Any = None, slots: Any = None) -> None:
        """Refill with another decode step that fits the capacities (at most
        ``num_rows`` sequences, tables at most ``width`` blocks wide), on the
        caller's stream: the buffers keep their addresses and the launches
        their grids, so a CUDA graph captured over this plan replays the new step.
        The split count chosen at the first ``attend`` stays."""
        tables, seq_lens, query_lens, slots = check_step(self.spec, tables, seq_lens, query_lens, slots)
        if not self.decode or not (query_lens == 1).all():
            raise InvalidArgument("only a decode plan (one query token per sequence) can be updated in place")
        if len(seq_lens) > self.rows or tables.shape[1] > self.width:
            raise InvalidArgument(
                f"step of {len(seq_lens)} sequences x {tables.shape[1]} blocks exceeds the plan's "
                f"capacity of {self.rows} x {self.width}")
        if self.items != self.rows:
            raise InvalidArgument("this plan runs one item per query token; only a plan of one item "
                                  "per sequence (a decode step, or num_rows given) can be updated")
        if (slots is not None) != self.has_slots:
            raise InvalidArgument("update must give slots exactly when the plan was built with them")
        self._fill(tables, seq_lens, query_lens, slots)

    @property
    def num_tokens(self) -> int:
        return self._tokens

    # -- launches -------------------------------------------------------------------------
    def _prepare(self, num_q_heads: int) -> list[Launch]:
        """Kernel, layout and launch cells for ``num_q_heads`` query heads (once per plan)."""
        import cupy

        spec, dev = self.spec, self.device
        group = kernels.check_group(num_q_heads, spec.num_kv_heads)
        base = {"KV_DTYPE": kernels.DTYPE_CODES[spec.dtype], "HEAD_DIM": spec.head_dim,
                "BLOCK_SIZE": spec.block_size}
        pool = ptr(self.backend.kv.data.ptr)
        common = [i32(0), i32(spec.num_layers), i32(spec.num_kv_heads)]  # layer set per call
        q, out, scale = ptr(), ptr(), f32()
        p = self.ptrs
        launches: list[Launch] = []
        with cupy.cuda.Device(dev):
            if self.decode:
                tc = kernels.DECODE_TC and spec.dtype != "float32"
                gs = kernels.decode_subgroup(spec.dtype, spec.head_dim, group)
                nsm = kernels.num_sms(dev)
                if tc:
                    hpc, wph = kernels.decode_layout(spec.num_kv_heads, spec.head_dim, spec.itemsize,
                                                     self.items, self.max_len, nsm)
                    threads = 32 * hpc * wph
                    stages = kernels.decode_stages(spec.head_dim, spec.itemsize, hpc * wph)
                    defs = {**base, "GROUP": group, "STAGES": stages, "HPC": hpc, "WPH": wph}
                    if kernels.DECODE_L2_PREFETCH:
                        defs["CP_L2_PREFETCH"] = kernels.DECODE_L2_PREFETCH
                    fn = kernels.get_kernel("paged_decode_tc.cu", "paged_decode_tc", defs, dev)
                    smem = hpc * wph * stages * 2 * 16 * (spec.head_dim + 8) * spec.itemsize
                    if fn.max_dynamic_shared_size_bytes < smem:
                        fn.max_dynamic_shared_size_bytes = smem
                    ctas = self.items * (spec.num_kv_heads // hpc)
                    resident = kernels.resident_ctas(fn, threads, smem, dev)
                else:
                    fn = kernels.get_kernel("paged_decode.cu", "paged_decode",
                                            {**base, "SUBGROUP": gs, "CH": kernels.DECODE_ROWS}, dev)
                    threads, smem, resident = 128, 0, 0
                    ctas = self.items * spec.num_kv_heads * (group // gs)
                splits = self.num_splits or kernels.plan_splits(ctas, self.max_len, nsm, resident)
                self.splits = int(splits)
                rows = self.items * num_q_heads
                if splits > 1:
                    self._part_o = cupy.empty(rows * splits * spec.head_dim, dtype=cupy.float32)
                    self._part_lse = cupy.empty(rows * splits, dtype=cupy.float32)
                    part_o, part_lse = ptr(self._part_o.data.ptr), ptr(self._part_lse.data.ptr)
                else:
                    part_o = part_lse = ptr(0)
                args = [q, pool, ptr(p["tables"]), ptr(p["item_seq"]), ptr(p["item_len"]), out,
                        part_o, part_lse, *common]
                if not tc:
                    args.append(i32(group))
                args += [i32(self.width), i32(splits), scale]
                launches.append(Launch(fn, (ctas, splits), threads, smem, args, dev))
                if splits > 1:
                    merge = kernels.get_kernel("paged_decode.cu", "merge_splits",
                                               {**base, "SUBGROUP": gs, "CH": kernels.DECODE_ROWS}, dev)
                    launches.append(Launch(merge, (rows,), 256, 0, [part_o, part_lse, out, i32(splits)], dev))
            else:
                self.splits = 1
                mt = kernels.PREFILL_MT or (2 if spec.head_dim <= 128 else 1)
                qt = 64 * mt // group
                ql, sl = self.query_lens, self.seq_lens
                counts = -(-ql // qt)
                seq = np.repeat(np.arange(len(ql), dtype=np.int32), counts)
                first = np.cumsum(counts) - counts
                j0 = ((np.arange(len(seq)) - np.repeat(first, counts)) * qt).astype(np.int32)
                # Tiles that see the most K/V first, so the long ones do not trail the launch.
                order = np.argsort(-(sl[seq] - ql[seq] + j0), kind="stable")
                tiles = np.ascontiguousarray(np.stack([seq[order], j0[order]], axis=1), dtype=np.int32)
                self._tiles = cupy.empty(tiles.shape, dtype=cupy.int32)
                from cupy.cuda import runtime

                runtime.memcpyAsync(self._tiles.data.ptr, tiles.ctypes.data, tiles.nbytes,
                                    runtime.memcpyHostToDevice, current_stream(dev))
                self._tiles_host = tiles  # alive until the copy has run
                fn = kernels.get_kernel("paged_prefill.cu", "paged_prefill",
                                        {**base, "GROUP": group, "MT": mt}, dev)
                bn = 32 if mt == 2 or spec.head_dim > 128 else 64
                stages = 3 if mt == 2 else 2
                smem = (64 * mt + 2 * stages * bn) * (spec.head_dim + 8) * 2
                if fn.max_dynamic_shared_size_bytes < smem:
                    fn.max_dynamic_shared_size_bytes = smem
                args = [q, pool, ptr(p["tables"]), ptr(p["seq_lens"]), ptr(p["query_lens"]),
                        ptr(p["q_start"]), ptr(self._tiles.data.ptr), out, *common, i32(self.width), scale]
                launches.append(Launch(fn, (len(tiles), spec.num_kv_heads), 128, smem, args, dev))
        self._attn[num_q_heads] = launches
        return launches

    def write(self, layer: int, k: Any, v: Any) -> None:
        spec = self.spec
        if not self.has_slots:
            raise InvalidArgument("this plan has no slots: pass slots to plan() to write through it")
        if type(layer) is not int or not 0 <= layer < spec.num_layers:
            layer = check_layer(spec, layer)
        shape = self._kv_shape
        kp, vp = self._fast_ptr(k, shape), self._fast_ptr(v, shape)
        if kp and vp:
            stream = self._stream(self.device)
        else:
            kp, _ = device_tensor(k, "k", shape, self.backend, self.device)
            vp, _ = device_tensor(v, "v", shape, self.backend, self.device)
            stream = current_stream(self.device)
        launch = self._write
        if launch is None:
            if not shape[0]:
                return
            fn = kernels.get_kernel("kv_write.cu", "kv_write", {}, self.device)
            args = [ptr(), ptr(), ptr(self.ptrs["slots"]), ptr(self.backend.kv.data.ptr), i32(shape[0]),
                    i32(), i32(spec.num_layers), i32(spec.num_kv_heads), i32(spec.block_size),
                    i32(spec.head_dim * spec.itemsize // 16)]
            launch = self._write = Launch(fn, (min(shape[0], 65536),), 128, 0, args, self.device)
        a = launch.args
        a[0].value, a[1].value, a[5].value = kp, vp, layer
        launch(stream)

    def _fast_ptr(self, x: Any, shape: tuple[int, ...]) -> int:
        """The pointer of a torch CUDA tensor that passes every check (right
        device, dtype, shape, dense, 16-byte aligned) at the cost of a few
        attribute reads; 0 for anything else (then the full checks run)."""
        if type(x) is not self._torch_type or x.dtype is not self._torch_dtype or x.shape != shape:
            return 0
        p = x.data_ptr()
        if p % 16 or not x.is_cuda or x.get_device() != self.device or not x.is_contiguous():
            return 0
        return p

    def attend(self, layer: int, q: Any, scale: float | None = None, out: Any = None) -> Any:
        spec = self.spec
        if type(layer) is not int or not 0 <= layer < spec.num_layers:
            layer = check_layer(spec, layer)
        shape = q.shape if hasattr(q, "shape") else ()
        launches = self._attn.get(shape[1]) if len(shape) == 3 else None
        qp = self._fast_ptr(q, shape) if launches else 0
        if qp:  # a dense torch tensor of the right kind: the hot path
            if shape[0] != self._tokens:
                check_q_shape(tuple(shape), self._tokens, spec)
            if out is None:
                out = q.new_empty(shape)
            op = self._fast_ptr(out, shape)
            if not op:
                op, out = device_tensor(out, "out", tuple(shape), self.backend, self.device, writable=True)
            stream = self._stream(self.device)
        else:
            num_q = check_q_shape(tuple(shape), self.num_tokens, spec)
            qp, q = device_tensor(q, "q", tuple(shape), self.backend, self.device)
            if out is None:
                out = q.new_empty(q.shape) if hasattr(q, "new_empty") else _cupy_empty_like(q)
            op, out = device_tensor(out, "out", tuple(shape), self.backend, self.device, writable=True)
            launches = self._attn.get(num_q) or self._prepare(num_q)
            stream = current_stream(self.device)
        if not shape[0]:
            return out
        if scale is None:
            s = self._scale
        elif scale == self._last_scale:
            s = self._scale_given
        else:
            s = self._set_scale(scale)
        # Cells shared by the launches (the merge reads the decode's out cell).
        first = launches[0].args
        first[0].value, first[5 if self.decode else 7].value = qp, op
        first[8].value, first[-1].value = layer, s
        for launch in launches:
            launch(stream)
        return out

    def _set_scale(self, scale: Any) -> float:
        self._last_scale = scale
        self._scale_given = check_scale(scale, self.spec.head_dim) * _LOG2E
        return self._scale_given


def _torch_kinds(dtype: str) -> tuple[Any, Any, Any]:
    """(torch.Tensor, the torch dtype, torch's raw current-stream getter) where
    torch is loaded; None placeholders otherwise (the fast path never matches)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None, None, current_stream
    return torch.Tensor, getattr(torch, dtype), torch_stream()


def _cupy_empty_like(x: Any) -> Any:
    import cupy

    return cupy.empty(x.shape, dtype=x.dtype)


def device_tensor(x: Any, name: str, shape: tuple[int, ...], backend: Any, device: int,
                  writable: bool = False) -> tuple[int, Any]:
    """(device pointer, tensor) of a CuPy array or torch CUDA tensor on the pool's
    GPU in the pool dtype and ``shape``; a strided or misaligned input is copied
    (an output must already be dense)."""
    if type(x).__module__.startswith("torch"):
        if not x.is_cuda or x.get_device() != device:
            raise InvalidArgument(f"{name} is on {x.device}; the pool is on cuda:{device}")
        if str(x.dtype)[6:] != backend.spec.dtype:
            raise InvalidArgument(f"{name} must have dtype {backend.spec.dtype}, got {x.dtype}")
        if tuple(x.shape) != shape:
            raise InvalidArgument(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        p = x.data_ptr()
        if not x.is_contiguous() or p % 16:
            if writable:
                raise InvalidArgument(f"{name} must be a contiguous, 16-byte aligned tensor")
            x = x.contiguous() if p % 16 == 0 else x.clone()
            p = x.data_ptr()
        return p, x
    import cupy

    if not isinstance(x, cupy.ndarray):
        raise InvalidArgument(f"{name} must be a cupy array or a torch CUDA tensor, got {type(x).__name__}")
    if x.dtype != backend.dtype:
        raise InvalidArgument(f"{name} must have dtype {backend.spec.dtype}, got {x.dtype}")
    if x.device.id != device:
        raise InvalidArgument(f"{name} is on cuda:{x.device.id}, the pool on cuda:{device}")
    if tuple(x.shape) != shape:
        raise InvalidArgument(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if not x.flags.c_contiguous or x.data.ptr % 16:
        if writable:
            raise InvalidArgument(f"{name} must be a contiguous, 16-byte aligned array")
        x = x.copy()
    return x.data.ptr, x
