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
import os
from typing import Any

import numpy as np

from . import _device_arrays as dev
from .. import _core
from .. import _validation as v

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


def _load() -> Any:
    """The compiled CUDA module; ImportError saying what is missing when it cannot be loaded."""
    global _module
    if _module is None:
        _preload()
        try:
            from .. import _cuda  # type: ignore[attr-defined,unused-ignore]
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
        return bool(_load().device_count() > 0)
    except (ImportError, RuntimeError):
        return False


def info() -> dict[str, list[dict[str, Any]]]:
    """The CUDA module's view of the machine: devices, names and compute capabilities.

    Raises ImportError (module not built or cuBLAS missing) or RuntimeError (no driver or GPU,
    with the CUDA runtime's message).
    """
    m = _load()
    n = m.device_count()
    return {"devices": [{"name": m.device_name(i), "compute_capability": m.compute_capability(i)}
                        for i in range(n)]}


# --- argument handling (the rules themselves are in rslora._validation, shared with the CPU) ------

def _shape(a: Any) -> v.Shape:
    return tuple(int(d) for d in a.shape)


def _opt_shape(a: Any) -> v.Shape | None:
    return None if a is None else _shape(a)


def _dtype(**arrays: Any) -> str:
    """The one dtype of the operands, from the GPU's float16/bfloat16/float32."""
    return v.same_dtype(dev.SUPPORTED, **{n: None if a is None else dev.dtype_name(a)
                                          for n, a in arrays.items()})


def _readable(fw: dev.Framework, a: Any) -> Any:
    """a itself when cuBLAS can read it, else a contiguous device copy."""
    if len(a.shape) == 2 and dev.blas_ok(a.shape, fw.strides(a)):
        return a
    if len(a.shape) == 1 and fw.strides(a)[0] >= 0:
        return a
    return fw.contiguous(a)


def _check_no_alias(fw: dev.Framework, target: Any, target_name: str, **inputs: Any) -> None:
    lo, hi = fw.span(target)

    def overlap(a: Any) -> bool:
        alo, ahi = fw.span(a)
        return lo < hi and alo < hi and lo < ahi

    v.no_alias(target_name, overlap, **inputs)


def _prepare_out(fw: dev.Framework, out: Any, shape: v.Shape, dtype: str, like: Any,
                 **inputs: Any) -> tuple[Any, Any, bool]:
    """(out, 2-D view to write, needs_copy_back). Allocates with the caller's framework."""
    flat = (int(np.prod(shape[:-1], dtype=np.int64)), shape[-1])
    if out is None:
        res = fw.empty(shape, dtype, like)
        return res, fw.reshape(res, flat), False
    v.out_matches(_shape(out), dev.dtype_name(out), shape, dtype)
    _check_no_alias(fw, out, "out", **inputs)
    view = fw.view(out, flat)
    if view is None or not dev.blas_ok(flat, fw.strides(view)):
        return out, fw.empty(flat, dtype, like), True
    return out, view, False


_INT_DTYPES = ("int64", "int32", "int16", "int8", "uint8")


def _ids(adapter_ids: Any, x: Any, sh: v.MultiShapes) -> Any:
    """adapter_ids checked: a device array (its values are checked by the kernels, before any
    output is written) or host ids range-checked here, as flat int64."""
    if not dev.on_gpu(adapter_ids):
        return v.host_ids(adapter_ids, sh.batch, sh.n_adapters)
    dev.check_device_arrays(x=x, adapter_ids=adapter_ids)
    d = dev.dtype_name(adapter_ids)
    v.ids_meta(d, d in _INT_DTYPES, _shape(adapter_ids), sh.batch)
    return adapter_ids


def _scales(scales: Any, x: Any, n_adapters: int) -> Any:
    """Per-adapter scales checked: a device vector, or host values as float32."""
    if not dev.on_gpu(scales):
        return v.host_scales(scales, n_adapters).astype(np.float32)
    dev.check_device_arrays(x=x, scales=scales)
    v.scales_shape(_shape(scales), n_adapters)
    return scales


def _multi_inputs(fw: dev.Framework, adapter_ids: Any, scales: Any, x: Any,
                  sh: v.MultiShapes) -> tuple[Any, Any]:
    """(ids as flat int64, scales as contiguous float32) on x's device. Everything on the host
    is checked before anything is uploaded."""
    ids, sc = _ids(adapter_ids, x, sh), _scales(scales, x, sh.n_adapters)
    if isinstance(ids, np.ndarray):
        ids = fw.from_host(ids, x)
    elif dev.dtype_name(ids) != "int64":
        ids = fw.astype(ids, "int64")
    if isinstance(sc, np.ndarray):
        sc = fw.from_host(sc, x)
    else:
        sc = fw.contiguous(fw.astype(sc, "float32"))
    return fw.reshape(ids, (int(np.prod(sh.batch, dtype=np.int64)),)), sc


def _capsules(fw: dev.Framework, stream: int, *arrays: Any) -> list[Any]:
    return [None if a is None else fw.capsule(a, stream) for a in arrays]


# --- ops ------------------------------------------------------------------------------------

def lora_linear(x: Any, W: Any, A: Any, B: Any, s: float, *, bias: Any = None, out: Any = None,
                return_xa: bool = False) -> Any:
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
    dtype = _dtype(x=x, W=W, A=A, B=B, bias=bias)
    sh = v.linear_shapes(_shape(x), _shape(W), _shape(A), _shape(B), _opt_shape(bias))
    s = v.real(s, "s")
    fw = dev.framework(x, "x")
    out, out2, copy_back = _prepare_out(fw, out, sh.batch + (sh.d_out,), dtype, x, x=x, W=W, A=A,
                                        B=B, bias=bias)
    m = _load()
    x2 = _readable(fw, fw.reshape(x, (-1, sh.d_in)))
    W, A, B = _readable(fw, W), _readable(fw, A), _readable(fw, B)
    bias = None if bias is None else _readable(fw, bias)
    xa = fw.empty((x2.shape[0], sh.r), dtype, x)
    stream = fw.stream(device)
    cx, cW, cA, cB, cbias, cout, cxa = _capsules(fw, stream, x2, W, A, B, bias, out2, xa)
    m.lora_linear(device, stream, cx, cW, cA, cB, s, cbias, cout, cxa)
    if copy_back:
        out[...] = fw.reshape(out2, out.shape)
    return (out, fw.reshape(xa, sh.batch + (sh.r,))) if return_xa else out


def merge(W: Any, A: Any, B: Any, s: float) -> Any:
    """``W += s * B @ A`` in place on the GPU: one cuBLAS GEMM with beta = 1. Returns W."""
    device = dev.check_device_arrays(W=W, A=A, B=B)
    _dtype(W=W, A=A, B=B)
    v.merge_shapes(_shape(W), _shape(A), _shape(B))
    s = v.real(s, "s")
    fw = dev.framework(W, "W")
    _check_no_alias(fw, W, "W", A=A, B=B)
    m = _load()
    target = _readable(fw, W)
    stream = fw.stream(device)
    m.merge(device, stream, *_capsules(fw, stream, target, _readable(fw, A), _readable(fw, B)), s)
    if target is not W:
        W[...] = target
    return W


def lora_linear_multi(x: Any, W: Any, A_all: Any, B_all: Any, adapter_ids: Any, *, scales: Any,
                      bias: Any = None, out: Any = None) -> Any:
    """Multi-adapter forward on the GPU: row i gets ``x_i W^T + bias + s_a B_a A_a x_i`` with
    ``a = adapter_ids[i]`` (-1: the base layer only).

    Parameters
    ----------
    x : device array, shape (..., d_in)
    W : device array, shape (d_out, d_in)
    A_all, B_all : device arrays, shapes (n_adapters, r, d_in) and (n_adapters, d_out, r)
    adapter_ids : integer array, shape x.shape[:-1]
        On the device (checked there) or host integers (checked before any upload).
    scales : array, shape (n_adapters,)
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
    dtype = _dtype(x=x, W=W, A_all=A_all, B_all=B_all, bias=bias)
    sh = v.multi_shapes(_shape(x), _shape(A_all), _shape(B_all), W=_shape(W),
                        bias=_opt_shape(bias))
    fw = dev.framework(x, "x")
    ids, sc = _multi_inputs(fw, adapter_ids, scales, x, sh)
    out, out2, copy_back = _prepare_out(fw, out, sh.batch + (sh.d_out,), dtype, x, x=x, W=W,
                                        A_all=A_all, B_all=B_all, bias=bias)
    m = _load()
    x2 = _readable(fw, fw.reshape(x, (-1, sh.d_in)))
    W = _readable(fw, W)
    bias = None if bias is None else _readable(fw, bias)
    stream = fw.stream(device)
    m.lora_linear_multi(device, stream, *_capsules(fw, stream, x2, W, fw.contiguous(A_all),
                                                   fw.contiguous(B_all), ids, sc, bias, out2))
    if copy_back:
        out[...] = fw.reshape(out2, out.shape)
    return out


def lora_add_multi(y: Any, x: Any, A_all: Any, B_all: Any, adapter_ids: Any, *,
                   scales: Any) -> Any:
    """``y[i] += s_a B_a A_a x_i`` in place on the GPU (``a = adapter_ids[i]``, -1: nothing).

    y (..., d_out) must not overlap an input; returns y. See :func:`lora_linear_multi` for the
    other arguments and the kernels.
    """
    device = dev.check_device_arrays(y=y, x=x, A_all=A_all, B_all=B_all)
    _dtype(y=y, x=x, A_all=A_all, B_all=B_all)
    sh = v.multi_shapes(_shape(x), _shape(A_all), _shape(B_all), y=_shape(y))
    fw = dev.framework(x, "x")
    _check_no_alias(fw, y, "y", x=x, A_all=A_all, B_all=B_all)
    ids, sc = _multi_inputs(fw, adapter_ids, scales, x, sh)
    m = _load()
    flat = (int(np.prod(sh.batch, dtype=np.int64)), sh.d_out)
    y2 = fw.view(y, flat)
    copy_back = y2 is None or not dev.blas_ok(flat, fw.strides(y2))
    if copy_back:
        y2 = fw.contiguous(fw.reshape(y, flat))
    x2 = _readable(fw, fw.reshape(x, (flat[0], sh.d_in)))
    stream = fw.stream(device)
    cx, cA, cB, cids, csc, cy = _capsules(fw, stream, x2, fw.contiguous(A_all),
                                          fw.contiguous(B_all), ids, sc, y2)
    m.lora_linear_multi(device, stream, cx, None, cA, cB, cids, csc, None, cy)
    if copy_back:
        y[...] = fw.reshape(y2, y.shape)
    return y


def rsvd(M: Any, k: int, *, oversample: int = 10, n_iter: int | str = "auto",
         method: str = "subspace", normalizer: str = "qr", seed: object = None,
         check_finite: bool = True, auto_tol: float = 1e-3) -> tuple[Any, Any, Any]:
    """Randomized truncated SVD of a device matrix: ``M ~ U diag(S) Vt``.

    Takes the arguments of :func:`rslora.rsvd` and judges them by the same rules (the same
    errors, word for word); what the GPU does not implement is refused after that, by name.

    Parameters
    ----------
    M : device array, shape (m, n)
        float32; float16/bfloat16 are computed in float32 (a device copy) and the factors are
        returned in M's dtype.
    k : int
        Rank, 1 <= k <= min(m, n).
    oversample : int
        Extra columns of the test matrix (l = min(k + oversample, min(m, n))).
    n_iter : int or "auto"
        Subspace iterations. "auto" is the fixed count the CPU's rsvd uses where it cannot stop
        adaptively (``rslora._core.rsvd_auto_iters("subspace", m, n, k, oversample)``: 0 when l
        spans the short side, else a few): the GPU does not run the adaptive stop.
    method, normalizer : "subspace", "qr"
        The GPU implements subspace iteration with QR re-orthonormalisation only.
    seed : int, numpy.random.Generator or None
        Key of the Philox4x32-10 stream that fills the Gaussian test matrix (same seed, same
        result on any GPU); a Generator gives its next integer, None draws one.
    check_finite : bool
        Reject NaN/Inf in M first (one device reduction and a sync).
    auto_tol : float
        Checked as on the CPU; the GPU's "auto" does not use it.

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
    _dtype(M=M)
    v.ndim(_shape(M), "M", 2)
    m_, n_ = _shape(M)
    a = v.rsvd_args((m_, n_), k, oversample, n_iter, method, normalizer, seed, auto_tol)
    if a.method != "subspace":
        raise ValueError(f"method={a.method!r}: the GPU rsvd implements 'subspace' only")
    if a.normalizer != "qr":
        raise ValueError(f"normalizer={a.normalizer!r}: the GPU rsvd implements 'qr' only")
    q = _n_iter(a.n_iter, a.k, m_, n_, a.oversample)
    fw = dev.framework(M, "M")
    if check_finite and not fw.all_finite(M):
        raise ValueError("M contains NaN or Inf (pass check_finite=False to skip this check)")
    key = v.seed(a.seed)
    m = _load()
    M32 = M if d == "float32" else fw.astype(M, "float32")
    M32 = _readable(fw, M32)
    U = fw.empty((m_, a.k), "float32", M)
    S = fw.empty((a.k,), "float32", M)
    Vt = fw.empty((a.k, n_), "float32", M)
    stream = fw.stream(device)
    cM, cU, cS, cVt = _capsules(fw, stream, M32, U, S, Vt)
    m.rsvd(device, stream, cM, a.k, a.oversample, q, key, cU, cS, cVt)
    if d != "float32":
        U, S, Vt = fw.astype(U, d), fw.astype(S, d), fw.astype(Vt, d)
    return U, S, Vt


def _n_iter(n_iter: int, k: int, m: int, n: int, oversample: int = 10) -> int:
    """The iterations the GPU runs: n_iter itself, or for "auto" the CPU's fixed-count rule."""
    if n_iter != v.AUTO:
        return n_iter
    return int(_core.rsvd_auto_iters("subspace", m, n, k, oversample))
