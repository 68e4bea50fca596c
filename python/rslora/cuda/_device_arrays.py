"""Device arrays of the frameworks rslora.cuda serves (PyTorch, CuPy), behind one small interface.

rslora never allocates GPU memory for results itself: outputs come from the caller's framework
(on the caller's device and current stream) and every array goes down to the CUDA module as a
DLPack capsule. The few framework-specific steps (allocate, make contiguous, cast, the current
stream) live here; validation works on ``.shape`` and ``.dtype`` names alone.
"""

from __future__ import annotations

import numpy as np

from .._arrays import on_gpu

_KDL_CUDA, _KDL_CUDA_MANAGED = 2, 13
SUPPORTED = ("float16", "bfloat16", "float32")


def dtype_name(a) -> str:
    """``"float32"`` for torch.float32, numpy/cupy float32 and the like."""
    return str(getattr(a, "dtype", type(a).__name__)).rsplit(".", 1)[-1]


def device_of(a) -> tuple[int, int]:
    """The DLPack (device type, ordinal) of an array."""
    t, i = a.__dlpack_device__()
    return int(t), int(i)


def shape_str(shape) -> str:
    return str(tuple(int(d) for d in shape))


class Framework:
    """The operations rslora.cuda needs from the framework that owns the caller's arrays."""

    name = ""

    def __init__(self, mod):
        self.mod = mod

    def span(self, a) -> tuple[int, int]:
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

    def capsule(self, a, stream: int):
        # stream None means "no synchronisation needed": the work runs on the caller's current
        # stream, which is where the framework queued the producers of these arrays.
        return a.__dlpack__(stream=stream or None)


class Torch(Framework):
    name = "torch"

    def dtype(self, name):
        return getattr(self.mod, name)

    def empty(self, shape, dtype: str, like):
        return self.mod.empty(tuple(shape), dtype=self.dtype(dtype), device=like.device)

    def from_host(self, values: np.ndarray, like):
        return self.mod.as_tensor(values, device=like.device)

    def stream(self, device: int) -> int:
        return int(self.mod.cuda.current_stream(device).cuda_stream)

    def strides(self, a):
        return tuple(a.stride())

    def data_ptr(self, a) -> int:
        return int(a.data_ptr())

    def itemsize(self, a) -> int:
        return a.element_size()

    def contiguous(self, a):
        return a.contiguous()

    def astype(self, a, dtype: str):
        return a.to(self.dtype(dtype))

    def reshape(self, a, shape):
        return a.reshape(tuple(shape))

    def view(self, a, shape):
        """A view with the new shape, or None when the layout does not allow one."""
        try:
            return a.view(tuple(shape))
        except RuntimeError:
            return None

    def all_finite(self, a) -> bool:
        return bool(self.mod.isfinite(a).all())

    def capsule(self, a, stream: int):
        return a.detach().__dlpack__(stream=stream or None)


class CuPy(Framework):
    name = "cupy"

    def empty(self, shape, dtype: str, like):
        with self.mod.cuda.Device(like.device.id):
            return self.mod.empty(tuple(shape), dtype=dtype)

    def from_host(self, values: np.ndarray, like):
        with self.mod.cuda.Device(like.device.id):
            return self.mod.asarray(values)

    def stream(self, device: int) -> int:
        with self.mod.cuda.Device(device):
            return int(self.mod.cuda.get_current_stream().ptr)

    def strides(self, a):
        return tuple(s // a.itemsize for s in a.strides)

    def data_ptr(self, a) -> int:
        return int(a.data.ptr)

    def itemsize(self, a) -> int:
        return a.itemsize

    def contiguous(self, a):
        return self.mod.ascontiguousarray(a)

    def astype(self, a, dtype: str):
        return a.astype(dtype)

    def reshape(self, a, shape):
        return a.reshape(tuple(shape))

    def view(self, a, shape):
        v = a.view()
        try:
            v.shape = tuple(shape)
        except AttributeError:
            return None
        return v

    def all_finite(self, a) -> bool:
        return bool(self.mod.isfinite(a).all())


def framework(a, name: str) -> Framework:
    """The framework of a device array; TypeError for one rslora.cuda cannot allocate beside."""
    mod = type(a).__module__.split(".", 1)[0]
    if mod == "torch":
        import torch

        return Torch(torch)
    if mod == "cupy":
        import cupy

        return CuPy(cupy)
    raise TypeError(f"{name} is a {type(a).__module__}.{type(a).__name__} on a GPU; rslora.cuda "
                    "works with PyTorch tensors and CuPy arrays")


def check_device_arrays(**arrays) -> int:
    """All given arrays live on one CUDA device; returns its ordinal. Names the first offender."""
    first, dev = None, None
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
        if dev is None:
            first, dev = name, i
        elif i != dev:
            raise ValueError(f"{name} is on cuda:{i} but {first} is on cuda:{dev}")
    return dev


def common_dtype(**arrays) -> str:
    """The one dtype all named arrays share: float16, bfloat16 or float32 (TypeError otherwise)."""
    first, dt = None, None
    for name, a in arrays.items():
        if a is None:
            continue
        d = dtype_name(a)
        if d not in SUPPORTED:
            raise TypeError(f"{name} is {d}; GPU arrays must be float16, bfloat16 or float32")
        if dt is None:
            first, dt = name, d
        elif d != dt:
            raise TypeError(f"{name} is {d} but {first} is {dt}; cast explicitly "
                            "(no silent upcast)")
    return dt


def blas_ok(shape, strides) -> bool:
    """Whether cuBLAS can read a 2-D view as it is (one unit stride, the other non-negative)."""
    (r, c), (rs, cs) = shape, strides
    row_major = (c <= 1 or cs == 1) and (r <= 1 or rs >= max(c, 1))
    col_major = (r <= 1 or rs == 1) and (c <= 1 or cs >= max(r, 1))
    return row_major or col_major
