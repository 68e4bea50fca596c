"""Truncated SVD by randomized methods: fixed rank (:func:`rsvd`) and fixed accuracy (:func:`rsvd_tol`).

The passes over ``M`` are BLAS-3 GEMMs in the compiled core (on NumPy's own BLAS), the small
SVD is LAPACK, and the Gaussian test matrices are drawn in C++ from a counter-based generator
(Philox4x32-10): the same ``seed`` gives bit-identical results for the same inputs and BLAS
thread count, whatever the call order. The GIL is released while the core works, and Ctrl-C
is honoured between passes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import _backend, _core
from . import _validation as v

__all__ = ["rsvd", "rsvd_tol", "RsvdTolResult"]


class RsvdTolResult(NamedTuple):
    """Result of :func:`rsvd_tol`: ``M ~ U @ diag(S) @ Vt`` with relative Frobenius ``error``."""

    U: np.ndarray
    S: np.ndarray
    Vt: np.ndarray
    error: float


def rsvd(M: Any, k: int, *, oversample: int = 10, n_iter: int | str = "auto",
         method: str = "subspace", normalizer: str = "qr", seed: int | np.random.Generator | None = None,
         check_finite: bool = True, auto_tol: float = 1e-3) -> Any:
    """Rank-``k`` truncated SVD by a randomized range finder.

    Parameters
    ----------
    M : array_like, shape (m, n)
        float32 or float64, any layout (read in place; never modified or copied unless its
        strides are negative or non-unit on both axes).
    k : int
        Number of singular triplets, ``1 <= k <= min(m, n)``.
    oversample : int
        Extra sketch columns: the sketch has ``l = min(k + oversample, min(m, n))`` columns.
    n_iter : int or "auto"
        Power (subspace) iterations, or Krylov block steps for ``method="krylov"``. Each costs two
        passes over ``M``; the whole call makes ``2 * n_iter + 2`` GEMM passes. ``"auto"``
        (subspace iteration with the "qr" normalizer) iterates until the result meets the
        accuracy contract below (0 iterations when the sketch already does), at most 12
        times (a ``RuntimeWarning`` when the cap comes first: Notes), and may first widen the
        sketch by up to ``l`` columns, or continue it as block Krylov on a slowly decaying
        spectrum (Notes); when ``2 * l >= min(m, n)`` it sketches the whole short side instead
        (exact, 0 iterations, for any method: one iteration would cost as much); with
        ``method="krylov"`` it means 3 steps, with the "lu"/"none" normalizers 5 iterations; 0
        when ``l`` already spans the short side of ``M``. :func:`rslora._core.rsvd_last_n_iter`
        tells what a call chose (and :func:`rslora._core.rsvd_last_krylov` whether it ran block
        Krylov).
    auto_tol : float
        The accuracy contract of ``n_iter="auto"``: relative Frobenius error
        ``||M - U diag(S) Vt||_F <= (1 + auto_tol) x ||M - M_k||_F`` (the Eckart-Young
        optimum), default 1.001x. Larger is looser (fewer passes), smaller tighter;
        ``0 < auto_tol < 1``. Ignored for a fixed ``n_iter``.
    method : {"subspace", "krylov"}
        ``"subspace"``: subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4).
        ``"krylov"``: block Krylov (Musco & Musco 2015): the basis keeps every block, so it is
        ``(n_iter + 1) * l`` wide; more accurate per pass on slowly decaying spectra (3 steps,
        8 passes, match what 5 subspace iterations, 12 passes, give).
    normalizer : {"qr", "lu", "none"}
        How subspace iteration re-conditions its blocks between passes: QR by two CholeskyQR
        passes (the first shifted; Householder QR when Cholesky breaks down), an LU factor
        ``P L`` (as scikit-learn and fbpca do), or only a rescaling (plain power iteration:
        loses the small directions in float32 after a few passes). The final basis is always
        orthonormalized to working precision. ``method="krylov"`` needs ``"qr"``.
    seed : int, numpy.random.Generator or None
        Key of the Gaussian test matrix (0 <= seed < 2**64). None draws fresh entropy. The same
        seed gives the same result (for the same BLAS thread count).
    check_finite : bool
        Raise ``ValueError`` when ``M`` holds NaN or Inf (found by the max-abs scan below, no
        GEMM). With ``False`` a non-finite ``M`` gives NaN results.

    Returns
    -------
    U : ndarray, shape (m, k)
        Orthonormal columns.
    S : ndarray, shape (k,)
        Singular values, descending.
    Vt : ndarray, shape (k, n)
        Orthonormal rows. All three have ``M``'s dtype and are C-contiguous.

    Notes
    -----
    How ``n_iter="auto"`` decides, at no extra pass over ``M`` (``||M||_F^2`` comes from the
    max-abs scan of ``M`` below, and each basis costs an ``l x l`` eigenproblem of the
    ``W^T W`` the next pass or the final small SVD reuses). With an orthonormal basis ``Q`` the
    Ritz values ``s_i`` (singular values of ``Q^T M``) give the error of the rank-k result
    exactly, ``err^2 = ||M||_F^2 - sum_{i<=k} s_i^2``, and ``err^2 - opt^2 = gap = sum_{i<=k}
    (sigma_i^2 - s_i^2)`` (the energy not yet captured), while ``opt^2 >= below = sum_{k<i<=l}
    s_i^2``. The rule stops, after the sketch or after any iteration, when either

    1. (a bound) ``||M||_F^2 - sum_{i<=l} s_i^2 <= ((1 + auto_tol)^2 - 1) * below``: the energy
       outside the whole basis bounds the gap, so the contract holds up to rounding. This is
       what lets the sketch alone suffice (0 iterations) when the ``l`` columns hold all but a
       sliver of ``M`` (a spectrum with a cliff inside the sketch);
    2. (an estimate, from the first iteration on, with at least 4 Ritz values past ``k``) the
       gap, extrapolated from how much each ``s_i^2`` grew in the last iteration, ``d_i``:
       geometrically at the rate subspace iteration converges, ``(sigma_{l+1} / s_i)^4`` per
       iteration, with ``sigma_{l+1}^2`` read as ``s_l^2`` risen once more by its last rise
       (the bottom of the basis is still far from ``sigma_{l+1}`` while it rises), never
       faster than the observed rate of the whole, but never more than
       ``2 t d_i`` after ``t`` iterations, is below half of what ``auto_tol`` allows, with
       ``opt^2`` estimated by ``max(below, err^2 - gap)``. The cap is for directions inside a
       cluster (a flat noise floor across index ``k``): there the geometric rate is ~1 and says
       the gap is ~20 ``d_i``, but such a direction converges like ``1/t`` (its shortfall ~
       ``(t + 1/2) d_t``) and any direction of the cluster is nearly as good for the error.
       With ``oversample < 4`` there is no rate to read (and the first steps from so narrow a
       sketch are far from geometric): only rule 1 stops it, or the cap below.

    When the sketch fails rule 1 on fast decay, its Ritz values may widen it before any
    iteration, keeping the columns already computed (Gaussian columns made orthogonal to them,
    2 passes of their width, at most ``l``: never more than one iteration costs; the wider
    basis at most an eighth of the short side): by the columns that the decay of ``s_i^2``
    over ``[k/2, k)`` predicts bring rule 1 within ``auto_tol``, when that is not below the
    rounding of the captured energy (float64, or float32 with an optimum well above its
    rounding). The rules above then judge the wider basis, so widening changes the cost, never
    what "converged" means (float64 exp(-i/8) at 2048: 0 iterations at 104 columns where 1 at
    74 was needed).

    Slow decay: when the sketch's Ritz values decay slowly and smoothly across index ``k``
    (the subspace rate of direction ``k``, ``(s_l / s_k)^4``, at least 0.3, and
    ``s_{k/4} / s_k`` in ``[1.1, 8]``: power laws at large ``k``, Gaussian matrices, not a
    noise floor flat across ``k`` nor a fast decay), "auto" keeps the sketch as the first block
    of a block Krylov basis and adds a block per step (2 passes of ``l`` columns, as an
    iteration). Each step judges the whole basis (``(t + 1) l`` columns, its Gram grown by the
    new columns only) by the rules above, with ``s_L`` the last Ritz value of the whole basis
    in rule 2's rates; rule 2 decides from the third step on only and doubles its estimate,
    as Krylov's first observed rates can be far faster than the next ones (0.03 then 0.17 on
    ``(1+i)^-1/4`` with a 0.3x step down inside the basis: stopping at step 2 gave 1.0011x).
    "facts" at 2048 and 4096 (float32, ``k = 64``): 3 steps, 8 passes, at 1.00004x, where
    subspace iteration made 5-6 iterations (12-14 passes). Runs over power laws (exponents
    1/4 to 1, with and without steps down around ``k``), exponential decays, noise floors and
    Gaussian matrices, ``k`` from 2 to 128, oversample 5 to 30, ``auto_tol`` 1e-2 to 1e-4,
    tall, wide and small shapes, float32 and float64 met the contract on every one of the
    ~1500 that took the Krylov path (worst 1.00028x at 1.001x); the others are subspace
    iteration's as before.

    Changes of ``s_i^2`` smaller than their rounding are not counted. At the 12-iteration cap
    with neither rule met, the result is returned with a ``RuntimeWarning`` that names the
    rule's estimate of its ratio to the optimum (:func:`rslora._core.rsvd_last_uncertified`
    gives it too; 0.0 after a certified call): "auto" never returns an uncertified result
    silently. That happens with ``oversample < 4`` (unless rule 1 holds: a cliff inside the
    basis, exact low rank), with ``auto_tol=1e-4`` on slowly converging spectra, and on a
    cluster across index ``k`` (the optimum is not unique there).

    Rule 2 is an estimate: it extrapolates, so a spectrum whose decay changes beyond index
    ``l``, or a sketch that stalls for an iteration before converging, can still fool it.
    Known misses, from ``bench/sweep_rsvd_auto.py`` (power laws of exponent 1/4 to 1, with and
    without 0.3x/0.6x steps down at ``k - 2`` to ``k + 3``, exponential decays, noise floors,
    cliffs, Gaussian matrices; 300 x 900, 900 x 300, 80 x 200 and 600 x 600; ``k`` 2 to 128;
    oversample 0, 5, 10, 30; ``auto_tol`` 1e-2 to 1e-4; float32 and float64; ``--quick``, 4188
    cases): 58 silent misses remain (115 before the rules above took ``s_l``'s rise and the
    tail of 4 into account). 35 are in the rounding regime: ``exp(-i/3)`` and ``exp(-i/8)`` at
    ``k = 96``, where the optimum's energy is below the rounding of the ``s_i^2`` (float32, and
    float64 for ``exp(-i/3)``), so increases are not measurable and the rule stops on "nothing
    measurable left" (up to 1.02x for ``exp(-i/8)`` in float32). Where the optimum itself is
    below the rounding of ``M`` in its dtype (``exp(-i/3)`` at ``k = 96`` in float32: an
    optimum ~1e-14 of ``||M||_F``), no result in that dtype can meet a ratio to it: the error
    is then at rounding level, ``O(u) ||M||_F`` (up to 85x that optimum); read the contract as
    ``err <= (1 + auto_tol) opt + O(u) ||M||_F``. 23 stop after one iteration
    on a decay that steps down 0.3x-0.6x at or just past ``k`` (worst 1.0134x at
    ``auto_tol=1e-2``, ``k = 96``; 1.0025x at 1e-3 with ``k = 8`` and oversample 5).
    Where the contract must hold whatever the spectrum, give a fixed ``n_iter`` and check the
    error, or use :func:`rsvd_tol`, which measures it. On the "style", "facts", flat-then-cliff
    and noisy low-rank spectra of bench/bench_svd.py (2048 and 4096, ``k = 64``) it meets
    1.001x with the fewest iterations that do on style (1), cliff (0) and noisy (1), facts 3
    Krylov steps (2 fall just short: 1.0013x at 2048, 1.0011x at 4096).

    Sign convention: in every column of ``U`` the entry of largest magnitude (the first one
    on ties) is positive; the matching row of ``Vt`` carries the same sign. The work is done on
    ``M`` or on ``M.T`` (a view), whichever makes the orthonormal bases the short side.
    A zero or rank-deficient ``M`` gives zero singular values with orthonormal (arbitrary)
    vectors, never NaN. One read of ``M`` (max-abs and ``||M||_F^2`` in float64) decides
    whether squares formed inside could overflow or underflow (float32 entries beyond ~1e15 or
    below ~1e-18); if so the work is done on ``M * 2**e`` in a copy (exact) and ``S`` scaled
    back. Singular values that exceed ``M``'s dtype raise ``ValueError`` (never Inf or NaN).
    GPU arrays (DLPack: torch, CuPy) run on the GPU through :func:`rslora.cuda.rsvd`.
    """
    return _backend.op("rsvd", M)(M, k, oversample=oversample, n_iter=n_iter, method=method,
                                  normalizer=normalizer, seed=seed,
                                  check_finite=v.flag(check_finite, "check_finite"),
                                  auto_tol=auto_tol)


def rsvd_tol(M: Any, tol: float, *, max_rank: int | None = None, block: int | None = None,
             n_iter: int = 2, seed: int | np.random.Generator | None = None,
             check_finite: bool = True) -> RsvdTolResult:
    """The smallest-rank truncated SVD whose relative Frobenius error is at most ``tol``.

    Blocked randomized QB with an exact error indicator (Yu, Gu & Li 2018, randQB_EI): blocks
    of ``block`` columns are added until ``||M - Q B||_F <= tol ||M||_F``, where the error is
    known from ``||M||_F^2 - ||B||_F^2`` without forming the residual; the SVD of ``B`` is then
    trimmed to the smallest rank that still meets ``tol``.

    Parameters
    ----------
    M : array_like, shape (m, n)
        float32 or float64.
    tol : float
        Relative Frobenius tolerance, ``0 < tol < 1``.
    max_rank : int, optional
        Largest rank to try (default ``min(m, n)``). When even this rank misses ``tol`` the
        rank-``max_rank`` result is returned and its ``error`` exceeds ``tol``: check it.
    block : int, optional
        Columns added per step (default ``min(32, max_rank)``): larger is faster per column,
        smaller stops closer to the needed rank before trimming.
    n_iter : int
        Power iterations per block (2 passes each) on the current residual.
    seed : int, numpy.random.Generator or None
        As in :func:`rsvd`.
    check_finite : bool
        Raise ``ValueError`` naming NaN/Inf in ``M``; with ``False`` a non-finite ``M`` still
        gives a ``ValueError`` (the error indicator needs a finite ``||M||_F``). Entries too
        large or small for the squares summed inside are handled as in :func:`rsvd`.

    Returns
    -------
    RsvdTolResult
        ``(U, S, Vt, error)``: ``U`` (m, r), ``S`` (r,), ``Vt`` (r, n) in ``M``'s dtype and
        ``error = ||M - U diag(S) Vt||_F / ||M||_F`` as a Python float. A zero ``M`` gives
        ``r = 0`` and ``error = 0``.

    Notes
    -----
    In working precision u, ``||M||_F^2 - ||B||_F^2`` loses relative accuracy once it falls
    to about ``100 u ||M||_F^2`` (float32: tolerances below ~3e-3). There the residual is
    computed exactly, one column chunk at a time (one extra pass, no dense m x n temporary),
    and the indicator continues from that value, so the reported error stays accurate for any
    tolerance the precision can reach. Sums of squares are accumulated in float64.
    """
    _backend.host_only("rsvd_tol", M=M)
    Mh = v.host_matrix(M)
    tol = v.open_unit(tol, "tol")
    if min(Mh.shape) == 0:
        raise ValueError(f"M has shape {Mh.shape}: nothing to approximate")
    rank = min(Mh.shape) if max_rank is None else v.rank(max_rank, "max_rank", Mh.shape)
    # a block wider than max_rank is max_rank (clamped: no overflow in the core's sizes)
    width = min(32, rank) if block is None else min(v.integer(block, "block", 1), rank)
    q = v.integer(n_iter, "n_iter", 0, v.INT_MAX)
    finite = v.flag(check_finite, "check_finite")
    U, S, Vt, err = _core.rsvd_tol(Mh, tol, rank, width, q, v.seed(seed), finite)
    return RsvdTolResult(U, S, Vt, float(err))
