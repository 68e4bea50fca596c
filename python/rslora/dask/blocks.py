"""Block tasks and tree reductions over the row blocks of a tall dask array (rslora.dask.rsvd).

Every reduction sums its parts in a fixed binary tree over the block index, so the result does
not depend on the number of workers or the order in which tasks finish. Sums of squares and Gram
matrices are accumulated in float64.
"""

from __future__ import annotations

from dask.delayed import delayed
import numpy as np

_delayed = delayed(pure=True)


def add(a, b):
    """a + b, quietly: a first pass that overflowed is redone with a scale, not reported."""
    with np.errstate(all="ignore"):
        return a + b


def tree(parts, op=add):
    """``op`` over the delayed ``parts``, pairwise in a fixed binary tree (deterministic order)."""
    parts = list(parts)
    while len(parts) > 1:
        nxt = [_delayed(op)(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            nxt.append(parts[-1])
        parts = nxt
    return parts[0]


def _fro2(X: np.ndarray) -> float:
    """||X||_F^2 in float64, a slice of rows at a time (no full float64 copy)."""
    total = 0.0
    for i in range(0, X.shape[0], 2048):
        a = X[i:i + 2048].astype(np.float64)
        total += float(np.einsum("ij,ij->", a, a))
    return total


def power_block(Xb, Z, scale: float, stats: bool):
    """One block's share of a pass: Y = X_b Z, X_b^T Y and Y^T Y (one read of X_b).

    ``scale`` (a power of 2, exact) brings entries far from 1 into the range where the products
    neither overflow nor underflow. With ``stats``, also (max |X_b|, ||X_b||_F^2)."""
    Xb = np.asarray(Xb)
    if scale != 1.0:
        Xb = Xb * Xb.dtype.type(scale)
    # The first pass runs before the scale is known: its results are discarded on overflow.
    with np.errstate(all="ignore"):
        Y = Xb @ Z
        W = (Xb.T @ Y).astype(np.float64)
        Y64 = Y.astype(np.float64)
        G = Y64.T @ Y64
    st = None
    if stats:
        amax = float(np.max(np.abs(Xb))) if Xb.size else 0.0
        st = np.array([amax, _fro2(Xb) if np.isfinite(amax) else np.nan])
    return Y, W, G, st


def merge_stats(a, b):
    """(max |X|, ||X||_F^2) of two parts: NaN anywhere stays NaN."""
    return np.array([np.nan if np.isnan(a[0]) or np.isnan(b[0]) else max(a[0], b[0]), add(a[1], b[1])])


def xt_block(Xb, Qb, scale: float):
    """X_b^T Q_b in float64 (the extra pass of the tsqr fallback)."""
    Xb = np.asarray(Xb)
    if scale != 1.0:
        Xb = Xb * Xb.dtype.type(scale)
    return (Xb.T @ Qb).astype(np.float64)


def times(Yb, Mat, dtype):
    """Y_b @ Mat computed in float64 (Mat small, from the client), rounded to ``dtype``."""
    return (Yb.astype(np.float64) @ Mat).astype(dtype)


def gram(Yb):
    Y64 = Yb.astype(np.float64)
    return Y64.T @ Y64


def qr_block(Yb):
    """Householder QR of one block: (Q_b, R_b), R_b has min(rows, cols) rows."""
    return np.linalg.qr(Yb)


def col_absmax(Ub):
    """Per column: max |U_b| and the signed entry where it first occurs."""
    if Ub.shape[0] == 0:
        return np.zeros(Ub.shape[1]), np.zeros(Ub.shape[1])
    idx = np.argmax(np.abs(Ub), axis=0)
    val = Ub[idx, np.arange(Ub.shape[1])].astype(np.float64)
    return np.abs(val), val


def gram_block(Xb, scale: float, step: int):
    """X_b^T X_b in float64 (the Gram route's one read), and max |X_b|.

    Rows are widened to float64 ``step`` at a time (no full float64 copy of the block); ``A.T @
    A`` of one array is a syrk in NumPy (half the flops of a GEMM). For float32 data the products
    are exact in float64: only the sums round. ``scale`` is a power of 2 (exact)."""
    Xb = np.asarray(Xb)
    p = Xb.shape[1]
    G = np.zeros((p, p))
    amax = float(np.max(np.abs(Xb))) if Xb.size else 0.0
    if not np.isfinite(amax):
        return G, amax
    with np.errstate(all="ignore"):
        for i in range(0, Xb.shape[0], step):
            a = Xb[i:i + step].astype(np.float64)
            if scale != 1.0:
                a *= scale
            G += a.T @ a
    return G, amax


def merge_gram(a, b):
    """(G, max |X|) of two parts: a NaN max stays NaN."""
    amax = np.nan if np.isnan(a[1]) or np.isnan(b[1]) else max(a[1], b[1])
    return add(a[0], b[0]), amax


def times_block(Xb, Z, scale: float, step: int):
    """Y_b = X_b Z and Y_b^T Y_b in float64 (the Gram route's last read: M^T Y is G Z). A
    float64 ``Z`` makes the product in float64 (``step`` rows at a time), Y in float64."""
    Xb = np.asarray(Xb)
    if Z.dtype == Xb.dtype:
        if scale != 1.0:
            Xb = Xb * Xb.dtype.type(scale)
        Y = Xb @ Z
        return Y, gram(Y)
    Y = np.empty((Xb.shape[0], Z.shape[1]))
    for i in range(0, Xb.shape[0], step):
        Y[i:i + step] = (Xb[i:i + step].astype(np.float64) * scale) @ Z
    return Y, gram(Y)
