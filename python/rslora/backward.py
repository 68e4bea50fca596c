"""The backward pass of the fused LoRA linear layer (PEFT shapes, W and bias frozen).

For ``y = x @ W.T + bias + s * (x @ A.T) @ B.T`` and an upstream gradient ``dy = dL/dy``::

    dx = dy @ W + s * (dy @ B) @ A
    dA = s * (dy @ B).T @ x
    dB = s * dy.T @ (x @ A.T)

Batch dimensions are flattened for ``dA``/``dB`` (summed over every row), as autograd does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from . import _backend, _core
from . import _validation as v
from .scaling import resolve

__all__ = ["lora_linear_backward"]

_NAMES = ("x", "A", "B")


def _parse_need(need: str | Iterable[str]) -> set[str]:
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


def lora_linear_backward(dy: Any, x: Any, W: Any, A: Any, B: Any, *, scale: float | None = None,
                         alpha: float | None = None, rule: str = "rslora",
                         need: str | Iterable[str] = ("x", "A", "B"), xa: Any = None
                         ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
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
    _backend.host_only("lora_linear_backward", dy=dy, x=x, W=W, A=A, B=B, xa=xa)
    dy, x, W, A, B = (v.as_array(a, n) for a, n in ((dy, "dy"), (x, "x"), (W, "W"), (A, "A"),
                                                     (B, "B")))
    xa = None if xa is None else v.as_array(xa, "xa")
    dtype = v.host_dtype(dy=dy, x=x, W=W, A=A, B=B, xa=xa)
    batch, d_in, d_out, r = v.backward_shapes(dy.shape, x.shape, W.shape, A.shape, B.shape,
                                              None if xa is None else xa.shape)
    s = resolve(scale, alpha, rule, r)

    n = int(np.prod(batch, dtype=np.int64))
    dx = np.empty(batch + (d_in,), dtype=dtype) if "x" in wanted else None
    dA = np.empty((r, d_in), dtype=dtype) if "A" in wanted else None
    dB = np.empty((d_out, r), dtype=dtype) if "B" in wanted else None
    if wanted:
        _core.lora_linear_backward(
            v.aligned(dy.reshape(n, d_out)), v.aligned(x.reshape(n, d_in)), v.aligned(W),
            v.aligned(A), v.aligned(B), s,
            None if xa is None or "B" not in wanted else v.aligned(xa.reshape(n, r)),
            None if dx is None else dx.reshape(n, d_in), dA, dB)
    return dx, dA, dB
