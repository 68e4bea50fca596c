// Building blocks shared by rsvd.cpp and rsvd_tol.cpp (internal to the core). Tall-skinny
// blocks are column-major buffers (p rows, leading dimension p), what LAPACK wants.
#pragma once
#include <vector>

#include "rslora/view.hpp"

namespace rslora::detail {

template <class T>
Mat<T> colmajor(T* p, i64 rows, i64 cols, i64 ld) {
  return {p, rows, cols, 1, ld};
}
template <class T>
Mat<const T> ccolmajor(const T* p, i64 rows, i64 cols, i64 ld) {
  return {p, rows, cols, 1, ld};
}

// Whether every x[i] is finite: x - x is 0 for a finite x and NaN otherwise, and a NaN stays in
// a sum, so 16 lane sums of it (a loop the compiler vectorizes) say it, a block at a time;
// std::all_of with std::isfinite tests an entry a branch.
template <class T>
bool all_finite(const T* x, i64 count) {
  constexpr int kLanes = 16;
  constexpr i64 kBlock = 4096;
  for (i64 b = 0; b < count; b += kBlock) {
    const i64 e = b + kBlock < count ? b + kBlock : count;
    T acc[kLanes] = {};
    i64 i = b;
    for (; i + kLanes <= e; i += kLanes)
      for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] - x[i + j];
    for (; i < e; ++i) acc[0] += x[i] - x[i];
    for (int j = 0; j < kLanes; ++j)
      if (!(acc[j] == T(0))) return false;
  }
  return true;
}

// Y (p x l, column-major, ld p) <- an orthonormal basis of its range, l <= p. Never NaN: a zero
// or rank-deficient Y still gives orthonormal columns (Householder fills the missing directions).
template <class T>
void orthonormalize(T* Y, i64 p, i64 l);

// Two CholeskyQR passes (the first shifted; Householder if Cholesky breaks down): the same span,
// orthonormal to ~1e-3 in float32 at worst, all that subspace iteration needs between passes
// ("qr" normalizer). orthonormalize adds a third pass when needed, for the final basis.
template <class T>
void condition(T* Y, i64 p, i64 l);

// Y <- P L from Y = P L U (partial pivoting): a well-conditioned basis of range(Y) at the cost of
// one getrf, what scikit-learn and fbpca use between power passes. Finite for singular Y.
template <class T>
void lu_normalize(T* Y, i64 p, i64 l);

// Y <- Y / max|Y| (span unchanged; keeps repeated powers of M inside the floating-point range).
template <class T>
void rescale(T* Y, i64 count);

// Y (p x l) -= Q (Q^T Y), `rounds` times (block classical Gram-Schmidt), Q p x c orthonormal.
// tmp is scratch.
template <class T>
void project_out(const T* Q, i64 p, i64 c, T* Y, i64 l, std::vector<T>& tmp, int rounds = 1);

// Y (p x l) <- an orthonormal basis of range((I - Q Q^T) Y), orthogonal to Q (p x c) to working
// precision: project, orthonormalize, project, orthonormalize (BCGS2, "twice is enough").
template <class T>
void orthonormalize_against(const T* Q, i64 p, i64 c, T* Y, i64 l, std::vector<T>& tmp);

// Sign convention: the largest-|.| entry of each column of U (first on ties) is made positive,
// and row j of Vt flips with column j of U.
template <class T>
void fix_signs(Mat<T> U, Mat<T> Vt);

// Columns to add to the sketch (0: none) when its bound fails but the decay of its Ritz values
// s (of L columns) predicts that a wider sketch meets the bound without iterating; at most room
// and L (the cost of one iteration).
template <class T>
i64 rsvd_widen_cols(const std::vector<double>& s, i64 k, double normA2, double eps, i64 room);

}  // namespace rslora::detail

namespace rslora::detail {

// The matrix the work is done on: A = M (m <= n) or M^T (m > n), so A is p x q with p <= q.
template <class T>
struct Sides {
  Mat<const T> A;
  bool transposed;
  i64 p, q;
  explicit Sides(Mat<const T> M)
      : A(M.rows <= M.cols ? M : M.t()), transposed(M.rows > M.cols), p(A.rows), q(A.cols) {}
  // Y (p x c) = A X, X (q x c); Z (q x c) = A^T Y, Y (p x c). Column-major, one GEMM each.
  void mul(const T* X, i64 c, T* Y) const;
  void mul_t(const T* Y, i64 c, T* Z) const;
};

// W^T W of a q x L block W (column-major) in float64 and its eigen-decomposition: the Ritz
// values of the basis W came from (descending s), and for float32 what the small SVD of the
// final W reuses. Wd holds W in float64 (float32 W only); G the eigenvectors (ascending order,
// column-major L x L) and ev the eigenvalues (ascending).
struct Gram {
  std::vector<double> Wd, G, ev, s;
  const double* W = nullptr;  // W in float64: Wd, or the caller's float64 W
  i64 q = 0, L = 0;
  // Whether the top `cols` eigenvalues are >= floor x the largest (> 0, finite): then those
  // columns of W V S^-1 are orthonormal to ~1e-16 / floor whatever the precision
  // (u_64 (s_0 / s_j)^2): 1e-8 for the final vectors, 1e-4 for a basis between passes.
  bool well_conditioned(i64 cols, double floor) const;
  // out (q x cols, column-major) = W v_j / s_j for the top `cols` eigenpairs (descending): the
  // left singular vectors of W, or an orthonormal basis of its span (cols = L).
  void scaled_vectors(i64 cols, std::vector<double>& out) const;
};
template <class T>
void gram_eig(const T* W, i64 q, i64 L, Gram& g);
// gram_eig of W's first c + w columns where full holds the Gram of its first c (c x c; else it is
// computed whole): only the w new columns of W^T W are formed. full <- the new Gram.
template <class T>
void gram_eig_grow(const T* W, i64 q, i64 c, i64 w, Gram& g, std::vector<double>& full);

// Thin SVD of the q x L block W = A^T Q (= B^T with B = Q^T A): W = Uw diag(s) Vwt, the first
// `cols` left vectors only. float32: from the eigen-decomposition of W^T W in float64 (`known`
// when the caller has it for this very W, else computed); float64 (or float32 with a Gram too
// ill-conditioned for that): W = Qw R (CholeskyQR, BLAS-3), then gesdd of the L x L R: LAPACK's
// own tall SVD spends its time in threaded BLAS-2 calls that crawl on a busy machine. The
// buffers of sv are reused (no allocation when they are large enough).
template <class T>
struct SmallSvd {
  std::vector<T> s, Uw, Vwt;  // L; q x cols column-major; L x L column-major
  std::vector<double> Ud;     // scratch; Uw itself (in float64) when uw_in_ud (the Gram route)
  i64 q = 0, L = 0;
  bool uw_in_ud = false;
};
template <class T>
void small_svd(const T* W, i64 q, i64 L, i64 cols, SmallSvd<T>& sv, const Gram* known = nullptr);

// After the first pass Y = A Om: every entry of A met a nonzero Gaussian, so a NaN or Inf in A
// shows in Y. Throws std::invalid_argument naming the cause (NaN/Inf in M, or overflow).
template <class T>
void check_sketch_finite(const Sides<T>& sd, const T* Y, i64 count);

// M ~ U diag(S) Vt from A ~ (Q Vw) diag(s) Uw^T, first k triplets, with the sign convention.
template <class T>
void write_factors(const Sides<T>& sd, const T* Q, const SmallSvd<T>& sv, i64 k, Mat<T> U, T* S,
                   Mat<T> Vt);

// M as the algorithm sees it: M itself, or M * 2^exp in a copy when max|M| is so large or so
// small that the squares formed inside (Gram matrices, ||M||_F^2) would overflow or underflow
// (rsvd_scale.cpp). Also the NaN/Inf check of M when check_finite, and ||M||_F^2 (of the M
// above, in float64; NaN/Inf when M holds NaN/Inf), in the same read of M, no GEMM.
template <class T>
struct Rescaled {
  Mat<const T> M;
  int exp = 0;
  double sumsq = 0;
  std::vector<T> buf;
  Rescaled(Mat<const T> M0, bool check_finite);
  // S (k values of M * 2^exp) <- the values of M; std::invalid_argument when they overflow T.
  void unscale(T* S, i64 k) const;
};

// Columns to add to the sketch (0: none) when its bound fails but the decay of its Ritz values
// s (of L columns) predicts that a wider sketch meets the bound without iterating; at most room
// and L (the cost of one iteration).
template <class T>
i64 rsvd_widen_cols(const std::vector<double>& s, i64 k, double normA2, double eps, i64 room);

}  // namespace rslora::detail

namespace rslora::detail {

// The stopping rule of n_iter = "auto" (rsvd_converge.cpp): whether the rank-k result from the
// basis whose Ritz values are cur (descending, L of them) is within (1 + eps) x the optimal
// Frobenius error, ||A||_F^2 = normA2. prev: the previous iteration's Ritz values, empty on the
// first basis (the sketch). inc_prev carries the last increase of the captured energy between
// calls (start with 0). iter: the iterations that made cur (>= 1 when prev is given; 0: not
// known, and no direction's shortfall is capped at 2 iter times its last increase). krylov: cur
// is the whole block Krylov basis after `iter` steps (rsvd_converge.cpp: a more cautious estimate).
// est_ratio (if given) receives the estimate of err / opt the rule judged (0 where it formed
// none: the sketch, or a basis the bound alone certified), for the warning at the cap.
template <class T>
bool rsvd_converged(const std::vector<double>& prev, const std::vector<double>& cur, i64 k,
                    double normA2, double eps, double* inc_prev, int iter, bool krylov = false,
                    double* est_ratio = nullptr);

// Columns to add to the sketch (0: none) when its bound fails but the decay of its Ritz values
// s (of L columns) predicts that a wider sketch meets the bound without iterating; at most room
// and L (the cost of one iteration).
template <class T>
i64 rsvd_widen_cols(const std::vector<double>& s, i64 k, double normA2, double eps, i64 room);

}  // namespace rslora::detail
