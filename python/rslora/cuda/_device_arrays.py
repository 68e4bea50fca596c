"""Device arrays of the frameworks rslora.cuda serves (PyTorch, CuPy), behind one small interface.

rslora never allocates GPU memory for results itself: outputs come from the caller's framework
(on the caller's device and current stream) and every array goes down to the CUDA module as a
DLPack capsule. The few framework-specific steps (allocate, make contiguous, cast, the current
stream) live here; validation works on ``.shape`` and ``.dtype`` names alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._validation import on_gpu

__all__ = ["on_gpu", "Framework", "FRAMEWORKS", "framework", "check_device_arrays", "dtype_name",
           "device_of", "shape_str", "blas_ok", "SUPPORTED"]

_KDL_CUDA, _KDL_CUDA_MANAGED = 2, 13
SUPPORTED = ("float16", "bfloat16", "float32")


def dtype_name(a: Any) -> str:
    """``"float32"`` for torch.float32, numpy/cupy float32 and the like."""
    return str(getattr(a, "dtype", type(a).__name__)).rsplit(".", 1)[-1]


def device_of(a: Any) -> tuple[int, int]:
    """The DLPack (device type, ordinal) of an array."""
    t, i = a.__dlpack_device__()
    return int(t), int(i)


def shape_str(shape: Sequence[int]) -> str:
    return str(tuple(int(d) for d in shape))


class Framework:
    """The operations rslora.cuda needs from the framework that owns the caller's arrays.

    Shapes and strides are in elements; arrays are the framework's own (typed Any here)."""

    name = ""

    def __init__(self, mod: Any) -> None:
        self.mod = mod

    def empty(self, shape: Sequence[int], dtype: str, like: Any) -> Any:
        raise NotImplementedError

    def from_host(self, values: np.ndarray, like: Any) -> Any:
        raise NotImplementedError

    def stream(self, device: int) -> int:
        raise NotImplementedError

    def strides(self, a: Any) -> tuple[int, ...]:
        raise NotImplementedError

    def data_ptr(self, a: Any) -> int:
        raise NotImplementedError

    def itemsize(self, a: Any) -> int:
        raise NotImplementedError

    def contiguous(self, a: Any) -> Any:
        raise NotImplementedError

    def astype(self, a: Any, dtype: str) -> Any:
        raise NotImplementedError

    def reshape(self, a: Any, shape: Sequence[int]) -> Any:
        raise NotImplementedError

    def view(self, a: Any, shape: Sequence[int]) -> Any:
        """A view with the new shape, or None when the layout does not allow one."""
        raise NotImplementedError

    def all_finite(self, a: Any) -> bool:
        raise NotImplementedError

    def span(self, a: Any) -> tuple[int, int]:
        """[first byte, one past the last byte] that a view can touch (for overlap checks)."""
        ptr, item = self.data_ptr(a), self.itemsize(a)
        lo = hi = 0
        for n, st in zip(a.shape, self.strides(a)):
            if n == 0:
                return ptr, ptr
            if st < 0:
                lo += (n - 1) * st
            else:
                hi += (n - 1) * st
        return ptr + lo * item, ptr + (hi + 1) * item

    def capsule(self, a: Any, stream: int) -> Any:
        # stream None means "no synchronisation needed": the work runs on the caller's current
        # stream, which is where the framework queued the producers of these arrays.
        return a.__dlpack__(stream=stream or None)


class Torch(Framework):
    name = "torch"

    def dtype(self, name: str) -> Any:
        return getattr(self.mod, name)

    def empty(self, shape: Sequence[int], dtype: str, like: Any) -> Any:
        return self.mod.empty(tuple(shape), dtype=self.dtype(dtype), device=like.device)

    def from_host(self, values: np.ndarray, like: Any) -> Any:
        return self.mod.as_tensor(values, device=like.device)

    def stream(self, device: int) -> int:
        return int(self.mod.cuda.current_stream(device).cuda_stream)

    def strides(self, a: Any) -> tuple[int, ...]:
        return tuple(a.stride())

    def data_ptr(self, a: Any) -> int:
        return int(a.data_ptr())

    def itemsize(self, a: Any) -> int:
        return int(a.element_size())

    def contiguous(self, a: Any) -> Any:
        return a.contiguous()

    def astype(self, a: Any, dtype: str) -> Any:
        return a.to(self.dtype(dtype))

    def reshape(self, a: Any, shape: Sequence[int]) -> Any:
        return a.reshape(tuple(shape))

    def view(self, a: Any, shape: Sequence[int]) -> Any:
        """A view with the new shape, or None when the layout does not allow one."""
        try:
            return a.view(tuple(shape))
        except RuntimeError:
            return None

    def all_finite(self, a: Any) -> bool:
        return bool(self.mod.isfinite(a).all())

    def capsule(self, a: Any, stream: int) -> Any:
        return a.detach().__dlpack__(stream=stream or None)


class CuPy(Framework):
    name = "cupy"

    def empty(self, shape: Sequence[int], dtype: str, like: Any) -> Any:
        with self.mod.cuda.Device(like.device.id):
            return self.mod.empty(tuple(shape), dtype=dtype)

    def from_host(self, values: np.ndarray, like: Any) -> Any:
        with self.mod.cuda.Device(like.device.id):
            return self.mod.asarray(values)

    def stream(self, device: int) -> int:
        with self.mod.cuda.Device(device):
            return int(self.mod.cuda.get_current_stream().ptr)

    def strides(self, a: Any) -> tuple[int, ...]:
        return tuple(s // a.itemsize for s in a.strides)

    def data_ptr(self, a: Any) -> int:
        return int(a.data.ptr)

    def itemsize(self, a: Any) -> int:
        return int(a.itemsize)

    def contiguous(self, a: Any) -> Any:
        return self.mod.ascontiguousarray(a)

    def astype(self, a: Any, dtype: str) -> Any:
        return a.astype(dtype)

    def reshape(self, a: Any, shape: Sequence[int]) -> Any:
        return a.reshape(tuple(shape))

    def view(self, a: Any, shape: Sequence[int]) -> Any:
        v = a.view()
        try:
            v.shape = tuple(shape)
        except AttributeError:
            return None
        return v

    def all_finite(self, a: Any) -> bool:
        return bool(self.mod.isfinite(a).all())


def _torch() -> Framework:
    import torch

    return Torch(torch)


def _cupy() -> Framework:
    import cupy

    return CuPy(cupy)


# The frameworks whose device arrays rslora.cuda can allocate beside, by top-level module name.
FRAMEWORKS: dict[str, Callable[[], Framework]] = {"torch": _torch, "cupy": _cupy}


def framework(a: Any, name: str) -> Framework:
    """The framework of a device array; TypeError for one rslora.cuda cannot allocate beside."""
    make = FRAMEWORKS.get(type(a).__module__.split(".", 1)[0])
    if make is None:
        raise TypeError(f"{name} is a {type(a).__module__}.{type(a).__name__} on a GPU; "
                        "rslora.cuda works with PyTorch tensors and CuPy arrays")
    return make()


def check_device_arrays(**arrays: Any) -> int:
    """All given arrays live on one CUDA device; returns its ordinal. Names the first offender."""
    first, dev = "", -1
    for name, a in arrays.items():
        if a is None:
            continue
        if not on_gpu(a):
            where = "host memory" if hasattr(a, "__dlpack_device__") or isinstance(
                a, np.ndarray) else f"a {type(a).__name__}"
            raise TypeError(f"{name} is {where} but {first or 'the call'} is on the GPU; "
                            "move all arrays to one device")
        t, i = device_of(a)
        if t not in (_KDL_CUDA, _KDL_CUDA_MANAGED):
            raise TypeError(f"{name} is on DLPack device type {t}, not CUDA")
        if dev < 0:
            first, dev = name, i
        elif i != dev:
            raise ValueError(f"{name} is on cuda:{i} but {first} is on cuda:{dev}")
    return dev


def blas_ok(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether cuBLAS can read a 2-D view as it is (one unit stride, the other non-negative)."""
    (r, c), (rs, cs) = shape, strides
    row_major = (c <= 1 or cs == 1) and (r <= 1 or rs >= max(c, 1))
    col_major = (r <= 1 or rs == 1) and (c <= 1 or cs >= max(r, 1))
    return row_major or col_major
