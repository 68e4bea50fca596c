"""The Gram route of rslora.dask.rsvd and rsvd_tol: M^T M in float64 in one read, its
eigendecomposition on the client, and the certificate that says when that is accurate enough.

Cost model (flops per row of the tall M, m x p, rank k, sketch l = k + oversample; one GEMM
flop of the working dtype = 1, float64 on float32 data = 2, the rate measured here):
    one iteration of the subspace route (one read: M_b Z and M_b^T Y)   4 p l
    the Gram (syrk, p^2 multiply-adds, in float64)                      p^2 x (2 if float32 else 1)
    the last read, Y = M V_k S_k^-1 (M^T Y is G V_k S_k^-1: no GEMM)     2 p k
At 200,000 x 512, k = 64, float32 the Gram route costs ~3.9 reads of the subspace route; n_iter=
"auto" makes 3 to 8 reads there. The route is taken when it costs less than ``_EXPECTED_READS``
reads (and the p x p Gram fits on the client).

Certificate. With G~ the computed Gram and V_k, lam_k its computed top eigenpairs, the exact
G = M^T M satisfies ||G~ - G||_2 + (eigh's backward error) <= delta with
    delta = gamma_N tr(G~) + 8 p u64 lam_1,   gamma_N = N u64 / (1 - N u64)
(entrywise |G~ - G| <= gamma_N |M|^T |M|, whose Frobenius norm is at most tr(G); N bounds the
depth of each entry's sum: a slice of rows inside BLAS, the slices of a block, the tree over
blocks, and the product itself; LAPACK's symmetric eigensolvers are backward stable with a
small multiple of p u ||G||). Then, by Ky Fan and Weyl, the projection M V_k V_k^T has
err^2 <= opt^2 + 2 k delta and opt^2 >= sum_{i>k} lam_i - (p - k) delta =: lo. The last read
Y = M V_k S_k^-1 rounds too: the result is Y S_k V_k^T with the computed Y, so Y's rounding
E enters as E S_k, whose column j is the rounding of M v_j: counted as 4 u sqrt(p k) ||M||_F
(the sqrt(p) growth of rounding in dot products of length p; where that is too much the read is
made in float64, at twice the time, the term then negligible). Rounding the factors to the
working precision adds 4 u sqrt(k) s_1. The route returns only when
    sqrt(lo + 2 k delta) + rounding <= (1 + auto_tol) sqrt(lo);
it cannot on a tail below ~sqrt(2 k N u64) ||M||_F (float64 data with a deep tail), on rank < k,
or on a zero M: the subspace iteration runs instead.
"""

from __future__ import annotations

import math

import numpy as np

U64 = np.finfo(np.float64).eps / 2
# Reads of M that n_iter="auto" is taken to need (it made 3-8 at the benchmark's sizes).
_EXPECTED_READS = 5.0
# Largest short side for which the p x p float64 Gram (and its eigenvectors) is formed.
MAX_SIDE = 8192


def slice_rows(p: int) -> int:
    """Rows per float64 slice of a block in the Gram (~32 MiB; also bounds the sums' depth)."""
    return max(256, (1 << 22) // max(p, 1))


def cost_in_reads(p: int, k: int, l: int, dtype) -> float:
    """The Gram route's cost in reads of the subspace route (the model above)."""
    widen = 2.0 if np.dtype(dtype) == np.float32 else 1.0
    return (widen * p * p + 2.0 * p * k) / (4.0 * p * l)


def worth_it(p: int, k: int, l: int, dtype) -> bool:
    return p <= MAX_SIDE and cost_in_reads(p, k, l, dtype) < _EXPECTED_READS


class Spectrum:
    """Eigenvalues (descending) and vectors of the computed Gram, with its error bound."""

    def __init__(self, G: np.ndarray, rows: tuple, dtype):
        p = G.shape[0]
        lam, V = np.linalg.eigh(G)
        self.lam, self.V = lam[::-1].copy(), V[:, ::-1].copy()
        self.trace = float(np.trace(G))
        self.p = p
        step = slice_rows(p)
        tallest = max(rows)
        n = min(step, tallest) + -(-tallest // step) + math.ceil(math.log2(max(len(rows), 1))) + 2
        gamma = n * U64 / (1 - n * U64)
        top = float(abs(self.lam[0])) if p else 0.0
        self.delta = gamma * self.trace + 8 * p * U64 * top
        self.u = np.finfo(dtype).eps / 2  # the working precision
        # tail[r] = sum_{i >= r} lam_i (0-based), the computed optimum energy at rank r
        self.tail = np.concatenate([np.cumsum(self.lam[::-1])[::-1], [0.0]])

    def rounding(self, r: int, exact: bool) -> float:
        """The rounding (Frobenius) of the last read (in float64 when ``exact``) and of the
        factors, at rank r (see above)."""
        s1 = math.sqrt(max(self.lam[0], 0.0))
        u = U64 if exact else self.u
        read = 4 * u * math.sqrt(self.p * r * max(self.trace, 0.0))
        return read + 4 * self.u * math.sqrt(r) * s1

    def resolved(self, r: int) -> bool:
        """lam_r is far enough above the Gram's error for V_r S_r^-1 to be meaningful."""
        return r >= 1 and self.lam[r - 1] > 16 * self.delta and self.lam[0] > 0

    def certifies(self, k: int, eps: float) -> bool | None:
        """Does the rank-k result provably meet (1 + eps) x the Eckart-Young optimum? None if
        not; else whether the last read must be made in float64 for that."""
        if not self.resolved(k):
            return None
        lo = float(self.tail[k]) - (self.p - k) * self.delta
        if not lo > 0:
            return None
        for exact in (False, True):
            bound = math.sqrt(lo + 2 * k * self.delta) + self.rounding(k, exact)
            if bound <= (1 + eps) * math.sqrt(lo):
                return exact
        return None

    def rank_for(self, tol: float, max_rank: int) -> tuple[int | None, bool, bool]:
        """(the smallest rank r <= max_rank whose result provably has relative error <= tol,
        None when none does; whether its last read must be in float64; whether tol is out of
        reach at max_rank for certain)."""
        fro = math.sqrt(max(self.trace * (1 - 4 * (self.p + 1) * U64), 0.0))
        for r in range(1, max_rank + 1):
            if not self.resolved(r):
                break
            hi = math.sqrt(max(float(self.tail[r]) + (self.p - r) * self.delta, 0.0)
                           + 2 * r * self.delta)
            for exact in (False, True):
                if hi + self.rounding(r, exact) <= tol * fro:
                    return r, exact, False
        lo = float(self.tail[max_rank]) - (self.p - max_rank) * self.delta
        return None, True, lo > (tol * fro) ** 2
