"""Synthetic weight updates and regression data for studying LoRA (what ``rslora study`` uses).

Two generative models of a fine-tuning update ``delta (d_out, d_in)``, both
``delta = U diag(S) V^T`` with Haar-random orthonormal ``U``, ``V`` and a chosen spectrum ``S``,
scaled to a given Frobenius norm:

* **style** (:func:`style_delta`): ``S_i ∝ exp(-i / tau)``. The energy sits in a few directions
  (with the default ``tau = 6``, 90% of ``||delta||_F^2`` lies in the top 7 singular directions),
  like an update that changes tone or format.
* **facts** (:func:`facts_delta`): ``S_i ∝ (1 + i) ** -power``. With the default ``power = 0.5``
  the energy ``S_i^2 ∝ 1 / (1 + i)`` is a harmonic series: a long tail, so every extra rank keeps
  adding a little (about half the singular directions are needed for 90% of the energy), like an
  update that stores many unrelated facts.

Because the singular values are set, not measured, the best rank-r error (Eckart–Young) is known
exactly: ``sqrt(sum(S[r:] ** 2)) / ||S||``.

:func:`regression_batch` draws inputs ``x ~ N(0, I)`` and targets ``y = x @ delta.T``; for such
inputs the expected squared error of a linear map ``M`` is ``||M - delta||_F^2`` per sample, so a
LoRA fit to these batches learns ``delta`` itself. :func:`lora_init` gives PEFT's initial
adapter (``A`` like ``nn.Linear``'s Kaiming-uniform init, ``B = 0``).

Every function takes ``seed`` (an int, a ``numpy.random.Generator`` or None) and is reproducible
for a fixed int seed.
"""

from __future__ import annotations

import math

import numpy as np

from .._validation import integer, number

__all__ = [
    "style_spectrum",
    "facts_spectrum",
    "random_orthonormal",
    "delta_from_spectrum",
    "style_delta",
    "facts_delta",
    "regression_batch",
    "lora_init",
]


def _dim(value, name: str, minimum: int = 1) -> int:
    return integer(value, name, minimum)


def _positive(value, name: str) -> float:
    value = number(value, name)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def _dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _normalized(S: np.ndarray, norm: float) -> np.ndarray:
    return S * (norm / math.sqrt(float(np.sum(S * S))))


def style_spectrum(k: int, *, tau: float = 6.0, norm: float = 1.0) -> np.ndarray:
    """Singular values ``S_i ∝ exp(-i / tau)``, ``i = 0..k-1``, scaled so ``||S||_2 = norm``.

    Returns a float64 array of shape (k,), descending.
    """
    k = _dim(k, "k")
    tau = _positive(tau, "tau")
    norm = _positive(norm, "norm")
    return _normalized(np.exp(-np.arange(k, dtype=np.float64) / tau), norm)


def facts_spectrum(k: int, *, power: float = 0.5, norm: float = 1.0) -> np.ndarray:
    """Singular values ``S_i ∝ (1 + i) ** -power``, ``i = 0..k-1``, scaled so ``||S||_2 = norm``.

    Returns a float64 array of shape (k,), descending.
    """
    k = _dim(k, "k")
    power = _positive(power, "power")
    norm = _positive(norm, "norm")
    return _normalized((1.0 + np.arange(k, dtype=np.float64)) ** -power, norm)


def random_orthonormal(m: int, k: int, *, seed=None, dtype=np.float64) -> np.ndarray:
    """An ``(m, k)`` matrix with orthonormal columns, Haar-distributed (k <= m).

    The Q factor of a Gaussian matrix with the signs of R's diagonal moved into Q (without that
    correction the distribution is not uniform).
    """
    m = _dim(m, "m")
    k = _dim(k, "k")
    if k > m:
        raise ValueError(f"k must be <= m for orthonormal columns, got m={m}, k={k}")
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((m, k)))
    q *= np.where(np.diag(r) < 0, -1.0, 1.0)
    return q.astype(_dtype(dtype), copy=False)


def delta_from_spectrum(S, d_out: int, d_in: int, *, seed=None, dtype=np.float64,
                        return_svd: bool = False):
    """``U diag(S) V^T`` with Haar-random orthonormal ``U (d_out, k)`` and ``V (d_in, k)``.

    Parameters
    ----------
    S : array_like, shape (k,)
        Singular values, non-negative (used as given, not sorted), ``k <= min(d_out, d_in)``.
    d_out, d_in : int
    seed : int, numpy.random.Generator or None
    dtype : float32 or float64
        Of the result; the product is formed in float64 and rounded once.
    return_svd : bool
        Also return the factors.

    Returns
    -------
    delta : ndarray, shape (d_out, d_in)
    U, S, Vt : ndarrays, shapes (d_out, k), (k,), (k, d_in)
        Only with ``return_svd=True``; float64.
    """
    d_out = _dim(d_out, "d_out")
    d_in = _dim(d_in, "d_in")
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 1:
        raise ValueError(f"S must be 1-D, got shape {S.shape}")
    if S.shape[0] > min(d_out, d_in):
        raise ValueError(f"S has {S.shape[0]} values but min(d_out, d_in) = {min(d_out, d_in)}")
    if not np.all(np.isfinite(S)) or np.any(S < 0):
        raise ValueError("S must be finite and non-negative")
    dt = _dtype(dtype)
    rng = np.random.default_rng(seed)
    k = S.shape[0]
    U = random_orthonormal(d_out, max(k, 1), seed=rng)[:, :k]
    V = random_orthonormal(d_in, max(k, 1), seed=rng)[:, :k]
    delta = ((U * S) @ V.T).astype(dt, copy=False)
    return (delta, U, S.copy(), np.ascontiguousarray(V.T)) if return_svd else delta


def style_delta(d_out: int, d_in: int, *, tau: float = 6.0, norm: float = 1.0, seed=None,
                dtype=np.float64, return_svd: bool = False):
    """A "style" update: a few strong directions, ``S_i ∝ exp(-i / tau)``, ``||delta||_F = norm``.

    Full rank ``min(d_out, d_in)``; the share of energy in the top r directions is
    ``(1 - q**r) / (1 - q**k)`` with ``q = exp(-2 / tau)``. Other arguments as in
    :func:`delta_from_spectrum`.
    """
    S = style_spectrum(min(_dim(d_out, "d_out"), _dim(d_in, "d_in")), tau=tau, norm=norm)
    return delta_from_spectrum(S, d_out, d_in, seed=seed, dtype=dtype, return_svd=return_svd)


def facts_delta(d_out: int, d_in: int, *, power: float = 0.5, norm: float = 1.0, seed=None,
                dtype=np.float64, return_svd: bool = False):
    """A "facts" update: a long tail, ``S_i ∝ (1 + i) ** -power``, ``||delta||_F = norm``.

    With ``power = 0.5`` the top r directions hold ``H_r / H_k`` of the energy (harmonic numbers,
    k = min(d_out, d_in)). Other arguments as in :func:`delta_from_spectrum`.
    """
    S = facts_spectrum(min(_dim(d_out, "d_out"), _dim(d_in, "d_in")), power=power, norm=norm)
    return delta_from_spectrum(S, d_out, d_in, seed=seed, dtype=dtype, return_svd=return_svd)


def regression_batch(delta, n: int, *, seed=None):
    """Inputs ``x ~ N(0, I_{d_in})`` and targets ``y = x @ delta.T``, in ``delta``'s dtype.

    For such inputs ``E ||x @ M.T - y||^2 = ||M - delta||_F^2``: the population loss of any
    linear map is its Frobenius distance to ``delta``.

    Returns
    -------
    x : ndarray, shape (n, d_in)
    y : ndarray, shape (n, d_out)
    """
    delta = np.asarray(delta)
    if delta.ndim != 2:
        raise ValueError(f"delta must be 2-D (d_out, d_in), got shape {delta.shape}")
    dt = _dtype(delta.dtype)
    n = _dim(n, "n", 0)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, delta.shape[1]), dtype=dt)
    return x, x @ delta.T


def lora_init(d_out: int, d_in: int, r: int, *, seed=None, dtype=np.float64):
    """PEFT's initial adapter: ``A`` Kaiming-uniform (as ``nn.Linear``), ``B = 0``.

    ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))`` entrywise: PEFT calls
    ``nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))``, whose bound is
    ``sqrt(6 / ((1 + a^2) d_in)) = 1 / sqrt(d_in)``; so ``E[A.T @ A] = r / (3 d_in) I``.

    Returns
    -------
    A : ndarray, shape (r, d_in)
    B : ndarray, shape (d_out, r), zeros
    """
    d_out = _dim(d_out, "d_out")
    d_in = _dim(d_in, "d_in")
    r = _dim(r, "r", 0)
    dt = _dtype(dtype)
    bound = 1.0 / math.sqrt(d_in)
    A = np.random.default_rng(seed).uniform(-bound, bound, (r, d_in)).astype(dt, copy=False)
    return A, np.zeros((d_out, r), dtype=dt)
