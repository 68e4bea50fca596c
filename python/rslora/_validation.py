"""Every argument rule of the public ops, written once, with the messages users see.

Both backends (the CPU core, ``_cpu.py``, and the GPU, ``rslora.cuda``) call these, so a call is
accepted or rejected the same way, with the same words, wherever its arrays live. The rules read
shapes (tuples of ints), dtype names and plain Python values, never an array's memory; the few
that need a NumPy array (conversion, ``out=`` preparation, aliasing on the host) are marked
"host". What C++ needs for memory safety (ndim, dtype, strides, writability, ids in range) the
bindings check again on their own.
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import numpy as np
import numpy.typing as npt

Shape = tuple[int, ...]
INT_MAX = 2**31 - 1  # n_iter and friends are C ints in the cores

HOST_DTYPES = ("float32", "float64")
METHODS = ("subspace", "krylov")
NORMALIZERS = ("qr", "lu", "none")


# --- scalars -------------------------------------------------------------------------------------

def _kind(value: object, name: str, kind: type, what: str) -> None:
    """The one type rule of scalar arguments: ``kind`` (numbers.Integral, numbers.Real), and
    never a bool (True is an int to Python, not a rank or a scale to a user)."""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")


def integer(value: object, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (not a bool) checked against [lo, hi] before any arithmetic with it."""
    _kind(value, name, numbers.Integral, "an integer")
    v = int(cast(numbers.Integral, value))
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")
    return v


def number(value: object, name: str) -> float:
    """A real number (not a bool) as a float; NaN and Inf pass (see :func:`real`)."""
    _kind(value, name, numbers.Real, "a real number")
    return float(cast(numbers.Real, value))


def real(value: object, name: str) -> float:
    """A finite real number (not a bool) as a float."""
    v = number(value, name)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def open_unit(value: object, name: str) -> float:
    """A real number strictly between 0 and 1 (tolerances; NaN is outside)."""
    v = number(value, name)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {v}")
    return v


def flag(value: object, name: str) -> bool:
    """A bool (Python's or NumPy's): a string such as "no" or a number would be read as its
    truthiness, the opposite of what was meant for ``check_finite="no"``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return bool(value)


def choice(value: object, name: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def seed(value: object) -> int:
    """The 64-bit key of a Philox stream: None draws fresh entropy, a Generator gives its next
    integer (so a seeded Generator gives reproducible calls), an int is used as it is."""
    if value is None:
        return secrets.randbits(64)
    if isinstance(value, np.random.Generator):
        return int(value.integers(0, 2**63, dtype=np.int64))
    v = integer(value, "seed", 0)
    if v >= 2**64:
        raise ValueError(f"seed must be < 2**64, got {v}")
    return v


AUTO = -1  # n_iter="auto" as the cores spell it


def n_iter(value: object) -> int:
    """Iterations: an integer in [0, 2**31 - 1], or "auto" (returned as AUTO = -1)."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"n_iter must be 'auto' or an integer >= 0, got {value!r}")
        return AUTO
    return integer(value, "n_iter", 0, INT_MAX)


def warn_uncertified(iterations: int, auto_tol: float, estimate: float, remedies: str) -> None:
    """The warning of ``n_iter="auto"`` at its iteration cap with the contract not certified
    (rslora.rsvd and rslora.dask.rsvd): never such a result without a word."""
    import warnings

    warnings.warn(f"rsvd: n_iter='auto' stopped at its iteration cap ({iterations}) without "
                  f"meeting auto_tol={auto_tol:g}: estimated error {estimate:.6g}x the optimum "
                  f"(contract: {1 + auto_tol:.6g}x); use {remedies}", RuntimeWarning, stacklevel=4)


def rank(value: object, name: str, shape: Shape, of: str = "M", dims: str = "m, n") -> int:
    """A rank in [1, min(shape)] for a matrix of that shape."""
    v = integer(value, name)
    lo = min(shape)
    if not 1 <= v <= lo:
        raise ValueError(f"{name} must be in [1, min({dims})] = [1, {lo}] for {of} of shape "
                         f"{shape_str(shape)}, got {v}")
    return v


# --- dtypes --------------------------------------------------------------------------------------

def _either(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def same_dtype(supported: tuple[str, ...], **dtypes: str | None) -> str:
    """The one dtype all named operands share (None: operand absent). A dtype outside
    ``supported`` or a mix is a TypeError naming the operand: no silent upcast."""
    first, dt = "", ""
    for name, d in dtypes.items():
        if d is None:
            continue
        if d not in supported:
            raise TypeError(f"{name} must be {_either(supported)}, got {d}")
        if not dt:
            first, dt = name, d
        elif d != dt:
            raise TypeError(f"{name} is {d} but {first} is {dt}; cast explicitly "
                            "(no silent upcast)")
    return dt


# --- shapes --------------------------------------------------------------------------------------

def shape_str(shape: Shape) -> str:
    return str(tuple(int(d) for d in shape))


def ndim(shape: Shape, name: str, nd: int, layout: str = "") -> None:
    if len(shape) != nd:
        raise ValueError(f"{name} must be {nd}-D{f' {layout}' if layout else ''}, "
                         f"got shape {shape_str(shape)}")


def batch_of(x: Shape, name: str = "x", last: str = "d_in") -> Shape:
    """The batch shape of ``(..., last)``."""
    if len(x) < 1:
        raise ValueError(f"{name} must have shape (..., {last}), got a 0-d array")
    return tuple(x[:-1])


def _dim_error(name: str, shape: Shape, other: str, dim: str, value: int) -> ValueError:
    return ValueError(f"{name} has shape {shape_str(shape)} but {other} has {dim}={value}")


def _pair_error(name: str, shape: Shape, others: str, need: Shape) -> ValueError:
    return ValueError(f"{name} has shape {shape_str(shape)} but {others} need {shape_str(need)}")


class LinearShapes(NamedTuple):
    batch: Shape
    d_in: int
    d_out: int
    r: int


def linear_shapes(x: Shape, W: Shape, A: Shape, B: Shape, bias: Shape | None) -> LinearShapes:
    """``x (..., d_in)``, ``W (d_out, d_in)``, ``A (r, d_in)``, ``B (d_out, r)``, ``bias (d_out,)``."""
    batch = batch_of(x)
    for shape, name in ((W, "W"), (A, "A"), (B, "B")):
        ndim(shape, name, 2)
    d_in, d_out, r = x[-1], W[0], A[0]
    if W[1] != d_in:
        raise _dim_error("W", W, "x", "d_in", d_in)
    if A[1] != d_in:
        raise _dim_error("A", A, "x", "d_in", d_in)
    if tuple(B) != (d_out, r):
        raise _pair_error("B", B, "W and A", (d_out, r))
    if bias is not None and tuple(bias) != (d_out,):
        raise _dim_error("bias", bias, "W", "d_out", d_out)
    return LinearShapes(batch, d_in, d_out, r)


def merge_shapes(W: Shape, A: Shape, B: Shape) -> None:
    """``W (d_out, d_in) += s * B (d_out, r) @ A (r, d_in)``."""
    for shape, name in ((W, "W"), (A, "A"), (B, "B")):
        ndim(shape, name, 2)
    if A[1] != W[1]:
        raise _dim_error("A", A, "W", "d_in", W[1])
    if tuple(B) != (W[0], A[0]):
        raise _pair_error("B", B, "W and A", (W[0], A[0]))


def backward_shapes(dy: Shape, x: Shape, W: Shape, A: Shape, B: Shape,
                    xa: Shape | None) -> LinearShapes:
    """The forward's shapes, plus ``dy`` of y's shape and ``xa`` of ``x @ A.T``'s."""
    sh = linear_shapes(x, W, A, B, None)
    if tuple(dy) != sh.batch + (sh.d_out,):
        raise ValueError(f"dy has shape {shape_str(dy)} but x {shape_str(x)} and W {shape_str(W)} "
                         f"give y the shape {shape_str(sh.batch + (sh.d_out,))}")
    if xa is not None and tuple(xa) != sh.batch + (sh.r,):
        raise ValueError(f"xa has shape {shape_str(xa)} but x @ A.T has shape "
                         f"{shape_str(sh.batch + (sh.r,))} (x {shape_str(x)}, A {shape_str(A)})")
    return sh


class MultiShapes(NamedTuple):
    batch: Shape
    d_in: int
    d_out: int
    n_adapters: int
    r: int


def multi_shapes(x: Shape, A_all: Shape, B_all: Shape, *, W: Shape | None = None,
                 bias: Shape | None = None, y: Shape | None = None) -> MultiShapes:
    """Stacked adapters ``A_all (n_adapters, r, d_in)``, ``B_all (n_adapters, d_out, r)`` on
    ``x (..., d_in)``; d_out from ``W (d_out, d_in)`` (the forward) or from B_all (``y`` of
    :func:`rslora.lora_add_multi`, which must then be ``(..., d_out)``)."""
    batch = batch_of(x)
    d_in = x[-1]
    ndim(A_all, "A_all", 3, "(n_adapters, r, d_in)")
    ndim(B_all, "B_all", 3, "(n_adapters, d_out, r)")
    na, r = A_all[0], A_all[1]
    if A_all[2] != d_in:
        raise _dim_error("A_all", A_all, "x", "d_in", d_in)
    if W is not None:
        ndim(W, "W", 2)
        if W[1] != d_in:
            raise _dim_error("W", W, "x", "d_in", d_in)
        d_out = W[0]
        if tuple(B_all) != (na, d_out, r):
            if (B_all[0], B_all[2]) == (na, r):
                raise _dim_error("B_all", B_all, "W", "d_out", d_out)
            raise _pair_error("B_all", B_all, "A_all and W", (na, d_out, r))
        if bias is not None and tuple(bias) != (d_out,):
            raise _dim_error("bias", bias, "W", "d_out", d_out)
    else:
        d_out = B_all[1]
        if (B_all[0], B_all[2]) != (na, r):
            raise ValueError(f"B_all has shape {shape_str(B_all)} but A_all "
                             f"{shape_str(A_all)} needs ({na}, d_out, {r})")
    if y is not None and tuple(y) != batch + (d_out,):
        raise ValueError(f"y has shape {shape_str(y)} but x has shape {shape_str(x)} and B_all "
                         f"{shape_str(B_all)}: y must have shape {shape_str(batch + (d_out,))}")
    return MultiShapes(batch, d_in, d_out, na, r)


# --- multi-adapter ids and scales ----------------------------------------------------------------

def ids_meta(dtype: str, integral: bool, shape: Shape, batch: Shape) -> None:
    """adapter_ids: integers (not bool) with x's batch shape (wherever they live)."""
    if not integral:
        raise TypeError(f"adapter_ids must be integers, got {dtype}")
    if tuple(shape) != tuple(batch):
        raise ValueError(f"adapter_ids has shape {shape_str(shape)} but x has batch shape "
                         f"{shape_str(batch)}")


def host_ids(adapter_ids: object, batch: Shape, n_adapters: int) -> npt.NDArray[np.int64]:
    """Host adapter_ids as a flat contiguous int64 array, every id in [-1, n_adapters); an id
    out of range is an IndexError naming its full index, before any work is done. Always a
    copy: ids that share memory with y or out= would change under the core's writes (checked,
    then read again out of range)."""
    ids = readable(adapter_ids, "adapter_ids")
    if ids.size == 0 and ids.dtype.kind == "f":  # [] for an empty batch: NumPy makes it float
        ids = ids.astype(np.int64)
    ids_meta(str(ids.dtype), ids.dtype.kind in "iu", ids.shape, batch)
    low = (ids < -1) if ids.dtype.kind == "i" else np.zeros(ids.shape, bool)
    bad = np.flatnonzero((ids >= n_adapters) | low)
    if bad.size:
        where = np.unravel_index(int(bad[0]), ids.shape)
        raise IndexError(f"adapter_ids[{', '.join(map(str, where))}] = {ids.flat[bad[0]]} is "
                         f"out of range for {n_adapters} adapters (valid: -1 for the base model"
                         + (f", 0..{n_adapters - 1})" if n_adapters else " only)"))
    return np.array(ids.reshape(-1), np.int64)  # a copy, C-contiguous and aligned


def scales_shape(shape: Shape, n_adapters: int) -> None:
    if tuple(shape) != (n_adapters,):
        raise ValueError(f"scales has shape {shape_str(shape)} but there are {n_adapters} adapters "
                         f"(scales must have shape ({n_adapters},))")


def host_scales(scales: object, n_adapters: int) -> npt.NDArray[np.float64]:
    """One finite real scale per adapter, as a contiguous float64 copy (a lone number is
    refused: it would hide a missing per-adapter value; a copy, as for :func:`host_ids`)."""
    if scales is None:
        raise TypeError("scales= is required: one scale per adapter, shape (n_adapters,)")
    arr = readable(scales, "scales")
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"scales must be real numbers, got {arr.dtype}")
    scales_shape(arr.shape, n_adapters)
    out = np.array(arr, np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"scales must be finite, got {out[~np.isfinite(out)][0]}")
    return out


# --- rsvd ----------------------------------------------------------------------------------------

def singular_overflow(dtype: str, log10_top: float) -> ValueError:
    """Singular values beyond ``dtype``'s range (the largest is 10**log10_top: a log, as float64
    may not hold it). Only float32 has a wider dtype to offer."""
    e = math.floor(log10_top)
    top = f"{10 ** (log10_top - e):.3g}e+{e}"
    fix = ("compute in float64 (M.astype(numpy.float64))" if dtype == "float32" else
           "no float64 holds them; divide M by a constant first (and multiply S by it)")
    return ValueError(f"the singular values of M overflow {dtype} (the largest is ~{top}): {fix}")


class RsvdArgs(NamedTuple):
    k: int
    oversample: int  # clamped to INT_MAX: l = min(k + oversample, min(m, n)) never needs more
    n_iter: int  # AUTO for "auto"
    method: str
    normalizer: str
    seed: object  # checked; the key is drawn with seed() when the call runs
    auto_tol: float


def rsvd_args(shape: Shape, k: object, oversample: object, n_iter_: object, method: object,
              normalizer: object, seed_: object, auto_tol: object) -> RsvdArgs:
    """The options of :func:`rslora.rsvd` for an M of ``shape`` (already 2-D). The seed is
    checked, not drawn: the backend draws it (``seed(args.seed)``) when nothing else can fail,
    so a Generator advances only for a call that runs."""
    over = min(integer(oversample, "oversample", 0), INT_MAX)
    kk = rank(k, "k", shape)
    meth = choice(method, "method", METHODS)
    norm = choice(normalizer, "normalizer", NORMALIZERS)
    if meth == "krylov" and norm != "qr":
        raise ValueError("method='krylov' orthonormalizes its blocks: normalizer must be 'qr'")
    tol = open_unit(auto_tol, "auto_tol")
    q = n_iter(n_iter_)
    if not (seed_ is None or isinstance(seed_, np.random.Generator)):
        seed(seed_)
    return RsvdArgs(kk, over, q, meth, norm, seed_, tol)


# --- where arrays live ---------------------------------------------------------------------------

KDL_CPU = 1  # DLPack device type of host memory


def on_gpu(a: object) -> bool:
    """True for an array whose data lives on a device (DLPack device type other than CPU)."""
    if isinstance(a, np.ndarray):
        return False
    dev = getattr(a, "__dlpack_device__", None)
    if dev is None:
        return False
    try:
        return int(dev()[0]) != KDL_CPU
    except Exception:  # noqa: BLE001 - a foreign object that cannot say: treat as host
        return False


# --- host arrays ---------------------------------------------------------------------------------

def readable(a: object, name: str) -> np.ndarray:
    """``np.asarray(a)``, with a failure (a torch tensor that requires grad, a ragged list) a
    TypeError naming the argument instead of the converter's own exception."""
    try:
        return np.asarray(a)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the object's __array__ raises
        raise TypeError(f"{name} cannot be read as a NumPy array ({type(e).__name__}: {e})") from None


def as_array(a: object, name: str) -> np.ndarray:
    """A NumPy view of an array-like (no dtype change: :func:`same_dtype` judges it)."""
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    if on_gpu(a):  # the call's leading array is host memory, so the CPU runs it
        raise TypeError(f"{name} is on the GPU but the call runs on the host (its first array "
                        "is host memory); move all arrays to one device")
    arr = readable(a, name)
    if arr.dtype.kind not in "fciub":
        raise TypeError(f"{name} must be float32 or float64, got {arr.dtype}")
    return arr


def aligned(a: np.ndarray) -> np.ndarray:
    """``a``, or a copy when its data start at an address that is not a multiple of the item
    size (``np.frombuffer`` at an odd byte offset): the core reads whole elements, and its
    bindings refuse such arrays. Host."""
    return a if a.flags.aligned else a.copy()


def host_dtype(**arrays: np.ndarray | None) -> np.dtype[Any]:
    """The one float dtype (float32 or float64) all given host arrays share."""
    return np.dtype(same_dtype(HOST_DTYPES, **{n: None if a is None else str(a.dtype)
                                               for n, a in arrays.items()}))


def host_matrix(M: object, name: str = "M", check_finite: bool = False) -> np.ndarray:
    """A 2-D float32/float64 view of M that the core can read (copied only if strides are odd)."""
    arr = as_array(M, name)
    host_dtype(**{name: arr})
    ndim(arr.shape, name, 2)
    s0, s1 = arr.strides
    item = arr.itemsize
    if not (min(s0, s1) >= 0 and (s0 == item or s1 == item or arr.size <= 1)):
        arr = np.ascontiguousarray(arr)  # negative or doubly strided: BLAS would copy every pass
    arr = aligned(arr)
    if check_finite and arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf (pass check_finite=False to skip this check)")
    return arr


def overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.may_share_memory(a, b) and np.shares_memory(a, b))


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
    """A host target the op writes: writable, and no element aliasing another."""
    if not target.flags.writeable:
        raise ValueError(f"{name} is read-only{why}")
    if self_overlaps(target):
        raise ValueError(f"{name} has overlapping elements (zero or interleaved strides); "
                         "pass an array whose elements are distinct")


def no_alias(target_name: str, overlap: Callable[[Any], bool], **inputs: object) -> None:
    """The target shares no memory with any input (``overlap(input)`` says whether it does)."""
    for name, a in inputs.items():
        if a is not None and overlap(a):
            raise ValueError(f"{target_name} overlaps {name}; pass a separate array")


def out_matches(shape: Shape, dtype: str, result_shape: Shape, result_dtype: str) -> None:
    """A caller's ``out=`` has the result's shape and dtype."""
    if tuple(shape) != tuple(result_shape):
        raise ValueError(f"out has shape {shape_str(shape)} but the result has shape "
                         f"{shape_str(result_shape)}")
    if dtype != result_dtype:
        raise ValueError(f"out has dtype {dtype} but the result is {result_dtype}")


def host_out(out: object, shape: Shape, dtype: np.dtype[Any],
             **inputs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validate a user's host out= (or allocate one). Returns (out, out2d, needs_copy_back)."""
    rows = math.prod(shape[:-1])
    if out is None:
        res = np.empty(shape, dtype=dtype)
        return res, res.reshape(rows, shape[-1]), False
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    out_matches(out.shape, str(out.dtype), shape, str(dtype))
    check_writable(out, "out", "")
    no_alias("out", lambda a: overlaps(out, a), **inputs)
    return (out, *rows_view(out, rows, keep=False))


def rows_view(a: np.ndarray, rows: int, keep: bool) -> tuple[np.ndarray, bool]:
    """``a`` as (rows, a.shape[-1]): a view when its layout allows one (and it is aligned), else
    a new array (True: the caller copies it back) holding a's values if ``keep`` (an update in
    place)."""
    if a.flags.aligned:  # else the core cannot write it in place: an aligned copy
        flat = a.view()
        try:
            flat.shape = (rows, a.shape[-1])  # rows spelled out: reshape(-1, 0) cannot infer them
            return flat, False
        except AttributeError:
            pass
    if keep:
        return np.array(a).reshape(rows, a.shape[-1]), True
    return np.empty((rows, a.shape[-1]), dtype=a.dtype), True


def leading(a: object) -> int:
    """The length of an array's first axis (r of an adapter's A), 0 when it has none; the
    backend judges the array itself."""
    try:
        shape = tuple(np.shape(a))  # type: ignore[call-overload]  # .shape (device arrays too)
    except Exception:  # noqa: BLE001 - not an array at all: the backend names it
        return 0
    return int(shape[0]) if shape else 0
