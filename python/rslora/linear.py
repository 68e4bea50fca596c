"""Fused LoRA linear layer and in-place merge/unmerge on NumPy arrays (PEFT shapes).

Shapes: ``x (..., d_in)``, ``W (d_out, d_in)``, ``A (r, d_in)`` (``lora_A.weight``),
``B (d_out, r)`` (``lora_B.weight``). The scale is ``scale=`` or ``alpha=`` with ``rule=``.
NaN and Inf propagate as IEEE arithmetic does: a NaN anywhere in a row of x reaches that row of
the result; an Inf in A or B with ``scale=0`` gives NaN (0 * Inf), as in the NumPy expression.
"""

from __future__ import annotations

from typing import Any

from . import _backend
from ._validation import flag, leading
from .scaling import resolve

__all__ = ["lora_linear", "merge", "unmerge"]


def lora_linear(x: Any, W: Any, A: Any, B: Any, *, scale: float | None = None,
                alpha: float | None = None, rule: str = "rslora", bias: Any = None, out: Any = None,
                return_xa: bool = False) -> Any:
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
    s = resolve(scale, alpha, rule, leading(A))
    return _backend.op("lora_linear", x)(x, W, A, B, s, bias=bias, out=out,
                                         return_xa=flag(return_xa, "return_xa"))


def _merge(W: Any, A: Any, B: Any, sign: float, scale: float | None, alpha: float | None,
           rule: str) -> Any:
    s = resolve(scale, alpha, rule, leading(A))
    return _backend.op("merge", W)(W, A, B, sign * s)


def merge(W: Any, A: Any, B: Any, *, scale: float | None = None, alpha: float | None = None,
          rule: str = "rslora") -> Any:
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


def unmerge(W: Any, A: Any, B: Any, *, scale: float | None = None, alpha: float | None = None,
            rule: str = "rslora") -> Any:
    """``W -= s * B @ A`` in place: undoes :func:`merge` up to float rounding."""
    return _merge(W, A, B, -1.0, scale, alpha, rule)
