"""Shared helpers for the tests (import as ``from testutil import tol``)."""

import numpy as np


def tol(dtype) -> float:
    """Relative tolerance for a result computed in dtype against a float64 reference."""
    return 2e-5 if np.dtype(dtype) == np.float32 else 1e-12


def make(m, n, s, dtype, seed=0):
    """U diag(s) V^T with Haar-like orthonormal U (m x len(s)), V (n x len(s))."""
    rng = np.random.default_rng(seed)
    r = len(s)
    U = np.linalg.qr(rng.standard_normal((m, r)))[0]
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    return ((U * s) @ V.T).astype(dtype)


def style(r):
    """The "style" spectrum: s_i = exp(-i/8)."""
    return np.exp(-np.arange(r) / 8.0)
