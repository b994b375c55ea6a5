"""The NumPy backend's step plan: the reference for the GPU plan
(`kvpager.backends.cupy_plan`), and the crossing of torch CPU tensors into
NumPy arrays and back (bfloat16 as its bits)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from kvpager import cpu_attention, validate
from kvpager.attend_options import check_scale, check_sinks, check_softcap, check_window
from kvpager.backends.numpy_backend import run_tokens
from kvpager.errors import InvalidArgument
from kvpager.plan import StepPlan, check_heads_first, check_q_shape


@functools.lru_cache(maxsize=64)
def _name(dtype: Any) -> str:
    """A NumPy or torch dtype's name ("bfloat16"), once per dtype (a NumPy
    dtype's str runs Python code, and this is asked four times a layer)."""
    return str(dtype).removeprefix("torch.")


def check_kind(x: Any, name: str, dtype: np.dtype) -> bool:
    """InvalidArgument unless ``x`` is a NumPy array or a CPU torch tensor of
    ``dtype``; whether it is a torch tensor."""
    if isinstance(x, np.ndarray):
        if x.dtype != dtype:
            raise InvalidArgument(f"{name} must have dtype {dtype}, got {x.dtype}")
        return False
    if type(x).__module__.startswith("torch"):
        if x.device.type != "cpu":
            raise InvalidArgument(f"{name} is on {x.device}; this pool is on the CPU")
        if _name(x.dtype) != _name(dtype):
            raise InvalidArgument(f"{name} must have dtype {dtype}, got {x.dtype}")
        return True
    raise InvalidArgument(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def to_numpy(x: Any, name: str, dtype: np.dtype) -> tuple[np.ndarray, bool]:
    """A NumPy view of ``x`` in ``dtype`` (NumPy array or CPU torch tensor) and
    whether it came from torch."""
    if not check_kind(x, name, dtype):
        return x, False
    return _view(x, dtype), True


def _view(x: Any, dtype: np.dtype) -> np.ndarray:
    """A NumPy view of ``x``, a CPU torch tensor of ``dtype`` (`check_kind`)."""
    x = x.detach().contiguous()
    if _name(dtype) == "bfloat16":  # NumPy has no bfloat16: cross as raw bits
        import torch

        return x.view(torch.int16).numpy().view(dtype)
    return x.numpy()


def from_numpy(out: np.ndarray) -> Any:
    """A NumPy result as a torch tensor (bfloat16 through its bits)."""
    import torch

    if _name(out.dtype) == "bfloat16":
        return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(out)


class NumpyPlan(StepPlan):
    """The step plan of the NumPy backend: the reference for the GPU plan. What
    every layer of the step shares (the write's positions, the kernel's
    arguments, the query tokens) is made once, at the first layer that needs it."""

    def __init__(self, backend: Any, tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray,
                 slots: np.ndarray | None):
        self.backend, self.spec = backend, backend.spec
        self.watch(backend)
        self.tables, self.seq_lens, self.query_lens, self.slots = tables, seq_lens, query_lens, slots
        self._tokens = int(query_lens.sum())
        self._where: Any = None  # the slots' `NumpyBackend.positions`, where the write is one run
        self._step: Any = None  # `cpu_attention.prepare`'s (False: the kernel does not take this step)

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def write(self, layer: int, k: Any, v: Any) -> None:
        if self._seen != self._moves.count:
            self.recheck()
        layer = validate.layer(layer, self.spec)
        self._store(layer, *self._checked_kv(k, v))

    def _checked_kv(self, k: Any, v: Any) -> tuple[np.ndarray, np.ndarray]:
        """``k`` and ``v`` as NumPy arrays, checked as a write through this plan takes them."""
        spec = self.spec
        if self.slots is None:
            raise InvalidArgument("this plan has no slots: pass slots to plan() to write through it")
        shape = (len(self.slots), spec.num_kv_heads, spec.head_dim)
        k, _ = to_numpy(k, "k", spec.np_dtype)
        v, _ = to_numpy(v, "v", spec.np_dtype)
        for name, x in (("k", k), ("v", v)):
            if x.shape != shape:
                raise InvalidArgument(f"{name} must have shape {shape}, got {x.shape}")
        return k, v

    def _store(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """The checked write: one run at the positions kept for every layer."""
        backend = self.backend
        if len(k) > run_tokens(k):
            backend.write(layer, self.slots, k, v)
            return
        if self._where is None:
            self._where = backend.positions(self.slots)
        backend.write_at(layer, self._where, k, v)

    def check_query(self, q: Any, heads: int, sinks: Any) -> None:
        """See `StepPlan.check_query`: q's kind and dtype and the sinks, as `attend` checks them."""
        check_kind(q, "q", self.spec.np_dtype)
        check_sinks(sinks, heads)

    def attend(self, layer: int, q: Any, scale: float | None = None, out: Any = None, *,
               window: int | None = None, softcap: float | None = None, sinks: Any = None) -> Any:
        spec = self.spec
        if self._seen != self._moves.count:
            self.recheck(write=False)
        layer = validate.layer(layer, spec)
        qn, from_torch = to_numpy(q, "q", spec.np_dtype)
        heads = check_q_shape(qn.shape, self.num_tokens, spec)
        sinks = check_sinks(sinks, heads)
        if self.floor is not None:
            self.check_floor(window)
        if out is not None and type(out).__module__.startswith("torch") and not out.is_contiguous():
            raise InvalidArgument("out must be a contiguous tensor (the result is written into its memory)")
        dest = None if out is None else to_numpy(out, "out", spec.np_dtype)[0]
        if dest is not None and dest.shape != qn.shape:
            raise InvalidArgument(f"out must have q's shape {qn.shape}, got {dest.shape}")
        if dest is not None and not dest.flags.writeable:
            raise InvalidArgument("out must be writable (the result is written into its memory)")
        res = self._attend(layer, qn, check_scale(scale, spec.head_dim), check_window(window),
                           check_softcap(softcap), sinks)
        if dest is not None:
            dest[...] = res
            return out
        return from_numpy(res) if from_torch else res

    def _attend(self, layer: int, q: np.ndarray, scale: float, window: int | None, softcap: float | None,
                sinks: Any) -> np.ndarray:
        """The checked attend: on the kernel with the step's arguments made once."""
        backend = self.backend
        if self._step is None:
            self._step = cpu_attention.prepare(backend.kv, self.tables, self.seq_lens, self.query_lens) or False
        if self._step is False or cpu_attention.KERNEL is None:
            return cpu_attention.attend(backend.kv, layer, q, self.tables, self.seq_lens, self.query_lens, scale,
                                        window=window, softcap=softcap, kv_scales=backend.scales, sinks=sinks)
        return cpu_attention.attend_prepared(self._step, layer, q, scale, window=window, softcap=softcap,
                                             kv_scales=backend.scales, sinks=sinks)

    def write_attend(self, layer: int, q: Any, k: Any, v: Any, scale: float | None = None, *,
                     window: int | None = None, softcap: float | None = None, sinks: Any = None,
                     chunk: int | None = None) -> Any:
        """`StepPlan.write_attend`, each argument checked once (its `write` and
        `attend` check them again), in the same order: a refused call changes nothing.
        q is read after the write, as there."""
        spec = self.spec
        check_heads_first(q, k, v)
        qt = q[0].swapaxes(0, 1)
        heads = check_q_shape(tuple(qt.shape), self.num_tokens, spec)
        from_torch = check_kind(qt, "q", spec.np_dtype)
        sinks = check_sinks(sinks, heads)
        scale = check_scale(scale, spec.head_dim)
        softcap = check_softcap(softcap)
        target = self if chunk is None else self.chunked(chunk)
        if target.floor is not None:
            target.check_floor(window)
        window = check_window(window)
        if self._seen != self._moves.count:
            self.recheck()
        layer = validate.layer(layer, spec)
        self._store(layer, *self._checked_kv(k[0].swapaxes(0, 1), v[0].swapaxes(0, 1)))
        if target is not self and target._seen != target._moves.count:
            target.recheck(write=False)
        res = target._attend(layer, _view(qt, spec.np_dtype) if from_torch else qt, scale, window, softcap, sinks)
        return (from_numpy(res) if from_torch else res)[None]
