"""The CPU backend: the ops on NumPy arrays, run by the compiled core (``rslora._core``).

Same functions and signatures as the GPU backend (``rslora.cuda``): the public ops resolve the
scale and ``_backend`` sends the call to one of the two. Arguments are judged by the rules in
``_validation`` (shared with the GPU); what is left here is NumPy-specific: conversion, views
for batch dimensions, ``out=`` and in-place targets.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _core
from . import _validation as v

__all__ = ["lora_linear", "merge", "lora_linear_multi", "lora_add_multi", "rsvd"]


def lora_linear(x: object, W: object, A: object, B: object, s: float, *, bias: object = None,
                out: object = None,
                return_xa: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``x @ W.T + bias + s * (x @ A.T) @ B.T`` (see :func:`rslora.lora_linear`)."""
    xh, Wh, Ah, Bh = (v.as_array(a, n) for a, n in ((x, "x"), (W, "W"), (A, "A"), (B, "B")))
    bh = None if bias is None else v.as_array(bias, "bias")
    dtype = v.host_dtype(x=xh, W=Wh, A=Ah, B=Bh, bias=bh)
    sh = v.linear_shapes(xh.shape, Wh.shape, Ah.shape, Bh.shape, None if bh is None else bh.shape)
    s = v.real(s, "s")
    x2 = xh.reshape(math.prod(sh.batch), sh.d_in)  # a view when x's layout allows it
    res, out2, copy_back = v.host_out(out, sh.batch + (sh.d_out,), dtype, x=xh, W=Wh, A=Ah, B=Bh,
                                      bias=bh)
    xa = np.empty((x2.shape[0], sh.r), dtype=dtype)
    _core.lora_linear(v.aligned(x2), v.aligned(Wh), v.aligned(Ah), v.aligned(Bh),
                      s, None if bh is None else v.aligned(bh), out2, xa)
    if copy_back:
        res[...] = out2.reshape(res.shape)
    return (res, xa.reshape(sh.batch + (sh.r,))) if return_xa else res


def merge(W: object, A: object, B: object, s: float) -> np.ndarray:
    """``W += s * B @ A`` in place (see :func:`rslora.merge`)."""
    if not isinstance(W, np.ndarray):
        raise TypeError(f"W must be a NumPy array (merge works in place), got {type(W).__name__}")
    Ah, Bh = v.as_array(A, "A"), v.as_array(B, "B")
    v.host_dtype(W=W, A=Ah, B=Bh)
    v.merge_shapes(W.shape, Ah.shape, Bh.shape)
    s = v.real(s, "s")
    v.check_writable(W, "W", "; merge works in place")
    v.no_alias("W", lambda a: v.overlaps(W, a), A=Ah, B=Bh)
    Wc = v.aligned(W)  # W itself, or an aligned copy written back
    _core.merge(Wc, v.aligned(Ah), v.aligned(Bh), s)
    if Wc is not W:
        W[...] = Wc
    return W


def lora_linear_multi(x: object, W: object, A_all: object, B_all: object, adapter_ids: object, *,
                      scales: object, bias: object = None, out: object = None) -> np.ndarray:
    """The multi-adapter forward (see :func:`rslora.lora_linear_multi`)."""
    xh, Wh = v.as_array(x, "x"), v.as_array(W, "W")
    Ah, Bh = v.as_array(A_all, "A_all"), v.as_array(B_all, "B_all")
    bh = None if bias is None else v.as_array(bias, "bias")
    dtype = v.host_dtype(x=xh, W=Wh, A_all=Ah, B_all=Bh, bias=bh)
    sh = v.multi_shapes(xh.shape, Ah.shape, Bh.shape, W=Wh.shape,
                        bias=None if bh is None else bh.shape)
    ids = v.host_ids(adapter_ids, sh.batch, sh.n_adapters)
    sc = v.host_scales(scales, sh.n_adapters)
    res, out2, copy_back = v.host_out(out, sh.batch + (sh.d_out,), dtype, x=xh, W=Wh, A_all=Ah,
                                      B_all=Bh, bias=bh)
    _core.lora_linear_multi(v.aligned(xh.reshape(ids.size, sh.d_in)), v.aligned(Wh), v.aligned(Ah),
                            v.aligned(Bh), ids, sc, None if bh is None else v.aligned(bh), out2)
    if copy_back:
        res[...] = out2.reshape(res.shape)
    return res


def lora_add_multi(y: object, x: object, A_all: object, B_all: object, adapter_ids: object, *,
                   scales: object) -> np.ndarray:
    """``y[i] += s_a (x[i] @ A_a.T) @ B_a.T`` in place (see :func:`rslora.lora_add_multi`)."""
    if not isinstance(y, np.ndarray):
        raise TypeError(f"y must be a NumPy array (updated in place), got {type(y).__name__}")
    xh = v.as_array(x, "x")
    Ah, Bh = v.as_array(A_all, "A_all"), v.as_array(B_all, "B_all")
    v.host_dtype(y=y, x=xh, A_all=Ah, B_all=Bh)
    sh = v.multi_shapes(xh.shape, Ah.shape, Bh.shape, y=y.shape)
    v.check_writable(y, "y", "; lora_add_multi works in place")
    v.no_alias("y", lambda a: v.overlaps(y, a), x=xh, A_all=Ah, B_all=Bh)
    ids = v.host_ids(adapter_ids, sh.batch, sh.n_adapters)
    sc = v.host_scales(scales, sh.n_adapters)
    y2, copy_back = v.rows_view(y, ids.size, keep=True)
    _core.lora_add_multi(y2, v.aligned(xh.reshape(ids.size, sh.d_in)), v.aligned(Ah),
                         v.aligned(Bh), ids, sc)
    if copy_back:
        y[...] = y2.reshape(y.shape)
    return y


def rsvd(M: object, k: object, *, oversample: object = 10, n_iter: object = "auto",
         method: object = "subspace", normalizer: object = "qr", seed: object = None,
         check_finite: bool = True,
         auto_tol: object = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-k randomized SVD (see :func:`rslora.rsvd`)."""
    Mh = v.host_matrix(M)  # NaN/Inf are caught by the core's max-abs scan of M
    a = v.rsvd_args(Mh.shape, k, oversample, n_iter, method, normalizer, seed, auto_tol)
    res: tuple[Any, Any, Any] = _core.rsvd(Mh, a.k, a.oversample, a.n_iter, a.method,
                                           a.normalizer, v.seed(a.seed), bool(check_finite), a.auto_tol)
    est = _core.rsvd_last_uncertified()
    if est:  # "auto" reached its iteration cap before its rule could certify auto_tol
        v.warn_uncertified(_core.rsvd_last_n_iter(), a.auto_tol, est,
                           "a larger oversample, method='krylov', a fixed n_iter (check the "
                           "error) or rsvd_tol")
    return res
