"""Argument handling shared by the public functions: array conversion, out=, aliasing."""

from __future__ import annotations

import math

import numpy as np

_KDL_CPU = 1  # DLPack device type of host memory


def on_gpu(a) -> bool:
    """True for an array whose data lives on a device (DLPack device type other than CPU)."""
    if isinstance(a, np.ndarray):
        return False
    dev = getattr(a, "__dlpack_device__", None)
    if dev is None:
        return False
    try:
        return int(dev()[0]) != _KDL_CPU
    except Exception:  # noqa: BLE001 - a foreign object that cannot say: treat as host
        return False


def as_array(a, name: str) -> np.ndarray:
    """A NumPy view of an array-like (no dtype change: the core rejects non-float dtypes)."""
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    arr = np.asarray(a)
    if arr.dtype.kind not in "fc" and arr.dtype.kind not in "iub":
        raise TypeError(f"{name} must be float32 or float64, got {arr.dtype}")
    return arr


def check_float(arr: np.ndarray, name: str) -> None:
    if arr.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got {arr.dtype}")


def common_dtype(**arrays) -> np.dtype:
    """The one float dtype all named arrays share; mixing float32/float64 is a TypeError."""
    first_name, dtype = None, None
    for name, arr in arrays.items():
        if arr is None:
            continue
        check_float(arr, name)
        if dtype is None:
            first_name, dtype = name, arr.dtype
        elif arr.dtype != dtype:
            raise TypeError(f"{name} is {arr.dtype} but {first_name} is {dtype}; "
                            "cast explicitly (no silent upcast)")
    return dtype


def require_ndim(arr: np.ndarray, name: str, ndim: int) -> None:
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")


def overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    return np.may_share_memory(a, b) and np.shares_memory(a, b)


def self_overlaps(a: np.ndarray) -> bool:
    """True when two elements of ``a`` may share memory (a zero or interleaved stride, as
    ``as_strided`` or ``broadcast_to`` make): no single result can be written there. Checked
    by the layout (each axis steps over the whole extent of the smaller ones), so it is exact
    for every layout NumPy's own slicing produces."""
    if a.size <= 1:
        return False
    extent = a.itemsize
    for stride, n in sorted((abs(st), n) for st, n in zip(a.strides, a.shape) if n > 1):
        if stride < extent:
            return True
        extent = stride * (n - 1) + extent
    return False


def check_writable(target: np.ndarray, name: str, why: str) -> None:
    """A target the op writes: writable, and no element aliasing another."""
    if not target.flags.writeable:
        raise ValueError(f"{name} is read-only{why}")
    if self_overlaps(target):
        raise ValueError(f"{name} has overlapping elements (zero or interleaved strides); "
                         "pass an array whose elements are distinct")


def check_no_alias(target: np.ndarray, target_name: str, **inputs) -> None:
    for name, arr in inputs.items():
        if arr is not None and overlaps(target, arr):
            raise ValueError(f"{target_name} overlaps {name}; pass a separate array")


def prepare_out(out, shape: tuple, dtype: np.dtype, **inputs):
    """Validate a user's out= (or allocate one). Returns (out, out2d, needs_copy_back)."""
    rows = math.prod(shape[:-1])
    if out is None:
        res = np.empty(shape, dtype=dtype)
        return res, res.reshape(rows, shape[-1]), False
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"out has shape {out.shape} but the result has shape {tuple(shape)}")
    if out.dtype != dtype:
        raise ValueError(f"out has dtype {out.dtype} but the result is {dtype}")
    check_writable(out, "out", "")
    check_no_alias(out, "out", **inputs)
    flat = out.view()
    try:
        flat.shape = (rows, shape[-1])  # a view when out's layout allows it; else work in a copy
    except AttributeError:
        return out, np.empty((rows, shape[-1]), dtype=dtype), True
    return out, flat, False
