"""LoRA factors from a weight delta, and the singular-value spectrum of a delta.

PEFT shapes: ``delta (d_out, d_in)`` (= fine-tuned W - base W), ``A (r, d_in)`` (lora_A),
``B (d_out, r)`` (lora_B), and the adapter adds ``s * B @ A``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from . import _backend, _core
from . import _validation as v
from .scaling import resolve
from .svd import rsvd, rsvd_tol

__all__ = ["lora_from_delta", "spectrum", "Spectrum"]


def _converged(n_iter: int | str, shape: tuple[int, ...], k: int) -> int | str:
    """"auto" here means the fixed iteration count that converges the vectors and singular
    values themselves (5 subspace iterations; these functions promise the best rank-k factors),
    not rsvd's adaptive stop at the 1.001x Frobenius contract."""
    if n_iter == "auto" and len(shape) == 2 and _is_int(k) and 1 <= k <= min(shape):
        return _core.rsvd_auto_iters("subspace", shape[0], shape[1], int(k), 10)
    return n_iter


def _is_int(value: object) -> bool:
    """An integer rank the range checks can read (anything else: rsvd names it)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def lora_from_delta(delta: Any, r: int | None = None, *, tol: float | None = None,
                    max_rank: int | None = None, alpha: float | None = None,
                    scale: float | None = None, rule: str = "rslora",
                    seed: int | np.random.Generator | None = None,
                    n_iter: int | str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """LoRA factors ``(A, B)`` whose scaled product is the best rank-r approximation of ``delta``.

    Parameters
    ----------
    delta : array_like, shape (d_out, d_in)
        The weight update, float32 or float64.
    r : int, optional
        The adapter rank. Give exactly one of ``r`` and ``tol``.
    tol : float, optional
        Choose the smallest rank whose relative Frobenius error ``||delta - s B A||_F /
        ||delta||_F`` is at most ``tol`` (see :func:`rslora.rsvd_tol`), up to ``max_rank``.
    max_rank : int, optional
        Cap on the rank found with ``tol`` (default ``min(d_out, d_in)``).
    alpha, scale, rule
        The adapter's scale s: ``scale=`` as given, or ``alpha=`` with ``rule`` ("rslora":
        ``alpha / sqrt(r)``, "standard": ``alpha / r``). With neither, s = 1.
    seed : int, numpy.random.Generator or None
        As in :func:`rslora.rsvd`.
    n_iter : int or "auto"
        Passed to :func:`rslora.rsvd` (with ``r``) or :func:`rslora.rsvd_tol` (with ``tol``;
        "auto" means its default).

    Returns
    -------
    A : ndarray, shape (r, d_in)
    B : ndarray, shape (d_out, r)
        In ``delta``'s dtype. With ``delta ~ U diag(S) Vt``: ``A = sqrt(S / |s|)[:, None] * Vt``
        and ``B = sign(s) * U * sqrt(S / |s|)``, so ``s * B @ A = U diag(S) Vt`` and the
        singular values are split evenly (``A @ A.T`` and ``B.T @ B`` are the same diagonal
        matrix). A zero delta with ``tol`` gives r = 0 (empty factors).
    """
    if (r is None) == (tol is None):
        raise ValueError("give exactly one of r= (a rank) and tol= (a relative error)")
    _backend.host_only("lora_from_delta", delta=delta)
    delta = v.host_matrix(delta, "delta")  # named as the delta and the rank, not as rsvd's M, k
    if r is not None:
        if max_rank is not None:
            raise ValueError("max_rank= goes with tol=, not with r=")
        v.rank(r, "r", delta.shape, of="delta", dims="d_out, d_in")
        U, S, Vt = rsvd(delta, r, n_iter=_converged(n_iter, delta.shape, r), seed=seed)
    else:
        assert tol is not None
        q = 2 if n_iter == "auto" else n_iter  # rsvd_tol's default
        U, S, Vt, _ = rsvd_tol(delta, tol, max_rank=max_rank, seed=seed, n_iter=q)  # type: ignore[arg-type]
    rank = S.shape[0]
    s = 1.0 if scale is None and alpha is None else resolve(scale, alpha, rule, rank)
    if s == 0.0 and rank > 0:
        raise ValueError("the scale is 0: no factors can reproduce a nonzero delta")
    # sqrt(S) / sqrt|s|, not sqrt(S / |s|): the quotient alone can overflow float64
    root = np.sqrt(S.astype(np.float64)) / np.sqrt(abs(s)) if rank else np.zeros(0)
    if rank and root[0] > np.finfo(S.dtype).max:  # |entries| <= root (unit singular vectors)
        raise ValueError(f"scale {s:g} is too small for this delta: the factors would overflow "
                         f"{S.dtype} (sqrt(S[0] / |scale|) = {root[0]:.3g})")
    A = (root[:, None] * Vt).astype(S.dtype, copy=False)
    B = (U * (np.copysign(root, s) if rank else root)).astype(S.dtype, copy=False)
    return A, B


class Spectrum:
    """Singular values of a matrix and how its energy ``||M||_F^2`` is spread over them.

    Attributes
    ----------
    singular_values : ndarray, shape (k,)
        Descending, in ``M``'s dtype.
    total_energy : float
        ``||M||_F^2``, summed exactly in float64 from ``M`` itself (not from the k values).
    energy : ndarray, shape (k,), float64
        ``energy[i]`` = share of ``total_energy`` held by the first ``i + 1`` singular values.
    """

    def __init__(self, singular_values: np.ndarray, total_energy: float, complete: bool, *,
                 exponent: int = 0, dtype: Any = None) -> None:
        """Values and total energy of ``M * 2**exponent`` (see :func:`_pow2_exponent`)."""
        dtype = np.dtype(dtype or singular_values.dtype)
        scaled = singular_values.astype(np.float64)
        with np.errstate(over="ignore", under="ignore"):
            true = np.ldexp(scaled, -exponent)
        if true.size and true.max() > np.finfo(dtype).max:
            raise v.singular_overflow(dtype.name, math.log10(scaled.max()) - exponent * math.log10(2))
        self.singular_values = true.astype(dtype)
        with np.errstate(over="ignore", under="ignore"):  # inf/0 when float64 cannot hold it
            self.total_energy = float(np.ldexp(total_energy, -2 * exponent))
        self._scaled_total = total_energy
        self.complete = complete  # all min(m, n) values known (k=None)
        sq = np.cumsum(np.square(scaled))  # shares from the scaled values: no over/underflow
        if not np.isfinite(total_energy):  # M held NaN/Inf (check_finite=False): no shares
            self.energy = np.full_like(sq, np.nan)
        else:
            self.energy = sq / total_energy if total_energy > 0 else np.ones_like(sq)

    def __len__(self) -> int:
        return int(self.singular_values.shape[0])

    def __repr__(self) -> str:
        k = len(self)
        held = f"{self.energy[-1]:.6g}" if k else "0"
        return f"Spectrum(k={k}, total_energy={self.total_energy:.6g}, energy held={held})"

    def rank_for(self, share: float) -> int:
        """The smallest rank r whose first r singular values hold at least ``share`` of the energy.

        ``share`` in (0, 1]. The comparison allows the rounding of the singular values
        (a relative 8 eps of their dtype), so ``rank_for(1.0)`` is the numerical rank. Raises
        ``ValueError`` when the k values computed do not reach ``share`` (ask for a larger k).
        """
        share = v.real(share, "share")
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {share}")
        if not np.isfinite(self._scaled_total):
            raise ValueError("the spectrum is NaN: M holds NaN or Inf (it was computed with "
                             "check_finite=False)")
        if self._scaled_total == 0:
            return 0
        eps = np.finfo(self.singular_values.dtype).eps
        need = share * (1.0 - 8 * eps)
        r = int(np.searchsorted(self.energy, need, side="left")) + 1
        if r > len(self):
            if self.complete:  # rounding kept the sum just under; all values are needed
                return len(self)
            raise ValueError(f"share {share} needs more than the k={len(self)} singular values "
                             f"computed (they hold {self.energy[-1]:.6g}); call spectrum with a "
                             "larger k")
        return r


def spectrum(M: Any, k: int | None = None, *, seed: int | np.random.Generator | None = None,
             check_finite: bool = True) -> Spectrum:
    """The singular-value spectrum of ``M`` and its cumulative energy.

    Parameters
    ----------
    M : array_like, shape (m, n)
        float32 or float64.
    k : int, optional
        Compute only the k largest singular values with :func:`rslora.rsvd` (default settings).
        None: all ``min(m, n)`` of them, exactly (LAPACK, no vectors).
    seed : int, numpy.random.Generator or None
        For the randomized path.
    check_finite : bool
        Raise ``ValueError`` when ``M`` holds NaN or Inf.

    Returns
    -------
    Spectrum
        ``.singular_values``, ``.energy`` (cumulative share of ``||M||_F^2``; the total is
        exact, from ``M``), ``.rank_for(share)``, ``.total_energy``.
    """
    _backend.host_only("spectrum", M=M)
    check_finite = v.flag(check_finite, "check_finite")
    M = v.host_matrix(M, "M", check_finite and k is None)  # rsvd checks in its first pass
    e = _pow2_exponent(M)
    Ms = np.ldexp(M, e) if e else M  # exact: only exponents change
    total = float(np.einsum("ij,ij->", Ms, Ms, dtype=np.float64)) if M.size else 0.0
    if k is None and not np.isfinite(total):  # NaN/Inf in M (check_finite=False): NaN values,
        s = np.full(min(M.shape), np.nan, M.dtype)  # as rsvd gives (LAPACK would raise instead)
    elif k is None:
        s = np.linalg.svd(Ms, compute_uv=False) if M.size else np.zeros(0, M.dtype)
        s = s.astype(M.dtype, copy=False)
    else:
        k = v.integer(k, "k")
        _, s, _ = rsvd(M, k, n_iter=_converged("auto", M.shape, k), seed=seed,
                       check_finite=check_finite)  # scales on its own
        s = np.ldexp(s.astype(np.float64), e)
    return Spectrum(s, total, k is None or k == min(M.shape), exponent=e, dtype=M.dtype)


def _pow2_exponent(M: np.ndarray) -> int:
    """e such that the squares summed for ``M * 2**e`` neither overflow nor underflow (0 when
    M is already safe, is zero, or holds NaN/Inf). The same window as the core's rsvd uses."""
    if not M.size:
        return 0
    amax = float(np.max(np.abs(M)))
    if amax == 0 or not np.isfinite(amax):
        return 0
    fi = np.finfo(M.dtype)
    m, n = M.shape
    size = np.sqrt(float(m) * n * max(m, n))
    if np.ldexp(1.0, fi.minexp // 2 + 4) <= amax <= np.ldexp(1.0, fi.maxexp // 2 - 8) / size:
        return 0
    return 1 - int(np.frexp(amax)[1])  # max|M * 2**e| in [1, 2)
