"""rslora on the GPU: the same ops on PyTorch CUDA tensors and CuPy arrays, with no host copies.

``rslora.lora_linear`` and ``rslora.merge`` send device arrays here on their own (any array whose
``__dlpack_device__`` is a CUDA device); the functions below take the resolved scale ``s``.
Arrays go down to the CUDA module (``rslora._cuda``, imported on first use, never at
``import rslora``) as DLPack capsules; results are allocated with the caller's framework on the
caller's device and current stream, and are returned as that framework's arrays.

dtypes: float16 and bfloat16 (float32 accumulation, one rounding per GEMM) and float32 (true
float32 GEMMs: TF32 is not used). All operands share one dtype; mixing is a ``TypeError``.
Calls are asynchronous on the current stream, like the framework's own ops, except where noted:
``lora_linear_multi`` reads back the per-adapter row counts (n_adapters ints) to size its tiles,
and ``rsvd`` waits for its result to check convergence.

The CUDA libraries come from the CUDA toolkit or the ``nvidia-cublas`` / ``nvidia-cusolver``
wheels (which a CUDA build of PyTorch already installs); cuSOLVER is loaded only when ``rsvd``
first runs.
"""

from __future__ import annotations

import ctypes
import numbers
import os

import numpy as np

from . import _device_arrays as dev
from ..scaling import _check_real

__all__ = ["is_available", "info", "lora_linear", "merge", "lora_linear_multi", "lora_add_multi",
           "rsvd"]

# Load order matters: each library's dependencies first. cuSPARSE/nvJitLink only serve cuSOLVER.
_LIBS = ("libcublasLt.so.13", "libcublas.so.13", "libnvJitLink.so.13", "libcusparse.so.12",
         "libcusolver.so.12")
_module = None
_preload_notes: list[str] = []


def _wheel_lib_dirs() -> list[str]:
    """lib folders of the nvidia-* wheels (CUDA 13 layout: nvidia/cu13/lib)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        for sub in ("cu13/lib", "cublas/lib", "cusolver/lib", "cusparse/lib", "nvjitlink/lib"):
            d = os.path.join(base, sub)
            if os.path.isdir(d):
                dirs.append(d)
    return dirs


def _preload() -> None:
    """Make the CUDA libraries findable by name: one already loaded (by PyTorch, say) or on the
    loader's path is used as is; otherwise the copy in the nvidia wheels is loaded globally."""
    dirs = _wheel_lib_dirs()
    for name in _LIBS:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            continue
        except OSError:
            pass
        for d in dirs:
            path = os.path.join(d, name)
            if os.path.exists(path):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError as e:
                    _preload_notes.append(str(e))
                break
        else:
            _preload_notes.append(f"{name} not found")


def _load():
    """The compiled CUDA module; ImportError saying what is missing when it cannot be loaded."""
    global _module
    if _module is None:
        _preload()
        try:
            from .. import _cuda
        except ImportError as e:
            notes = "; ".join(_preload_notes)
            raise ImportError(
                f"rslora's CUDA module is unavailable: {e}. It is built when nvcc and cuBLAS are "
                "found at install time (RSLORA_CUDA=ON to insist); at run time it needs cuBLAS "
                "(pip install nvidia-cublas, or a CUDA build of PyTorch)"
                + (f" [{notes}]" if notes else "")) from e
        _module = _cuda
    return _module


def is_available() -> bool:
    """True when the CUDA module loads and sees at least one GPU (never raises)."""
    try:
        return _load().device_count() > 0
    except (ImportError, RuntimeError):
        return False


def info() -> dict:
    """The CUDA module's view of the machine: devices, names and compute capabilities.

    Raises ImportError (module not built or cuBLAS missing) or RuntimeError (no driver or GPU,
    with the CUDA runtime's message).
    """
    m = _load()
    n = m.device_count()
    return {"devices": [{"name": m.device_name(i), "compute_capability": m.compute_capability(i)}
                        for i in range(n)]}


# --- argument handling ------------------------------------------------------------------------

def _scale(s, name="s") -> float:
    return _check_real(s, name)


def _ndim(a, name, nd) -> None:
    if len(a.shape) != nd:
        raise ValueError(f"{name} must be {nd}-D, got shape {dev.shape_str(a.shape)}")


def _readable(fw, a):
    """a itself when cuBLAS can read it, else a contiguous device copy."""
    if len(a.shape) == 2 and dev.blas_ok(a.shape, fw.strides(a)):
        return a
    if len(a.shape) == 1 and fw.strides(a)[0] >= 0:
        return a
    return fw.contiguous(a)


def _check_no_alias(fw, target, target_name, **inputs) -> None:
    lo, hi = fw.span(target)
    for name, a in inputs.items():
        if a is None or lo == hi:
            continue
        alo, ahi = fw.span(a)
        if alo < hi and lo < ahi:
            raise ValueError(f"{target_name} overlaps {name}; pass a separate array")


def _prepare_out(fw, out, shape, dtype, like, **inputs):
    """(out, 2-D view to write, needs_copy_back). Allocates with the caller's framework."""
    flat = (int(np.prod(shape[:-1], dtype=np.int64)), shape[-1])
    if out is None:
        res = fw.empty(shape, dtype, like)
        return res, fw.reshape(res, flat), False
    if not dev.on_gpu(out):
        raise TypeError(f"out must be a device array like x, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {dev.shape_str(out.shape)} but the result has shape "
                         f"{dev.shape_str(shape)}")
    if dev.dtype_name(out) != dtype:
        raise ValueError(f"out has dtype {dev.dtype_name(out)} but the result is {dtype}")
    _check_no_alias(fw, out, "out", **inputs)
    view = fw.view(out, flat)
    if view is None or not dev.blas_ok(flat, fw.strides(view)):
        return out, fw.empty(flat, dtype, like), True
    return out, view, False


def _ctx(fw, device):
    return device, fw.stream(device)


# --- ops ------------------------------------------------------------------------------------

def lora_linear(x, W, A, B, s, *, bias=None, out=None, return_xa=False):
    """``x @ W.T + bias + s * (x @ A.T) @ B.T`` on the GPU (see :func:`rslora.lora_linear`).

    Parameters
    ----------
    x : device array, shape (..., d_in)
    W : device array, shape (d_out, d_in)
    A, B : device arrays, shapes (r, d_in) and (d_out, r)
    s : float
        The resolved scale.
    bias : device array, shape (d_out,), optional
    out : device array, shape (..., d_out), optional
    return_xa : bool
        Also return ``x @ A.T`` (shape (..., r), unscaled, in x's dtype).

    Notes
    -----
    Three cuBLAS GEMMs with float32 accumulation: the base ``x W^T`` (added onto the broadcast
    bias), the shrink ``xa = x A^T`` (n x r) and the expand ``y += s xa B^T`` (beta = 1, so no
    n-by-d_out temporary). Views cuBLAS cannot read (no unit stride) are copied on the device.
    Not differentiable by autograd: this is the inference/merge path.
    """
    device = dev.check_device_arrays(x=x, W=W, A=A, B=B, bias=bias, out=out)
    dtype = dev.common_dtype(x=x, W=W, A=A, B=B, bias=bias)
    if len(x.shape) < 1:
        raise ValueError("x must have shape (..., d_in), got a 0-d array")
    for a, name in ((W, "W"), (A, "A"), (B, "B")):
        _ndim(a, name, 2)
    d_in, d_out, r = x.shape[-1], W.shape[0], A.shape[0]
    if W.shape[1] != d_in:
        raise ValueError(f"W has shape {dev.shape_str(W.shape)} but x has d_in={d_in}")
    if A.shape[1] != d_in:
        raise ValueError(f"A has shape {dev.shape_str(A.shape)} but x has d_in={d_in}")
    if tuple(B.shape) != (d_out, r):
        raise ValueError(f"B has shape {dev.shape_str(B.shape)} but W and A need ({d_out}, {r})")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias has shape {dev.shape_str(bias.shape)} but W has d_out={d_out}")
    s = _scale(s)
    fw = dev.framework(x, "x")
    batch = tuple(x.shape[:-1])
    out, out2, copy_back = _prepare_out(fw, out, batch + (d_out,), dtype, x, x=x, W=W, A=A, B=B,
                                        bias=bias)
    m = _load()
    x2 = _readable(fw, fw.reshape(x, (-1, d_in)))
    W, A, B = _readable(fw, W), _readable(fw, A), _readable(fw, B)
    bias = None if bias is None else _readable(fw, bias)
    xa = fw.empty((x2.shape[0], r), dtype, x)
    device, stream = _ctx(fw, device)
    cap = lambda a: None if a is None else fw.capsule(a, stream)  # noqa: E731
    m.lora_linear(device, stream, cap(x2), cap(W), cap(A), cap(B), s, cap(bias), cap(out2),
                  cap(xa))
    if copy_back:
        out[...] = fw.reshape(out2, out.shape)
    return (out, fw.reshape(xa, batch + (r,))) if return_xa else out


def merge(W, A, B, s):
    """``W += s * B @ A`` in place on the GPU: one cuBLAS GEMM with beta = 1. Returns W."""
    dev.check_device_arrays(W=W, A=A, B=B)
    dev.common_dtype(W=W, A=A, B=B)
    for a, name in ((W, "W"), (A, "A"), (B, "B")):
        _ndim(a, name, 2)
    if A.shape[1] != W.shape[1]:
        raise ValueError(f"A has shape {dev.shape_str(A.shape)} but W has d_in={W.shape[1]}")
    if tuple(B.shape) != (W.shape[0], A.shape[0]):
        raise ValueError(f"B has shape {dev.shape_str(B.shape)} but W and A need "
                         f"({W.shape[0]}, {A.shape[0]})")
    s = _scale(s)
    fw = dev.framework(W, "W")
    _check_no_alias(fw, W, "W", A=A, B=B)
    m = _load()
    target = _readable(fw, W)
    device, stream = _ctx(fw, dev.device_of(W)[1])
    m.merge(device, stream, fw.capsule(target, stream), fw.capsule(_readable(fw, A), stream),
            fw.capsule(_readable(fw, B), stream), s)
    if target is not W:
        W[...] = target
    return W


def _multi_args(x, A_all, B_all, adapter_ids, scales, d_out_name, d_out):
    """Shared validation of the multi-adapter calls; returns (fw, ids (device int64), scales
    (device float32), x2, A_all, B_all) ready for the module."""
    fw = dev.framework(x, "x")
    if len(x.shape) < 1:
        raise ValueError("x must have shape (..., d_in), got a 0-d array")
    _ndim(A_all, "A_all", 3)
    _ndim(B_all, "B_all", 3)
    d_in = x.shape[-1]
    na, r = A_all.shape[0], A_all.shape[1]
    if A_all.shape[2] != d_in:
        raise ValueError(f"A_all has shape {dev.shape_str(A_all.shape)} but x has d_in={d_in}")
    if tuple(B_all.shape) != (na, d_out, r):
        raise ValueError(f"B_all has shape {dev.shape_str(B_all.shape)} but A_all and "
                         f"{d_out_name} need ({na}, {d_out}, {r})")
    batch = tuple(x.shape[:-1])
    n = int(np.prod(batch, dtype=np.int64))
    # Everything on the host is checked before anything is uploaded.
    if dev.on_gpu(adapter_ids):  # checked on the device, before any output is written
        dev.check_device_arrays(x=x, adapter_ids=adapter_ids)
        if dev.dtype_name(adapter_ids) not in ("int64", "int32", "int16", "int8", "uint8"):
            raise TypeError(f"adapter_ids must be integers, got {dev.dtype_name(adapter_ids)}")
        ids_host = None
        ids_shape = tuple(adapter_ids.shape)
    else:
        ids_host = np.asarray(adapter_ids)
        if ids_host.dtype.kind not in "iu":
            raise TypeError(f"adapter_ids must be integers, got {ids_host.dtype}")
        ids_shape = ids_host.shape
    if ids_shape != batch:
        raise ValueError(f"adapter_ids has shape {dev.shape_str(ids_shape)} but x has "
                         f"{dev.shape_str(batch)} rows")
    if ids_host is not None and ids_host.size:
        flat = ids_host.reshape(-1)
        bad = np.flatnonzero((flat < -1) | (flat >= na))
        if bad.size:
            raise IndexError(f"adapter_ids[{int(bad[0])}] = {int(flat[bad[0]])} is outside "
                             f"[-1, {na}) for {na} adapters")
    # per-adapter scales: a number, host values or a device vector -> float32 on the device
    if dev.on_gpu(scales):
        dev.check_device_arrays(x=x, scales=scales)
        if tuple(scales.shape) != (na,):
            raise ValueError(f"scales has shape {dev.shape_str(scales.shape)} but there are "
                             f"{na} adapters")
        sc = fw.contiguous(fw.astype(scales, "float32"))
    else:
        if isinstance(scales, numbers.Real) and not isinstance(scales, bool):
            host = np.full(na, _scale(scales, "scales"), dtype=np.float64)
        else:
            host = np.asarray(scales, dtype=np.float64)
        if host.shape != (na,):
            raise ValueError(f"scales has shape {host.shape} but there are {na} adapters")
        if not np.all(np.isfinite(host)):
            raise ValueError("scales must be finite")
        sc = fw.from_host(host.astype(np.float32), x)
    if ids_host is None:
        ids = adapter_ids if dev.dtype_name(adapter_ids) == "int64" else fw.astype(adapter_ids,
                                                                                   "int64")
    else:
        ids = fw.from_host(np.ascontiguousarray(ids_host, dtype=np.int64), x)
    ids = fw.reshape(ids, (n,))
    x2 = _readable(fw, fw.reshape(x, (n, d_in)))
    return fw, ids, sc, x2, fw.contiguous(A_all), fw.contiguous(B_all), batch


def lora_linear_multi(x, W, A_all, B_all, adapter_ids, *, scales, bias=None, out=None):
    """Multi-adapter forward on the GPU: row i gets ``x_i W^T + bias + s_a B_a A_a x_i`` with
    ``a = adapter_ids[i]`` (-1: the base layer only).

    Parameters
    ----------
    x : device array, shape (..., d_in)
    W : device array, shape (d_out, d_in)
    A_all, B_all : device arrays, shapes (n_adapters, r, d_in) and (n_adapters, d_out, r)
    adapter_ids : integer array, shape x.shape[:-1]
        On the device (checked there) or host integers (checked before any upload).
    scales : float or array, shape (n_adapters,)
        Per-adapter scale (host values or a device vector), applied in float32.
    bias : device array, shape (d_out,), optional
    out : device array, shape (..., d_out), optional

    Notes
    -----
    Rows are grouped by adapter on the device (a counting sort) and cut into tiles of 16 rows;
    the shrink and expand kernels load each tile's A_a and B_a blocks into shared memory once
    for all its rows, accumulate in float32, and round once into y. An id outside
    [-1, n_adapters) raises IndexError naming the row before any output is written.
    """
    device = dev.check_device_arrays(x=x, W=W, A_all=A_all, B_all=B_all, bias=bias, out=out)
    dtype = dev.common_dtype(x=x, W=W, A_all=A_all, B_all=B_all, bias=bias)
    _ndim(W, "W", 2)
    d_out = W.shape[0]
    if len(x.shape) >= 1 and W.shape[1] != x.shape[-1]:
        raise ValueError(f"W has shape {dev.shape_str(W.shape)} but x has d_in={x.shape[-1]}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias has shape {dev.shape_str(bias.shape)} but W has d_out={d_out}")
    fw, ids, sc, x2, A_all, B_all, batch = _multi_args(x, A_all, B_all, adapter_ids, scales, "W",
                                                       d_out)
    out, out2, copy_back = _prepare_out(fw, out, batch + (d_out,), dtype, x, x=x, W=W,
                                        A_all=A_all, B_all=B_all, bias=bias)
    m = _load()
    W = _readable(fw, W)
    bias = None if bias is None else _readable(fw, bias)
    device, stream = _ctx(fw, device)
    cap = lambda a: None if a is None else fw.capsule(a, stream)  # noqa: E731
    m.lora_linear_multi(device, stream, cap(x2), cap(W), cap(A_all), cap(B_all), cap(ids),
                        cap(sc), cap(bias), cap(out2))
    if copy_back:
        out[...] = fw.reshape(out2, out.shape)
    return out


def lora_add_multi(y, x, A_all, B_all, adapter_ids, *, scales):
    """``y[i] += s_a B_a A_a x_i`` in place on the GPU (``a = adapter_ids[i]``, -1: nothing).

    y (..., d_out) must be writable and not overlap an input; returns y. See
    :func:`lora_linear_multi` for the other arguments and the kernels.
    """
    device = dev.check_device_arrays(y=y, x=x, A_all=A_all, B_all=B_all)
    dev.common_dtype(y=y, x=x, A_all=A_all, B_all=B_all)
    if len(y.shape) < 1 or tuple(y.shape[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(f"y has shape {dev.shape_str(y.shape)} but x has shape "
                         f"{dev.shape_str(x.shape)}; they must share the leading dimensions")
    fw, ids, sc, x2, A_all, B_all, batch = _multi_args(x, A_all, B_all, adapter_ids, scales, "y",
                                                       y.shape[-1])
    _check_no_alias(fw, y, "y", x=x, A_all=A_all, B_all=B_all)
    m = _load()
    flat = (x2.shape[0], y.shape[-1])
    y2 = fw.view(y, flat)
    copy_back = y2 is None or not dev.blas_ok(flat, fw.strides(y2))
    if copy_back:
        y2 = fw.contiguous(fw.reshape(y, flat))
    device, stream = _ctx(fw, device)
    cap = lambda a: None if a is None else fw.capsule(a, stream)  # noqa: E731
    m.lora_linear_multi(device, stream, cap(x2), None, cap(A_all), cap(B_all), cap(ids), cap(sc),
                        None, cap(y2))
    if copy_back:
        y[...] = fw.reshape(y2, y.shape)
    return y


def _n_iter(n_iter, k, m, n) -> int:
    if isinstance(n_iter, str):
        if n_iter != "auto":
            raise ValueError(f"n_iter must be a non-negative integer or 'auto', got {n_iter!r}")
        return 7 if k < 0.1 * min(m, n) else 4  # slowly-decaying spectra need the extra passes
    if isinstance(n_iter, bool) or not isinstance(n_iter, numbers.Integral) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer or 'auto', got {n_iter!r}")
    return int(n_iter)


def _seed(seed) -> int:
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be None or a non-negative integer, got {seed!r}")
    return int(seed) & 0xFFFFFFFFFFFFFFFF


def rsvd(M, k, *, oversample=10, n_iter="auto", method="subspace", normalizer="qr", seed=None,
         check_finite=True):
    """Randomized truncated SVD of a device matrix: ``M ~ U diag(S) Vt``.

    Parameters
    ----------
    M : device array, shape (m, n)
        float32; float16/bfloat16 are computed in float32 (a device copy) and the factors are
        returned in M's dtype.
    k : int
        Rank, 0 <= k <= min(m, n).
    oversample : int
        Extra columns of the test matrix (l = min(k + oversample, min(m, n))).
    n_iter : int or "auto"
        Subspace iterations; "auto" is 7 when k < 0.1 min(m, n), else 4.
    method, normalizer : "subspace", "qr"
        The GPU implements subspace iteration with QR re-orthonormalisation only.
    seed : int, optional
        Key of the Philox4x32-10 stream that fills the Gaussian test matrix (same seed, same
        result on any GPU); None draws one.
    check_finite : bool
        Reject NaN/Inf in M first (one device reduction and a sync).

    Returns
    -------
    U : (m, k), S : (k,) descending, Vt : (k, n)
        Device arrays of M's framework.

    Notes
    -----
    cuBLAS GEMMs (reading M in its own layout), cuSOLVER geqrf/orgqr for every
    orthonormalisation, and an l-by-l Jacobi SVD (gesvdj) of the triangular factor of
    ``M^T Q``: no m-by-n temporary, nothing on the host. Waits for the result (to check that
    gesvdj converged).
    """
    device = dev.check_device_arrays(M=M)
    d = dev.dtype_name(M)
    if d == "float64":
        raise TypeError("M is float64; the GPU rsvd works in float32 (pass M.float(), or use "
                        "rslora.rsvd on the host for float64)")
    dev.common_dtype(M=M)
    _ndim(M, "M", 2)
    m_, n_ = int(M.shape[0]), int(M.shape[1])
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    if not 0 <= k <= min(m_, n_):
        raise ValueError(f"k={k} must be in [0, min(m, n)] = [0, {min(m_, n_)}] for M of shape "
                         f"{dev.shape_str(M.shape)}")
    if isinstance(oversample, bool) or not isinstance(oversample, numbers.Integral) \
            or oversample < 0:
        raise ValueError(f"oversample must be a non-negative integer, got {oversample!r}")
    if method != "subspace":
        raise ValueError(f"method={method!r}: the GPU rsvd implements 'subspace' only")
    if normalizer != "qr":
        raise ValueError(f"normalizer={normalizer!r}: the GPU rsvd implements 'qr' only")
    q = _n_iter(n_iter, int(k), m_, n_)
    key = _seed(seed)
    fw = dev.framework(M, "M")
    if check_finite and not fw.all_finite(M):
        raise ValueError("M contains NaN or Inf")
    m = _load()
    M32 = M if d == "float32" else fw.astype(M, "float32")
    M32 = _readable(fw, M32)
    U = fw.empty((m_, k), "float32", M)
    S = fw.empty((k,), "float32", M)
    Vt = fw.empty((k, n_), "float32", M)
    device, stream = _ctx(fw, device)
    cap = lambda a: fw.capsule(a, stream)  # noqa: E731
    m.rsvd(device, stream, cap(M32), int(k), int(oversample), q, key, cap(U), cap(S), cap(Vt))
    if d != "float32":
        U, S, Vt = fw.astype(U, d), fw.astype(S, d), fw.astype(Vt, d)
    return U, S, Vt
