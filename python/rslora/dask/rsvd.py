"""Rank-k truncated SVD of a dask array chunked along its long side: :func:`rsvd`.

Two routes. With a short side small enough (rslora.dask.gram: cost model and certificate),
``n_iter="auto"`` first forms M^T M in float64 in one read, takes its eigendecomposition on the
client and makes U in one more read; it returns that only when the eigenvalues prove the
contract. Otherwise (and for a fixed n_iter), subspace iteration:

Subspace iteration on the short side, one read of M per iteration. With M tall (m x n, row
blocks M_b) and Z (n x l) on the client, each pass sends Z to the blocks, which return
Y_b = M_b Z (kept on the workers), M_b^T Y_b and Y_b^T Y_b; the two sums meet in a fixed tree.
On the client (n x l and l x l, float64): Q = Y R^-1 is orthonormal for R^T R = Y^T Y, so the
Ritz values and right vectors of M on range(Y) are the SVD of M^T Q = (M^T Y) R^-1 = V S P^T,
with no further pass; the next Z = V S^-1 makes the next Y nearly orthonormal (its Gram is
well conditioned from the second pass on). q iterations cost q + 1 passes, against 2q + 2 for
the alternating form of rslora.rsvd, and give the same subspace in exact arithmetic.

The last pass ends in CholeskyQR2: R from the summed Gram, U = Y R^-1 P computed per block in
float64, then a second Gram of U and Cholesky to restore orthogonality to working precision.
When the Gram is ill-conditioned (a rank-deficient M, or n_iter=0 on a fast-decaying
spectrum), the fallback is TSQR (Householder QR per block, the R factors stacked and factored
on the client) and one more pass for B^T = M^T Q, as the textbook method does.
"""

from __future__ import annotations

import math

from dask.base import compute, persist
from dask.delayed import delayed
import dask.array as da
import numpy as np

from .. import _core, _validation
from . import blocks, gram

__all__ = ["rsvd"]

_MAX_AUTO_ITERS = 12  # as rslora.rsvd's n_iter="auto"
# Largest condition number of Y for which Y R^-1 and (M^T Y) R^-1 are used; beyond it, TSQR.
_COND_LIMIT = 100.0
# The auto rule compares two iterations' Ritz values only when the earlier Y was this well
# conditioned (the first Y = M Omega is not, on a decaying spectrum: its small Ritz values carry
# errors of ~u cond(Y) ||M||, which would read as convergence).
_COND_RITZ = 16.0
_delayed = delayed(pure=True)
# What the last call in this process did (for tests and benchmarks): the route ("gram" or
# "iterate", and why the Gram route was left when it was), iterations, reads of M, and whether
# the TSQR fallback ran.
_LAST_RUN: dict = {}
# Tests force a route: "gram" (whenever n_iter="auto"; it still falls back when it cannot
# certify) or "iterate"; None lets the cost model choose (rslora.dask.gram).
_FORCE_ROUTE: str | None = None


def _check_args(M, k, oversample, n_iter, seed, auto_tol):
    """The checks of rslora.rsvd (rslora._validation: the same rules and messages), for a dask
    array. Returns (k, oversample, n_iter, seed key, auto_tol)."""
    check_array(M, "rslora.rsvd")
    a = _validation.rsvd_args(M.shape, k, oversample, n_iter, "subspace", "qr", seed, auto_tol)
    return a.k, a.oversample, a.n_iter, _validation.seed(a.seed), a.auto_tol


def check_array(M, twin: str) -> None:
    """M is a 2-D float32/float64 dask array of known shape (the in-memory ``twin``'s messages)."""
    if not isinstance(M, da.Array):
        raise TypeError(f"M must be a dask array, got {type(M).__name__} "
                        f"({twin} takes in-memory arrays)")
    if M.dtype not in (np.float32, np.float64):
        raise TypeError(f"M must be float32 or float64, got {M.dtype}")
    if M.ndim != 2:
        raise ValueError(f"M must be 2-D, got shape {M.shape}")
    if any(math.isnan(s) for s in M.shape):
        raise ValueError(f"M has unknown chunk sizes (shape {M.shape}): call "
                         "M.compute_chunk_sizes() first")


def tall(M):
    """(X, wide): X = M, or M^T when M is wide, with its short side in one chunk."""
    wide = M.shape[0] < M.shape[1]
    X = M.T if wide else M
    if len(X.chunks[1]) > 1:
        X = X.rechunk({1: -1})
    return X, wide


def orient(U, S, Vt, M, wide):
    """The factors of X (tall) as those of M, with rslora.rsvd's sign convention: dask arrays,
    U chunked like M's rows (Vt like its columns when M is wide)."""
    dtype = M.dtype
    k = S.shape[0]
    if wide:  # M = X^T = Vt^T S U^T
        U, Vt = Vt.T.copy(), U.T
        sign = _signs_local(U)
        U = da.from_array(U * sign.astype(dtype), chunks=(M.chunks[0], k))
        (Vt,) = persist(Vt * sign.astype(dtype)[:, None])
    else:
        sign = _signs_blocks(U) if k else np.ones(0)
        (U,) = persist(U * sign.astype(dtype))
        Vt = da.from_array(Vt * sign.astype(dtype)[:, None], chunks=(k, M.chunks[1]))
    return U, da.from_array(S, chunks=max(k, 1)), Vt


def rsvd(M, k, *, oversample=10, n_iter="auto", seed=None, check_finite=True, auto_tol=1e-3):
    """Rank-``k`` truncated SVD of a dask array: from its Gram matrix, or by randomized
    subspace iteration.

    The same contract as :func:`rslora.rsvd` (``method="subspace"``, ``normalizer="qr"``) for
    an ``M`` that lives in chunks, possibly on many machines.

    Parameters
    ----------
    M : dask.array.Array, shape (m, n)
        float32 or float64, chunked along its long side (rows when ``m >= n``, else columns).
        The short side must fit in memory on a worker (``n x l`` per block); a short side split
        in several chunks is rechunked to one.
    k, oversample, seed, check_finite, auto_tol
        As in :func:`rslora.rsvd`. The Gaussian test matrix is drawn on the client from
        ``seed``, and every sum meets in a fixed tree over the blocks: the same seed and chunking
        give bit-identical results whatever the number of workers or the order tasks finish in
        (with the same BLAS thread count per worker).
    n_iter : int or "auto"
        Power (subspace) iterations: the call reads ``M`` ``n_iter + 1`` times (one read per
        iteration: each block computes ``M_b^T (M_b Z)``), against ``2 n_iter + 2`` GEMM passes
        for :func:`rslora.rsvd`, for the same subspace. One more pass is made when the last
        basis is too ill-conditioned for CholeskyQR2 (TSQR fallback: ``n_iter=0``,
        rank-deficient ``M``).

        ``"auto"``: when the short side p is small enough that the float64 Gram ``M^T M`` costs
        less than the iterations would (p up to ~10 l for float32, ~20 l for float64 data; the
        cost model is in :mod:`rslora.dask.gram`), two reads: the Gram (eigendecomposed on the
        client) and ``M V_k S_k^-1``. That result is returned only when the Gram's eigenvalues
        prove it within ``(1 + auto_tol)`` x the Eckart-Young optimum (relative Frobenius error)
        given the Gram's rounding; otherwise (a tail below ~``sqrt(m u64)`` of ``s_1`` in
        float64 data, rank below ``k``, a zero ``M``) and for a larger p, the subspace
        iteration runs until the rule of :func:`rslora.rsvd` says the same bound is met (from
        the Ritz values each pass gives), at most 12 times; 0 when ``l`` spans the short side.

    Returns
    -------
    U : dask.array.Array, shape (m, k)
        Orthonormal columns, chunked like ``M``'s rows (computed and held in the cluster's
        memory, as by ``persist``, when ``M`` is tall).
    S : dask.array.Array, shape (k,)
        Singular values, descending.
    Vt : dask.array.Array, shape (k, n)
        Orthonormal rows, chunked like ``M``'s columns.

    Same dtype as ``M``; the sign convention of :func:`rslora.rsvd` (the largest-magnitude entry
    of each column of ``U`` is positive). The work runs on the default scheduler (a
    ``distributed.Client`` when one is active): give each worker thread one BLAS thread.
    """
    check_finite = _validation.flag(check_finite, "check_finite")
    k, oversample, n_iter, seed, auto_tol = _check_args(M, k, oversample, n_iter, seed, auto_tol)
    m, n = M.shape
    X, wide = tall(M)
    p = X.shape[1]
    l = p if oversample >= p - k else k + oversample
    if n_iter == -1 and _core.rsvd_auto_iters("subspace", m, n, k, oversample) == 0:
        n_iter = 0
    _LAST_RUN.clear()
    route = _FORCE_ROUTE or ("gram" if gram.worth_it(p, k, l, M.dtype) else "iterate")
    out = None
    if n_iter == -1 and route == "gram":
        out = _gram_route(X, k, auto_tol)
    if out is None:
        out = _tall(X, k, l, n_iter, seed, check_finite, auto_tol)
    return orient(*out, M, wide)


def _tall(X, k, l, n_iter, seed, check_finite, auto_tol):
    """U (dask, chunked like X's rows, signs not fixed), S and Vt (NumPy) for X tall."""
    dtype = X.dtype
    f64 = dtype == np.float64
    p = X.shape[1]
    parts = list(X.to_delayed()[:, 0])
    rows = X.chunks[0]
    Z = _core.random_normal(p * l, seed, 0, True).reshape(p, l).astype(dtype)
    scale = 1.0
    Ys, W, G, st = _pass(parts, Z, scale, stats=True)
    amax, normA2 = float(st[0]), float(st[1])
    if not math.isfinite(amax):
        if check_finite:
            raise ValueError("M contains NaN or Inf (pass check_finite=False to skip this check)")
        nan = np.full((1, 1), np.nan, dtype)
        U = da.concatenate([da.full((r, k), np.nan, dtype=dtype) for r in rows])
        return U, np.full(k, np.nan, dtype), np.broadcast_to(nan, (k, p)).copy()
    if amax == 0.0:  # zero M: zero values, orthonormal vectors (the TSQR path gives them)
        n_iter = 0
    else:
        scale = _scale_for(amax, X.shape, dtype)
        if scale != 1.0:
            Ys, W, G, _ = _pass(parts, Z, scale, stats=False)
            normA2 *= scale * scale
    prev, inc_prev, prev_ok, it = None, 0.0, False, 0
    eps = auto_tol
    uncertified = 0.0
    while True:
        s, V, cond = _ritz(W, G, dtype)
        if n_iter >= 0:
            done = it == n_iter
        else:
            done = it == _MAX_AUTO_ITERS
            if it > 0 and prev_ok:
                conv, inc_prev, est = _core._rsvd_converged(list(prev), list(s), k, normA2, eps,
                                                            f64, inc_prev, iteration=it)
                # at the cap unmet: warn (not where the Ritz values are rounding: rank deficiency)
                if done and not conv:
                    uncertified = est or math.inf
                done = done or conv
        if done:
            break
        prev, prev_ok = s, cond <= _COND_RITZ
        Z = _next_z(V, s, l, seed, it, dtype)
        Ys, W, G, _ = _pass(parts, Z, scale, stats=False)
        it += 1
    if uncertified:
        _validation.warn_uncertified(it, auto_tol, uncertified, "a larger oversample, a fixed "
                                     "n_iter (check the error) or rslora.rsvd_tol")
    passes = _LAST_RUN.get("passes", 0) + it + 1 + (scale != 1.0)
    _LAST_RUN.update(route="iterate", n_iter=it, passes=passes, tsqr=False)
    U, S, Vt = _finish(parts, rows, Ys, W, G, k, scale, dtype)
    if scale != 1.0:
        S = _unscale(S, scale, dtype)
    return U, S, Vt


def gram_pass(X):
    """The float64 Gram of X (tall) with its scale, in one read (two for float64 data whose
    entries are far from 1). Returns (parts, rows, G, amax, scale); G is of X * scale."""
    parts = list(X.to_delayed()[:, 0])
    dtype = X.dtype

    def one(scale):
        step = gram.slice_rows(X.shape[1])
        outs = [_delayed(blocks.gram_block)(b, scale, step) for b in parts]  # (G_b, max |X_b|)
        return compute(blocks.tree(outs, blocks.merge_gram))[0]

    G, amax = one(1.0)
    _LAST_RUN["passes"] = 1
    scale = 1.0
    if math.isfinite(amax) and amax > 0:
        scale = _scale_for(amax, X.shape, dtype)
        if scale != 1.0:
            if dtype == np.float32:  # float32 squares are exact in float64: scale G itself
                G = G * (scale * scale)
            else:
                G, _ = one(scale)
                _LAST_RUN["passes"] = 2
    return parts, X.chunks[0], G, float(amax), scale


def _gram_route(X, k, auto_tol):
    """U, S, Vt from the Gram (rslora.dask.gram), or None when the result cannot be certified
    (the subspace iteration then runs; this read is lost)."""
    parts, rows, G, amax, scale = gram_pass(X)
    if not (math.isfinite(amax) and amax > 0):  # NaN/Inf and zero M: as the iteration does
        _LAST_RUN["gram"] = "not finite" if not math.isfinite(amax) else "zero"
        return None
    spec = gram.Spectrum(G, rows, X.dtype)
    exact = spec.certifies(k, auto_tol)
    if exact is None:
        _LAST_RUN["gram"] = "not certified"
        return None
    U, S, Vt = gram_finish(parts, rows, G, spec, k, scale, X.dtype, exact)
    _LAST_RUN.update(route="gram", n_iter=0, gram="certified")
    return U, _unscale(S, scale, X.dtype), Vt


def gram_finish(parts, rows, G, spec, r, scale, dtype, exact):
    """The rank-r result X V_r V_r^T from the Gram's top eigenpairs: one read for Y = X V_r
    S_r^-1 and Y^T Y (in float64 when ``exact``), then CholeskyQR2 (or TSQR) of Y as the
    iteration ends. The approximation is Y S_r V_r^T with the computed Y: Y's rounding E enters
    as E S_r, the Gram's bound on it (rslora.dask.gram); with Y = Q R, X^T Q is taken as
    V_r S_r R^T, which _finish reads from W = V_r S_r Y^T Y. S is of X * scale (unscale it:
    rounded to a subnormal M's dtype, it no longer tells the error)."""
    Z = (spec.V[:, :r] / np.sqrt(spec.lam[:r])).astype(np.float64 if exact else dtype)
    Zd = delayed(Z)
    step = gram.slice_rows(Z.shape[0])
    outs = [_delayed(blocks.times_block, nout=2)(b, Zd, scale, step) for b in parts]
    done = persist(*[o[0] for o in outs], blocks.tree(o[1] for o in outs))
    Ys, GY = list(done[:-1]), compute(done[-1])[0]
    _LAST_RUN.update(passes=_LAST_RUN.get("passes", 0) + 1, tsqr=False, exact_read=exact)
    W = (spec.V[:, :r] * np.sqrt(spec.lam[:r])) @ GY
    return _finish(parts, rows, Ys, W, GY, r, scale, dtype)


def _scale_for(amax, shape, dtype) -> float:
    """A power of 2 that brings max|M| into the window where the passes' sums of products
    neither overflow nor underflow (the window of rslora.rsvd); 1 inside it."""
    fi = np.finfo(dtype)
    size = math.sqrt(float(shape[0]) * shape[1] * max(shape))
    hi = math.ldexp(1.0, fi.maxexp // 2 - 8) / size
    lo = math.ldexp(1.0, fi.minexp // 2 + 4)
    if lo <= amax <= hi:
        return 1.0
    # max|M| * scale in [1, 2); for subnormal M the power that does it exceeds the dtype (2**1030
    # for 1e-310), so it stops at the largest power of 2, which still lands inside the window
    return math.ldexp(1.0, min(-math.frexp(amax)[1] + 1, fi.maxexp - 1))


def _unscale(S, scale, dtype):
    if scale == 1.0:
        return S
    top = float(S[0]) / scale if S.size else 0.0
    if top > float(np.finfo(dtype).max):  # a log: top itself may be inf
        raise _validation.singular_overflow(np.dtype(dtype).name,
                                            math.log10(float(S[0])) - math.log10(scale))
    return (S.astype(np.float64) / scale).astype(dtype)


def _pass(parts, Z, scale, stats):
    """One read of X: persisted Y blocks, and the summed M^T Y, Y^T Y (and stats)."""
    Zd = delayed(Z)  # one key: shipped once per worker, not once per task
    outs = [_delayed(blocks.power_block, nout=4)(b, Zd, scale, stats) for b in parts]
    W = blocks.tree(o[1] for o in outs)
    G = blocks.tree(o[2] for o in outs)
    extra = [blocks.tree((o[3] for o in outs), blocks.merge_stats)] if stats else []
    done = persist(*[o[0] for o in outs], W, G, *extra)
    nb = len(parts)
    small = compute(*done[nb:])
    return list(done[:nb]), small[0], small[1], (small[2] if stats else None)


def _ritz(W, G, dtype):
    """Ritz values s (descending, l of them), right Ritz vectors V and cond(Y), from M^T Y and
    Y^T Y. Directions of Y at the rounding level are left out (their s are 0)."""
    l = G.shape[0]
    d, E = np.linalg.eigh(G)
    d, E = d[::-1], E[:, ::-1]
    if not d[0] > 0:
        return np.zeros(l), np.zeros((W.shape[0], 0)), math.inf
    u = np.finfo(dtype).eps / 2
    keep = d > d[0] * max((8 * l * u) ** 2, 1e4 * np.finfo(np.float64).eps)
    cond = math.sqrt(d[0] / d[-1]) if d[-1] > 0 else math.inf
    T = E[:, keep] / np.sqrt(d[keep])  # Q = Y T orthonormal
    V, s, _ = np.linalg.svd(W @ T, full_matrices=False)
    return np.concatenate([s, np.zeros(l - s.size)]), V, cond


def _next_z(V, s, l, seed, it, dtype):
    """Z = V S^-1 (so that M Z is nearly orthonormal), with fresh Gaussian columns, orthogonal
    to V, in place of directions that were at the rounding level."""
    r = V.shape[1]
    p = V.shape[0]
    Z = V / np.maximum(s[:r], np.finfo(np.float64).tiny)
    if r < l:
        C = _core.random_normal(p * (l - r), seed, 1 + it, True).reshape(p, l - r)
        C -= V @ (V.T @ C)
        C = np.linalg.qr(C)[0] / (s[r - 1] if r else 1.0)
        Z = np.hstack([Z, C])
    return Z.astype(dtype)


def _cholesky(G):
    """Upper R with R^T R = G, or None when G is not numerically positive definite."""
    try:
        R = np.linalg.cholesky(G).T
    except np.linalg.LinAlgError:
        return None
    dg = np.abs(np.diag(R))
    return R if dg.min() > 0 and np.linalg.cond(R) <= _COND_LIMIT else None


def _from_blocks(parts, rows, cols, dtype):
    return da.concatenate([da.from_delayed(b, shape=(r, cols), dtype=dtype)
                           for b, r in zip(parts, rows)])


def _finish(parts, rows, Ys, W, G, k, scale, dtype):
    """U (persisted blocks as a dask array), S, Vt from the last pass."""
    R = _cholesky(G)
    if R is not None:  # CholeskyQR2, first step: Q = Y R^-1 from the Gram we already have
        T = np.linalg.solve(R, np.eye(R.shape[0]))  # l x l: a general solve is cheap
        V, s, Pt = np.linalg.svd(W @ T, full_matrices=False)  # M^T Q = V S P^T
        U1 = [_delayed(blocks.times)(y, T @ Pt.T[:, :k], dtype) for y in Ys]
        C = s[:k, None] * V[:, :k].T  # M ~ U1 C
        R2 = _cholesky(compute(blocks.tree(_delayed(blocks.gram)(u) for u in U1))[0])
        if R2 is not None:  # second step: U = U1 R2^-1, then the small SVD of R2 C
            P2, S, Vt = np.linalg.svd(R2 @ C, full_matrices=False)
            Mat = np.linalg.solve(R2, P2)
            U = [_delayed(blocks.times)(u, Mat, dtype) for u in U1]
            U = persist(*U)
            return _from_blocks(U, rows, k, dtype), S.astype(dtype), Vt.astype(dtype)
    # TSQR fallback: Q from Householder QR per block and of the stacked R factors, then one
    # more read of X for B^T = X^T Q.
    _LAST_RUN.update(tsqr=True, passes=_LAST_RUN["passes"] + 1)
    Q, _ = _tsqr(Ys, rows)
    Bt = compute(blocks.tree(_delayed(blocks.xt_block)(x, q, scale)
                                  for x, q in zip(parts, Q)))[0]
    V, S, Pt = np.linalg.svd(Bt, full_matrices=False)  # X^T Q = V S P^T
    U = persist(*[_delayed(blocks.times)(q, Pt.T[:, :k], dtype) for q in Q])
    return _from_blocks(U, rows, k, dtype), S[:k].astype(dtype), V[:, :k].T.astype(dtype)


def _tsqr(Ys, rows):
    """Householder TSQR: Q blocks (persisted) and R with Y = Q R, for any block heights."""
    qrs = persist(*[_delayed(blocks.qr_block, nout=2)(y) for y in Ys])
    Rs = compute(*[q[1] for q in qrs])
    Q2, R = np.linalg.qr(np.vstack(Rs))
    Q, off = [], 0
    for qr, Rb in zip(qrs, Rs):
        h = Rb.shape[0]
        Q.append(_delayed(np.matmul)(qr[0], Q2[off:off + h].astype(Rb.dtype)))
        off += h
    return persist(*Q), R


def _signs_blocks(U):
    """+1/-1 per column so that its entry of largest magnitude (the first on ties) is positive."""
    parts = compute(*[_delayed(blocks.col_absmax)(b) for b in U.to_delayed()[:, 0]])
    best = np.full(U.shape[1], -1.0)
    val = np.ones(U.shape[1])
    for a, v in parts:
        better = a > best
        best[better], val[better] = a[better], v[better]
    return np.where(val < 0, -1.0, 1.0)


def _signs_local(U):
    idx = np.argmax(np.abs(U), axis=0)
    return np.where(U[idx, np.arange(U.shape[1])] < 0, -1.0, 1.0)
