"""LoRALinear: a frozen linear layer with one LoRA adapter, as a small NumPy object.

Names follow PEFT's ``LoraLayer`` where they carry over: ``lora_A`` (r, in_features),
``lora_B`` (out_features, r), ``r``, ``lora_alpha``, ``scaling``, ``merged``, ``merge()``,
``unmerge()``, ``get_delta_weight()``; ``use_rslora`` is spelled ``rule="rslora"|"standard"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from . import _backend, _core
from . import _validation as v
from .scaling import resolve
from .backward import _parse_need, lora_linear_backward
from .linear import lora_linear, merge, unmerge

__all__ = ["LoRALinear", "LoRAGrads"]


class LoRAGrads(NamedTuple):
    """Gradients from :meth:`LoRALinear.backward` (None for those not asked for)."""

    dx: np.ndarray | None
    lora_A: np.ndarray | None
    lora_B: np.ndarray | None


class LoRALinear:
    """``y = x @ weight.T + bias + scaling * (x @ lora_A.T) @ lora_B.T`` with the base frozen.

    Parameters
    ----------
    weight : array_like, shape (out_features, in_features)
        Base weight (PEFT's ``base_layer.weight``), float32 or float64.
    lora_A, lora_B : array_like, shapes (r, in_features) and (out_features, r)
    bias : array_like, shape (out_features,), optional
    alpha : float, optional
        ``lora_alpha``; with ``rule`` it gives the scale (``alpha / sqrt(r)`` for "rslora",
        ``alpha / r`` for "standard"). Give ``alpha`` or ``scale``, not both.
    rule : {"rslora", "standard"}
    scale : float, optional
        The scale itself.
    copy : bool
        Copy the arrays (default), so that merge() never changes the caller's weight. The
        copies are packed: ``weight`` and ``lora_A`` are the two row blocks of one
        (out_features + r, in_features) buffer, so the unmerged forward is two GEMMs (one
        gives ``x @ weight.T`` and ``x @ lora_A.T`` together, the other adds the expand onto
        it) instead of three. With ``copy=False`` the caller's arrays are used as they are,
        in their own layout (three GEMMs): merge() then updates the caller's weight in place,
        and refuses a read-only one.

    Attributes
    ----------
    weight, bias, lora_A, lora_B : ndarray
        The arrays in use (C-contiguous copies, or the caller's own with ``copy=False``;
        ``weight`` holds ``W + s B A`` while merged).
    scaling : float
    merged : bool

    Examples
    --------
    >>> layer = LoRALinear.init(W, r=8, alpha=16, seed=0)   # PEFT's init: B = 0
    >>> y = layer.forward(x)
    >>> grads = layer.backward(dy)          # LoRAGrads(dx, lora_A, lora_B)
    >>> layer.lora_A -= lr * grads.lora_A
    """

    def __init__(self, weight: Any, lora_A: Any, lora_B: Any, *, bias: Any = None,
                 alpha: float | None = None, rule: str = "rslora", scale: float | None = None,
                 copy: bool = True) -> None:
        given = dict(weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias)
        _backend.host_only("LoRALinear", **given)
        copy = v.flag(copy, "copy")
        arrays = {k: None if a is None else v.as_array(a, k) for k, a in given.items()}
        v.host_dtype(**arrays)
        W, A, B, b = arrays["weight"], arrays["lora_A"], arrays["lora_B"], arrays["bias"]
        assert W is not None and A is not None and B is not None  # as_array refuses None
        for arr, name in ((W, "weight"), (A, "lora_A"), (B, "lora_B")):
            v.ndim(arr.shape, name, 2)
        if A.shape[1] != W.shape[1]:
            raise ValueError(f"lora_A has shape {A.shape} but weight has in_features={W.shape[1]}")
        if B.shape != (W.shape[0], A.shape[0]):
            raise ValueError(f"lora_B has shape {B.shape} but weight and lora_A need "
                             f"{(W.shape[0], A.shape[0])}")
        if b is not None and b.shape != (W.shape[0],):
            raise ValueError(f"bias has shape {b.shape} but weight has out_features={W.shape[0]}")
        self.scaling = resolve(scale, alpha, rule, A.shape[0])
        self.lora_alpha = alpha
        self.rule = rule
        # copy=False: the arrays as given (any layout: the ops read it in place), never a silent
        # contiguous copy that merge() would then update instead of the caller's weight
        conv: Any = (lambda a: np.array(a, order="C")) if copy else (lambda a: a)
        self._packed: np.ndarray | None = None
        if copy:
            self._packed = np.empty((W.shape[0] + A.shape[0], W.shape[1]), dtype=W.dtype)
            self._packed[:W.shape[0]] = W
            self._packed[W.shape[0]:] = A
            self.weight, self.lora_A = self._packed[:W.shape[0]], self._packed[W.shape[0]:]
        else:
            self.weight, self.lora_A = conv(W), conv(A)
        self._packed_views = (self.weight, self.lora_A)
        self.lora_B = conv(B)
        self.bias = None if b is None else conv(b)
        self.merged = False
        self._cache: tuple[np.ndarray, np.ndarray | None] | None = None

    @classmethod
    def init(cls, weight: Any, r: int, *, alpha: float | None = None, rule: str = "rslora",
             scale: float | None = None, bias: Any = None,
             seed: int | np.random.Generator | None = None) -> LoRALinear:
        """A fresh adapter as PEFT initialises one: lora_A Kaiming-uniform (a = sqrt(5)), lora_B 0.

        With ``alpha`` and ``scale`` both omitted, alpha = r (PEFT's ``lora_alpha`` default is
        8 with r = 8).
        """
        _backend.host_only("LoRALinear.init", weight=weight, bias=bias)
        W = v.as_array(weight, "weight")
        v.host_dtype(weight=W)
        v.ndim(W.shape, "weight", 2)
        r = v.integer(r, "r", 1, v.INT_MAX)  # checked before r * in_features is allocated
        if not (seed is None or isinstance(seed, np.random.Generator)):
            v.seed(seed)  # the rule of every seed= (NumPy took True, and named no argument)
        if alpha is None and scale is None:
            alpha = float(r)
        bound = 1.0 / np.sqrt(W.shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, in_features)
        A = np.random.default_rng(seed).uniform(-bound, bound, (r, W.shape[1])).astype(W.dtype)
        B = np.zeros((W.shape[0], r), dtype=W.dtype)
        return cls(W, A, B, bias=bias, alpha=alpha, rule=rule, scale=scale)

    # --- shapes ------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def r(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.weight.dtype

    # --- compute -----------------------------------------------------------------------------
    def forward(self, x: Any, *, cache: bool = True) -> np.ndarray:
        """The layer's output for x (..., in_features).

        Unmerged: the fused forward, and (with ``cache=True``) x and ``x @ lora_A.T`` are kept
        for :meth:`backward` (a reference to x, not a copy: do not modify x in between).
        Merged: ``x @ weight.T + bias`` with the merged weight, no LoRA term.

        A packed layer (``copy=True``, ``weight`` and ``lora_A`` not rebound since) returns the
        first out_features columns of an (..., out_features + r) buffer whose last r columns
        hold ``x @ lora_A.T``: a view with strided rows, not a C-contiguous array.
        """
        cache = v.flag(cache, "cache")
        if self.merged:
            empty_A = self.lora_A[:0]
            y: np.ndarray = lora_linear(x, self.weight, empty_A, self.lora_B[:, :0], scale=0.0, bias=self.bias)
            self._cache = (np.asarray(x), None) if cache else None
            return y
        if self._is_packed():
            y, xa = self._packed_forward(x)
        else:
            y, xa = lora_linear(x, self.weight, self.lora_A, self.lora_B, scale=self.scaling,
                                bias=self.bias, return_xa=True)
        self._cache = (np.asarray(x), xa) if cache else None
        return y

    __call__ = forward

    def _is_packed(self) -> bool:
        # Rebinding weight or lora_A (layer.lora_A = new) leaves the buffer stale: unpacked then.
        return (self._packed is not None and self.weight is self._packed_views[0]
                and self.lora_A is self._packed_views[1])

    def _packed_forward(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        d_out, r = self.out_features, self.r
        assert self._packed is not None
        bias = None
        if self.bias is not None:  # the shrink columns start at 0 (built per call: bias may change)
            bias = np.zeros(d_out + r, dtype=self.dtype)
            bias[:d_out] = self.bias
        # [y | xa] = x @ [W; A].T (+ [bias | 0]): one GEMM; lora_linear validates x.
        z: np.ndarray = lora_linear(x, self._packed, self._packed[:0], np.empty((d_out + r, 0), self.dtype),
                        scale=0.0, bias=bias)
        z2 = z.reshape(-1, d_out + r)  # a view: z is fresh and C-contiguous
        # y += s xa B^T, a GEMM with beta = 1 ("W += s B A" with W = y, B = xa, A = lora_B^T);
        # y and xa are disjoint column blocks of z.
        _core.merge(z2[:, :d_out], v.aligned(self.lora_B.T), z2[:, d_out:], self.scaling)
        return z[..., :d_out], z[..., d_out:]

    def backward(self, dy: Any, *, need: str | Iterable[str] = ("x", "A", "B")) -> LoRAGrads:
        """Gradients for the last :meth:`forward`'s input: ``LoRAGrads(dx, lora_A, lora_B)``.

        ``need`` picks among "x", "A", "B" (see :func:`rslora.lora_linear_backward`). While
        merged only dx is available (the adapter is folded into the weight).
        """
        wanted = _parse_need(need)
        if self._cache is None:
            raise RuntimeError("backward() needs a forward(x) first (with cache=True)")
        x, xa = self._cache
        if self.merged:
            if wanted - {"x"}:
                raise RuntimeError("the layer is merged: unmerge() to get adapter gradients")
            dx, _, _ = lora_linear_backward(dy, x, self.weight, self.lora_A[:0],
                                            self.lora_B[:, :0], scale=0.0, need=("x",))
            return LoRAGrads(dx, None, None)
        return LoRAGrads(*lora_linear_backward(dy, x, self.weight, self.lora_A, self.lora_B,
                                               scale=self.scaling, need=need, xa=xa))

    def get_delta_weight(self) -> np.ndarray:
        """``scaling * lora_B @ lora_A`` (out_features, in_features), a new array."""
        delta = np.zeros_like(self.weight)
        merge(delta, self.lora_A, self.lora_B, scale=self.scaling)
        return delta

    def merge(self) -> "LoRALinear":
        """Fold the adapter into the weight in place (``weight += scaling * B @ A``)."""
        if self.merged:
            raise RuntimeError("the layer is already merged")
        merge(self.weight, self.lora_A, self.lora_B, scale=self.scaling)
        self.merged = True
        self._cache = None
        return self

    def unmerge(self) -> "LoRALinear":
        """Undo :meth:`merge` (``weight -= scaling * B @ A``, exact up to float rounding)."""
        if not self.merged:
            raise RuntimeError("the layer is not merged")
        unmerge(self.weight, self.lora_A, self.lora_B, scale=self.scaling)
        self.merged = False
        self._cache = None
        return self

    # --- arrays in and out -------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the arrays under PEFT's key names (``base_layer.weight``, ``lora_A.weight``,
        ``lora_B.weight``, ``base_layer.bias``). The base weight is given unmerged."""
        W = self.weight.copy()
        if self.merged:
            unmerge(W, self.lora_A, self.lora_B, scale=self.scaling)
        d = {"base_layer.weight": W, "lora_A.weight": self.lora_A.copy(),
             "lora_B.weight": self.lora_B.copy()}
        if self.bias is not None:
            d["base_layer.bias"] = self.bias.copy()
        return d

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, alpha: float | None = None,
                        rule: str = "rslora", scale: float | None = None) -> LoRALinear:
        """The inverse of :meth:`state_dict` (keys as PEFT names them)."""
        return cls(state["base_layer.weight"], state["lora_A.weight"], state["lora_B.weight"],
                   bias=state.get("base_layer.bias"), alpha=alpha, rule=rule, scale=scale)

    def __repr__(self) -> str:
        how = (f"alpha={self.lora_alpha!r}, rule={self.rule!r}" if self.lora_alpha is not None
               else "scale given")
        return (f"LoRALinear(in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r}, {how}, scaling={self.scaling!r}, bias={self.bias is not None}, "
                f"dtype={self.dtype}, merged={self.merged})")
