"""Fixed-accuracy truncated SVD of a dask array: :func:`rsvd_tol`, from the Gram matrix.

The eigenvalues of the float64 Gram M^T M (one read) give every rank's optimum error at once:
the smallest rank whose result provably meets the tolerance (rslora.dask.gram's bound: the
Gram's rounding and the last read's) is chosen on the client, and one more read makes U. Two
reads whatever the rank, against one read per block of columns (and per power iteration) for
the blocked QB of :func:`rslora.rsvd_tol`.
"""

from __future__ import annotations

import math

from dask.base import compute
from dask.delayed import delayed
import dask.array as da
import numpy as np

from .. import _validation as v
from ..svd import RsvdTolResult
from . import blocks, gram
from .rsvd import _LAST_RUN, _unscale, check_array, gram_finish, gram_pass, orient, tall

__all__ = ["rsvd_tol"]

_delayed = delayed(pure=True)


def rsvd_tol(M, tol, *, max_rank=None, block=None, n_iter=2, seed=None, check_finite=True):
    """The smallest-rank truncated SVD of a dask array whose relative Frobenius error is at
    most ``tol``.

    The contract and arguments of :func:`rslora.rsvd_tol`, for an ``M`` that lives in chunks.
    The rank comes from the eigenvalues of the float64 Gram of ``M``'s short side (formed in
    one read, summed in a fixed tree, eigendecomposed on the client): the smallest rank whose
    error bound (optimum tail energy plus the Gram's rounding plus the last read's) is within
    ``tol``; one more read makes ``U``. Results are deterministic (no random sketch), the same
    for the same chunking whatever the number of workers.

    Parameters
    ----------
    M : dask.array.Array, shape (m, n)
        float32 or float64, chunked along its long side; the short side p (at most 8192) makes
        a p x p float64 matrix on the client.
    tol : float
        Relative Frobenius tolerance, ``0 < tol < 1``.
    max_rank : int, optional
        Largest rank to return (default ``min(m, n)``). When even this rank misses ``tol`` the
        rank-``max_rank`` result is returned and its ``error`` exceeds ``tol``: check it.
    block, n_iter, seed
        Checked as in :func:`rslora.rsvd_tol` and otherwise unused: they shape its blocked QB,
        which this Gram route does not need.
    check_finite : bool
        Raise ``ValueError`` naming NaN/Inf in ``M``; with ``False`` a non-finite ``M`` still
        gives a ``ValueError`` (the error needs a finite ``||M||_F``).

    Returns
    -------
    RsvdTolResult
        ``(U, S, Vt, error)``: dask arrays ``U`` (m, r) chunked like ``M``'s rows, ``S`` (r,),
        ``Vt`` (r, n) chunked like its columns, in ``M``'s dtype, and ``error = ||M - U diag(S)
        Vt||_F / ||M||_F`` as a Python float (from the Gram: ``||M||_F^2 - sum S^2``; computed
        from the residual in one more read when that difference is within 100 u ``||M||_F^2``).
        A zero ``M`` gives ``r = 0`` and ``error = 0``.

    Raises
    ------
    ValueError
        Besides the argument checks: when ``tol`` is below what the Gram can resolve (about
        ``sqrt(m u64)``, or the working precision of float32 data) while ``max_rank`` could
        still reach it; compute in float64 or ask a larger ``tol``.
    """
    check_array(M, "rslora.rsvd_tol")
    tol = v.open_unit(tol, "tol")
    if min(M.shape) == 0:
        raise ValueError(f"M has shape {M.shape}: nothing to approximate")
    rank = min(M.shape) if max_rank is None else v.rank(max_rank, "max_rank", M.shape)
    if block is not None:
        v.integer(block, "block", 1)
    v.integer(n_iter, "n_iter", 0, v.INT_MAX)
    check_finite = v.flag(check_finite, "check_finite")
    v.seed(seed)
    X, wide = tall(M)
    p = X.shape[1]
    if p > gram.MAX_SIDE:
        raise ValueError(f"rslora.dask.rsvd_tol forms the Gram of M's short side, {p} > "
                         f"{gram.MAX_SIDE}: too large for the client (use rslora.dask.rsvd)")
    _LAST_RUN.clear()
    parts, rows, G, amax, scale = gram_pass(X)
    dtype = M.dtype
    if not math.isfinite(amax):
        if check_finite:
            raise ValueError("M contains NaN or Inf (pass check_finite=False to skip this check)")
        raise ValueError("||M||_F is not finite: rsvd_tol needs a finite M")
    if amax == 0.0:
        z = np.zeros((0,), dtype)
        U = da.zeros((M.shape[0], 0), chunks=(M.chunks[0], 0), dtype=dtype)
        Vt = da.zeros((0, M.shape[1]), chunks=(0, M.chunks[1]), dtype=dtype)
        _LAST_RUN.update(route="gram", rank=0)
        return RsvdTolResult(U, da.from_array(z, chunks=1), Vt, 0.0)
    spec = gram.Spectrum(G, rows, dtype)
    r, exact, beyond = spec.rank_for(tol, rank)
    if r is None:
        if not (beyond and spec.resolved(rank)):
            name = np.dtype(dtype).name
            raise ValueError(f"tol={tol:g} is below what the float64 Gram of this {name} M "
                             f"resolves (its eigenvalues carry errors of ~{spec.delta:.2g}, "
                             f"||M||_F^2 = {spec.trace:.3g}): ask a larger tol"
                             + ("" if dtype == np.float64 else " or compute in float64"))
        r = rank
    U, S, Vt = gram_finish(parts, rows, G, spec, r, scale, dtype, exact)  # S of X * scale
    U, Sd, Vt = orient(U, _unscale(S, scale, dtype), Vt, M, wide)
    fro2 = spec.trace  # of X * scale
    left = fro2 - float(np.sum(S.astype(np.float64) ** 2))
    if left <= 100 * spec.u * fro2:  # the difference has lost its digits: measure it
        left = _residual2(X, Vt.T if wide else U, Sd, U.T if wide else Vt, scale)
        _LAST_RUN["passes"] += 1
    _LAST_RUN.update(route="gram", rank=r)
    return RsvdTolResult(U, Sd, Vt, math.sqrt(max(left, 0.0) / fro2))


def _residual2(X, U, S, Vt, scale):
    """||X - U diag(S) Vt||_F^2 * scale^2 in float64 (one read; U chunked like X's rows)."""
    SVt = (np.asarray(S.compute(), np.float64)[:, None] * Vt.compute().astype(np.float64))
    SVt_d = delayed(SVt)
    parts = [_delayed(_block_resid2)(x, u, SVt_d, scale)
             for x, u in zip(X.to_delayed()[:, 0], U.rechunk({0: X.chunks[0]}).to_delayed()[:, 0])]
    return float(compute(blocks.tree(parts))[0])


def _block_resid2(Xb, Ub, SVt, scale):
    R = (np.asarray(Xb, np.float64) - Ub.astype(np.float64) @ SVt) * scale
    return float(np.einsum("ij,ij->", R, R))
