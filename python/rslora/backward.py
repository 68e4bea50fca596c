"""The backward pass of the fused LoRA linear layer (PEFT shapes, W and bias frozen).

For ``y = x @ W.T + bias + s * (x @ A.T) @ B.T`` and an upstream gradient ``dy = dL/dy``::

    dx = dy @ W + s * (dy @ B) @ A
    dA = s * (dy @ B).T @ x
    dB = s * dy.T @ (x @ A.T)

Batch dimensions are flattened for ``dA``/``dB`` (summed over every row), as autograd does.
"""

from __future__ import annotations

import numpy as np

from . import _arrays, _core
from .scaling import resolve

__all__ = ["lora_linear_backward"]

_NAMES = ("x", "A", "B")


def _parse_need(need) -> set:
    if isinstance(need, str):
        need = (need,)
    try:
        wanted = set(need)
    except TypeError:
        raise TypeError(f"need must be a collection of 'x', 'A', 'B', got {need!r}") from None
    bad = sorted(str(w) for w in wanted - set(_NAMES))
    if bad:
        raise ValueError(f"need may only name 'x', 'A', 'B', got {', '.join(map(repr, bad))}")
    return wanted


def lora_linear_backward(dy, x, W, A, B, *, scale=None, alpha=None, rule="rslora",
                         need=("x", "A", "B"), xa=None):
    """Gradients of the fused LoRA linear layer with respect to x, A and B.

    Parameters
    ----------
    dy : array_like, shape (..., d_out)
        Gradient of the loss with respect to the layer's output y.
    x : array_like, shape (..., d_in)
        The forward's input (same batch shape as dy).
    W : array_like, shape (d_out, d_in)
        Base weight (frozen: no gradient is computed for it, nor for the bias).
    A, B : array_like, shapes (r, d_in) and (d_out, r)
        The adapter (PEFT's ``lora_A.weight``, ``lora_B.weight``).
    scale, alpha, rule
        The scale s, as in :func:`rslora.lora_linear`: ``scale=`` or ``alpha=`` with ``rule=``.
    need : collection of {"x", "A", "B"}
        Which gradients to compute; the others are returned as ``None`` and cost nothing.
    xa : array_like, shape (..., r), optional
        ``x @ A.T`` from ``lora_linear(..., return_xa=True)``; reused for dB instead of
        recomputing it (one n*d_in*r GEMM saved).

    Returns
    -------
    dx : ndarray of x's shape, or None
    dA : ndarray, shape (r, d_in), or None
    dB : ndarray, shape (d_out, r), or None

    Notes
    -----
    The only scratch is n-by-r: ``dx`` is written by the base GEMM ``dy @ W`` and the LoRA term
    ``s (dy B) A`` is accumulated onto it in place (BLAS beta = 1); ``s dy B`` is shared by dx
    and dA. All arrays share one dtype (float32 or float64); mixing is a ``TypeError``. Results
    are new C-contiguous arrays. The GIL is released while the kernels run.
    """
    wanted = _parse_need(need)
    dy = _arrays.as_array(dy, "dy")
    x = _arrays.as_array(x, "x")
    W = _arrays.as_array(W, "W")
    A = _arrays.as_array(A, "A")
    B = _arrays.as_array(B, "B")
    xa = None if xa is None else _arrays.as_array(xa, "xa")
    dtype = _arrays.common_dtype(dy=dy, x=x, W=W, A=A, B=B, xa=xa)
    if x.ndim < 1:
        raise ValueError("x must have shape (..., d_in), got a 0-d array")
    _arrays.require_ndim(W, "W", 2)
    _arrays.require_ndim(A, "A", 2)
    _arrays.require_ndim(B, "B", 2)
    d_out, d_in, r = W.shape[0], x.shape[-1], A.shape[0]
    if W.shape[1] != d_in:
        raise ValueError(f"W has shape {W.shape} but x has d_in={d_in}")
    if A.shape[1] != d_in:
        raise ValueError(f"A has shape {A.shape} but x has d_in={d_in}")
    if B.shape != (d_out, r):
        raise ValueError(f"B has shape {B.shape} but W and A need {(d_out, r)}")
    batch = x.shape[:-1]
    if dy.shape != batch + (d_out,):
        raise ValueError(f"dy has shape {dy.shape} but x {x.shape} and W {W.shape} "
                         f"give y the shape {batch + (d_out,)}")
    if xa is not None and xa.shape != batch + (r,):
        raise ValueError(f"xa has shape {xa.shape} but x @ A.T has shape {batch + (r,)} "
                         f"(x {x.shape}, A {A.shape})")
    s = resolve(scale, alpha, rule, r)

    n = int(np.prod(batch, dtype=np.int64))
    dx = np.empty(batch + (d_in,), dtype=dtype) if "x" in wanted else None
    dA = np.empty((r, d_in), dtype=dtype) if "A" in wanted else None
    dB = np.empty((d_out, r), dtype=dtype) if "B" in wanted else None
    if wanted:
        _core.lora_linear_backward(
            dy.reshape(n, d_out), x.reshape(n, d_in), W, A, B, s,
            None if xa is None or "B" not in wanted else xa.reshape(n, r),
            None if dx is None else dx.reshape(n, d_in), dA, dB)
    return dx, dA, dB
