"""Shared helpers for the tests (import as ``from testutil import tol``)."""

import numpy as np


def tol(dtype) -> float:
    """Relative tolerance for a result computed in dtype against a float64 reference."""
    return 2e-5 if np.dtype(dtype) == np.float32 else 1e-12
