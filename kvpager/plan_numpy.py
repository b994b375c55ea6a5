"""The NumPy backend's step plan: the reference for the GPU plan
(`kvpager.backends.cupy_plan`), and the crossing of torch CPU tensors into
NumPy arrays and back (bfloat16 as its bits)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from kvpager import validate
from kvpager.attend_options import check_scale, check_sinks, check_softcap, check_window
from kvpager.errors import InvalidArgument
from kvpager.plan import StepPlan, check_q_shape


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
    x = x.detach().contiguous()
    if _name(dtype) == "bfloat16":  # NumPy has no bfloat16: cross as raw bits
        import torch

        return x.view(torch.int16).numpy().view(dtype), True
    return x.numpy(), True


def from_numpy(out: np.ndarray) -> Any:
    """A NumPy result as a torch tensor (bfloat16 through its bits)."""
    import torch

    if _name(out.dtype) == "bfloat16":
        return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(out)


class NumpyPlan(StepPlan):
    """The step plan of the NumPy backend: the reference for the GPU plan."""

    def __init__(self, backend: Any, tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray,
                 slots: np.ndarray | None):
        self.backend, self.spec = backend, backend.spec
        self.watch(backend)
        self.tables, self.seq_lens, self.query_lens, self.slots = tables, seq_lens, query_lens, slots

    def write(self, layer: int, k: Any, v: Any) -> None:
        spec = self.spec
        if self._seen != self._moves.count:
            self.recheck()
        layer = validate.layer(layer, spec)
        if self.slots is None:
            raise InvalidArgument("this plan has no slots: pass slots to plan() to write through it")
        shape = (len(self.slots), spec.num_kv_heads, spec.head_dim)
        k, _ = to_numpy(k, "k", spec.np_dtype)
        v, _ = to_numpy(v, "v", spec.np_dtype)
        for name, x in (("k", k), ("v", v)):
            if x.shape != shape:
                raise InvalidArgument(f"{name} must have shape {shape}, got {x.shape}")
        self.backend.write(layer, self.slots, k, v)

    def check_query(self, q: Any, heads: int, sinks: Any) -> None:
        """See `StepPlan.check_query`: q's kind and dtype and the sinks, as `attend` checks them."""
        check_kind(q, "q", self.spec.np_dtype)
        check_sinks(sinks, heads)

    def attend(self, layer: int, q: Any, scale: float | None = None, out: Any = None, *,
               window: int | None = None, softcap: float | None = None, sinks: Any = None) -> Any:
        from kvpager import cpu_attention

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
        res = cpu_attention.attend(self.backend.kv, layer, qn, self.tables, self.seq_lens, self.query_lens,
                                   check_scale(scale, spec.head_dim), window=check_window(window),
                                   softcap=check_softcap(softcap), kv_scales=self.backend.scales, sinks=sinks)
        if dest is not None:
            dest[...] = res
            return out
        return from_numpy(res) if from_torch else res
