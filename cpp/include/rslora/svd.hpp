// Truncated SVD by randomized methods: fixed rank (range finder + subspace or block Krylov
// iteration) and fixed accuracy (blocked QB with an error indicator, after randQB_EI).
//
// Conventions shared by both:
// - M (m x n) is read through a strided view and never copied or written. The work is done on
//   A = M when m <= n, else on A = M^T (a view), so the orthonormal bases live on the short side.
// - Every pass over M is one BLAS-3 GEMM; orthonormalization is CholeskyQR2 (syrk, potrf, trsm),
//   shifted when the block is ill-conditioned, and Householder QR (geqrf + orgqr) only when
//   Cholesky breaks down (zero or rank-deficient blocks). The small SVD is LAPACK (see
//   small_svd in rsvd.cpp).
// - NaN/Inf in M are detected from the first sketch (no extra pass over M): a NaN or Inf entry
//   always reaches the product with a Gaussian.
// - Gaussian test matrices come from rslora::random (Philox): the same seed gives the same
//   numbers whatever the thread count.
// - Sign convention: in every column of U the entry of largest magnitude (the first such one on
//   ties) is positive; the matching row of Vt carries the same sign flip.
#pragma once
#include <cstdint>
#include <vector>

#include "rslora/view.hpp"

namespace rslora {

enum class RsvdMethod { subspace, krylov };
enum class RsvdNormalizer { qr, lu, none };

struct RsvdOptions {
  i64 oversample = 10;
  int n_iter = -1;  // -1: auto (see rsvd_auto_iters)
  RsvdMethod method = RsvdMethod::subspace;
  RsvdNormalizer normalizer = RsvdNormalizer::qr;  // between subspace passes; krylov needs qr
  std::uint64_t seed = 0;
  bool check_finite = true;  // NaN/Inf in M -> std::invalid_argument (seen in the first pass)
  // n_iter = -1 with subspace iteration and the "qr" normalizer: iterate until the estimated
  // relative Frobenius error is <= (1 + auto_tol) x the Eckart-Young optimum (see rsvd_converged).
  double auto_tol = 1e-3;
};

// Subspace iterations that n_iter = -1 may make at most before it stops unconverged.
constexpr int kRsvdAutoMaxIters = 12;

// The power iterations the last rsvd call on this thread made (n_iter, or what "auto" chose).
int rsvd_last_n_iter();

// Whether the last rsvd call on this thread ran block Krylov (method "krylov", or "auto" that
// switched to it after the sketch on a slowly decaying spectrum); n_iter then counts its blocks
// after the first.
bool rsvd_last_krylov();

// When the last rsvd call on this thread with n_iter = -1 stopped at kRsvdAutoMaxIters without
// its stopping rule being met: the rule's estimate of its relative Frobenius error over the
// Eckart-Young optimum (> 1; +Inf where it could form none). 0 otherwise (the rule was met, or a
// fixed n_iter). The Python layer turns it into a RuntimeWarning: "auto" is never silent about
// a result it could not certify.
double rsvd_last_uncertified();

// The fixed iteration count "auto" stands for where it does not adapt (method "krylov",
// normalizers "lu" and "none"), measured on the "style" (s_i = exp(-i/8)) and "facts"
// (s_i = (1 + i)^-1/2) spectra (see bench/bench_svd.py): the fewest that reach a relative
// Frobenius error <= 1.001 x the Eckart-Young optimum on both, in float32, k = 64, m = n in
// {2048, 4096}. 0 when the sketch already spans the short side.
int rsvd_auto_iters(RsvdMethod method, i64 m, i64 n, i64 k, i64 oversample);

// The number of GEMM passes over M that rsvd makes (each passes over M once with l columns,
// where l = min(k + oversample, min(m, n))). For the "gemm floor" of the benchmarks.
i64 rsvd_passes(RsvdMethod method, int n_iter);

// The stopping rule of n_iter = -1 (rsvd_converge.cpp) for callers that form their own Ritz
// values (rslora.dask: blocked passes): prev/cur the Ritz values (descending) of the last two
// iterations, normA2 = ||A||_F^2, float64 the working precision; inc_prev carries state between
// calls (start with 0); iter: the iterations made so far (0: not known, a more conservative rule).
// est_ratio (if given) receives the rule's estimate of err / opt (0 where it formed none).
bool rsvd_auto_converged(const std::vector<double>& prev, const std::vector<double>& cur, i64 k,
                         double normA2, double eps, bool float64, double* inc_prev, int iter = 0,
                         double* est_ratio = nullptr);

// Rank-k truncated SVD: U (m x k), S (k, descending), Vt (k x n), any writable views.
// Requires 1 <= k <= min(m, n) (checked: std::invalid_argument).
template <class T>
void rsvd(Mat<const T> M, i64 k, const RsvdOptions& opt, Mat<T> U, T* S, Mat<T> Vt);

// Fixed accuracy: the smallest rank r <= max_rank whose relative Frobenius error
// ||M - U diag(S) Vt||_F / ||M||_F is <= tol (or max_rank when tol cannot be reached).
template <class T>
struct RsvdTolResult {
  i64 rank = 0;
  double error = 0;            // relative Frobenius error of the returned factors
  std::vector<T> U, S, Vt;     // row-major m x rank, rank, rank x n
};

template <class T>
RsvdTolResult<T> rsvd_tol(Mat<const T> M, double tol, i64 max_rank, i64 block, int n_iter,
                          std::uint64_t seed, bool check_finite = true);

}  // namespace rslora
