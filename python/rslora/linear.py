"""Fused LoRA linear layer and in-place merge/unmerge on NumPy arrays (PEFT shapes).

Shapes: ``x (..., d_in)``, ``W (d_out, d_in)``, ``A (r, d_in)`` (``lora_A.weight``),
``B (d_out, r)`` (``lora_B.weight``). The scale is ``scale=`` or ``alpha=`` with ``rule=``.
NaN and Inf propagate as IEEE arithmetic does: a NaN anywhere in a row of x reaches that row of
the result; an Inf in A or B with ``scale=0`` gives NaN (0 * Inf), as in the NumPy expression.
"""

from __future__ import annotations

import math

import numpy as np

from . import _arrays, _core
from .scaling import resolve

__all__ = ["lora_linear", "merge", "unmerge"]


def _gpu(name):
    """The GPU implementation (rslora.cuda), imported only when a device array arrives.

    Its functions take the resolved scale: ``lora_linear(x, W, A, B, s, bias=, out=, return_xa=)``
    and ``merge(W, A, B, s)``.
    """
    from . import cuda

    return getattr(cuda, name)


def lora_linear(x, W, A, B, *, scale=None, alpha=None, rule="rslora", bias=None, out=None,
                return_xa=False):
    """``x @ W.T + bias + s * (x @ A.T) @ B.T`` without n-by-d_out temporaries.

    Parameters
    ----------
    x : array_like, shape (..., d_in)
        Inputs, float32 or float64 (any layout; non-contiguous views are read in place where
        BLAS can, copied otherwise).
    W : array_like, shape (d_out, d_in)
        Base weight.
    A, B : array_like, shapes (r, d_in) and (d_out, r)
        The adapter, as PEFT stores ``lora_A.weight`` and ``lora_B.weight``.
    scale : float, optional
        The scaling factor s. Give either ``scale`` or ``alpha`` (with ``rule``), not both.
    alpha : float, optional
        ``lora_alpha``; s = alpha / sqrt(r) (``rule="rslora"``) or alpha / r (``"standard"``).
    rule : {"rslora", "standard"}
    bias : array_like, shape (d_out,), optional
    out : ndarray, shape (..., d_out), optional
        Where to write the result; must have the result's dtype and not overlap an input.
    return_xa : bool
        Also return ``x @ A.T`` (shape (..., r), unscaled): the backward reuses it.

    Returns
    -------
    y : ndarray, shape (..., d_out)
    xa : ndarray, shape (..., r)
        Only with ``return_xa=True``.

    Notes
    -----
    The only scratch is the n-by-r product ``x @ A.T``; s is applied inside the last GEMM. All
    operands must share one dtype (float32 or float64); mixing them is a ``TypeError``. The GIL
    is released while the kernels run.
    """
    if _arrays.on_gpu(x):
        s = resolve(scale, alpha, rule, A.shape[0])
        return _gpu("lora_linear")(x, W, A, B, s, bias=bias, out=out, return_xa=return_xa)
    x = _arrays.as_array(x, "x")
    W = _arrays.as_array(W, "W")
    A = _arrays.as_array(A, "A")
    B = _arrays.as_array(B, "B")
    bias = None if bias is None else _arrays.as_array(bias, "bias")
    dtype = _arrays.common_dtype(x=x, W=W, A=A, B=B, bias=bias)
    if x.ndim < 1:
        raise ValueError("x must have shape (..., d_in), got a 0-d array")
    _arrays.require_ndim(W, "W", 2)
    _arrays.require_ndim(A, "A", 2)
    s = resolve(scale, alpha, rule, A.shape[0])

    d_in, d_out, r = x.shape[-1], W.shape[0], A.shape[0]
    batch = x.shape[:-1]
    x2 = x.reshape(math.prod(batch), d_in)  # a view when x's layout allows it
    out, out2, copy_back = _arrays.prepare_out(out, batch + (d_out,), dtype, x=x, W=W, A=A, B=B,
                                               bias=bias)
    xa = np.empty((x2.shape[0], r), dtype=dtype)
    _core.lora_linear(x2, W, A, B, s, bias, out2, xa)
    if copy_back:
        out[...] = out2.reshape(out.shape)
    return (out, xa.reshape(batch + (r,))) if return_xa else out


def _merge(W, A, B, sign, scale, alpha, rule):
    if _arrays.on_gpu(W):
        return _gpu("merge")(W, A, B, sign * resolve(scale, alpha, rule, A.shape[0]))
    if not isinstance(W, np.ndarray):
        raise TypeError(f"W must be a NumPy array (merge works in place), got {type(W).__name__}")
    A = _arrays.as_array(A, "A")
    B = _arrays.as_array(B, "B")
    _arrays.common_dtype(W=W, A=A, B=B)
    _arrays.require_ndim(W, "W", 2)
    _arrays.require_ndim(A, "A", 2)
    _arrays.check_writable(W, "W", "; merge works in place")
    _arrays.check_no_alias(W, "W", A=A, B=B)
    s = resolve(scale, alpha, rule, A.shape[0])
    _core.merge(W, A, B, sign * s)
    return W


def merge(W, A, B, *, scale=None, alpha=None, rule="rslora"):
    """``W += s * B @ A`` in place, with no d_out-by-d_in temporary (one GEMM with beta = 1).

    Parameters
    ----------
    W : ndarray, shape (d_out, d_in)
        Updated in place and returned. Any writable layout.
    A, B : array_like, shapes (r, d_in) and (d_out, r)
    scale, alpha, rule
        As in :func:`lora_linear`.

    Returns
    -------
    W : ndarray
        The same array, merged.
    """
    return _merge(W, A, B, 1.0, scale, alpha, rule)


def unmerge(W, A, B, *, scale=None, alpha=None, rule="rslora"):
    """``W -= s * B @ A`` in place: undoes :func:`merge` up to float rounding."""
    return _merge(W, A, B, -1.0, scale, alpha, rule)
