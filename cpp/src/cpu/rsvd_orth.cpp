// Orthonormalization of tall-skinny blocks for the randomized SVD.
//
// CholeskyQR (G = Y^T Y by syrk, R = chol(G) by potrf, Q = Y R^-1 by GEMMs with R^-1) is all BLAS-3 and
// several times faster than Householder geqrf + orgqr on 2 cores (orgqr dominates the latter);
// measured on 2048 x 74 float32 blocks. Its weakness is conditioning: one pass loses
// orthogonality like u cond(Y)^2. So:
//   pass 1: Cholesky of G + s I with a small shift s (Fukaya et al. 2020, shifted CholeskyQR):
//           the shift keeps potrf alive for ill-conditioned Y and leaves Q1 = Y R^-1 with
//           cond(Q1) <~ u^-1/2; retried with the provable shift if the small one is not enough;
//   pass 2: plain CholeskyQR of Q1 (orthogonal to O(u) when Q1 was close to orthonormal);
//   pass 3: only when pass 2 started far from orthonormal (||G - I||_F > 1/2).
// A zero or numerically rank-deficient block makes potrf fail: Householder then, which returns
// orthonormal columns whatever Y is (the Q of a zero block is the first columns of I).
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "rslora/blas.hpp"
#include "rsvd_kernels.hpp"

namespace rslora::detail {
namespace {

template <class T>
void householder(T* Y, i64 p, i64 l) {
  std::vector<T> tau(static_cast<size_t>(l));
  blas::geqrf<T>(p, l, Y, p, tau.data());
  blas::orgqr<T>(p, l, l, Y, p, tau.data());
}

// Y (p x l) <- Y R^-1, R upper triangular (the upper triangle of R, ld l), by products with
// R^-1 (inverted in float64, O(l^3) against the p l^2 of the product): OpenBLAS's trsm ran at a
// third of its GEMM speed on 2048 x 74 blocks (1.4 ms of a 24 ms rsvd). The rounding error is of
// the order of trsm's, u cond(R): CholeskyQR's last pass, the one that makes Q orthonormal, has
// cond(R) ~ 1, and the first only needs cond(Y R^-1) = O(1). work is scratch. False (Y
// untouched) when R^-1 does not fit T.
//   float32: one in-place triangular multiply (strmm): half the multiply-adds of a GEMM by the
//            full square and no copy back, 0.18 ms against 0.31 ms at 2048 x 74 (one thread).
//   float64: row blocks of GEMMs by the full square, copied back. OpenBLAS's dtrmm rounds
//            differently at 1 and 2 threads (its edge kernels; measured on scipy-openblas64
//            0.3.31: 1e-14 apart at 5000 x 100), which would make the result depend on whether
//            the one-thread scopes are active; its strmm gave the same bits in 76 shapes tried
//            (p from 7 to 9000, l from 1 to 256), as GEMM does (tests/test_single_thread.py).
// Above this width trsm is used (its speed grows with l; the inverse's scalar O(l^3) too).
constexpr i64 kInverseMaxCols = 256;
template <class T>
bool right_multiply_by_inverse(T* Y, i64 p, i64 l, const std::vector<T>& R, std::vector<T>& work) {
  constexpr i64 kRows = 256;  // float64: a block of rows of Y and its product stay in L2
  const i64 rows = std::is_same_v<T, float> ? 0 : std::min(p, kRows);
  work.assign(static_cast<size_t>(l * l + rows * l), T(0));
  T* X = work.data();  // R^-1, upper triangular, column-major
  std::vector<double> col(static_cast<size_t>(l));
  for (i64 j = 0; j < l; ++j) {  // column j of R^-1: back substitution R x = e_j, by columns of R
    std::fill(col.begin(), col.begin() + j + 1, 0.0);
    col[j] = 1.0;
    for (i64 i = j; i >= 0; --i) {
      const T* Ri = R.data() + i * l;
      const double xi = col[i] /= double(Ri[i]);
      for (i64 r = 0; r < i; ++r) col[r] -= xi * double(Ri[r]);
    }
    for (i64 i = 0; i <= j; ++i) X[i + j * l] = static_cast<T>(col[i]);
  }
  if (!std::all_of(X, X + l * l, [](T x) { return std::isfinite(x); })) return false;
  if constexpr (std::is_same_v<T, float>) {
    blas::trmm<T>(false, true, false, false, p, l, T(1), X, l, Y, p);
  } else {
    T* tmp = X + l * l;
    auto Xv = ccolmajor(X, l, l, l);
    for (i64 r0 = 0; r0 < p; r0 += rows) {
      const i64 b = std::min(rows, p - r0);
      blas::gemm<T>(T(1), ccolmajor(Y + r0, b, l, p), false, Xv, false, T(0), colmajor(tmp, b, l, b));
      for (i64 j = 0; j < l; ++j) std::copy(tmp + j * b, tmp + (j + 1) * b, Y + r0 + j * p);
    }
  }
  return true;
}

// One CholeskyQR pass. shift_mode: 0 none, 1 small, 2 Fukaya's bound. Returns false when potrf
// breaks down (Y untouched then) or the Gram matrix is not finite. dev receives ||G - I||_F.
template <class T>
bool cholqr_pass(T* Y, i64 p, i64 l, std::vector<T>& G, std::vector<T>& work, int shift_mode,
                 double* dev) {
  G.assign(static_cast<size_t>(l * l), T(0));
  blas::syrk<T>(true, true, l, p, T(1), Y, p, T(0), G.data(), l);
  double trace = 0, inf_norm = 0, d = 0;
  for (i64 j = 0; j < l; ++j) {
    double row = 0;
    for (i64 i = 0; i < l; ++i) {
      const double g = i <= j ? G[i + j * l] : G[j + i * l];  // upper triangle only
      row += std::abs(g);
      const double e = g - (i == j ? 1.0 : 0.0);
      d += e * e;
    }
    inf_norm = std::max(inf_norm, row);
    trace += G[j + j * l];
  }
  if (!std::isfinite(inf_norm) || trace <= 0) return false;
  if (dev) *dev = std::sqrt(d);
  if (shift_mode) {
    const double u = std::numeric_limits<T>::epsilon() / 2;
    const double norm2 = std::min(trace, inf_norm);  // bounds ||Y||_2^2 from above
    const double c = shift_mode == 1 ? double(p + l) : 11.0 * double(p * l + l * (l + 1));
    const T s = static_cast<T>(c * u * norm2);
    for (i64 j = 0; j < l; ++j) G[j + j * l] += s;
  }
  if (blas::potrf_upper<T>(l, G.data(), l) != 0) return false;
  for (i64 j = 0; j < l; ++j)
    if (!(G[j + j * l] > T(0))) return false;
  if (l <= kInverseMaxCols) return right_multiply_by_inverse(Y, p, l, G, work);
  blas::trsm<T>(false, true, false, false, p, l, T(1), G.data(), l, Y, p);
  return true;
}

}  // namespace

template <class T>
void orthonormalize(T* Y, i64 p, i64 l) {
  if (p == 0 || l == 0) return;
  if (l > p) throw std::invalid_argument("orthonormalize: more columns than rows");
  const blas::SingleThreadScope one_thread(double(p) * l * l);  // small: blas.hpp
  std::vector<T> G, work;
  double dev = 0;
  if (!cholqr_pass(Y, p, l, G, work, 1, nullptr) && !cholqr_pass(Y, p, l, G, work, 2, nullptr))
    return householder(Y, p, l);
  if (!cholqr_pass(Y, p, l, G, work, 0, &dev)) return householder(Y, p, l);
  if (dev <= 0.5) return;  // pass 2 started near-orthonormal: orthogonal to O(u) now
  // Pass 3 must start near-orthonormal; otherwise the Cholesky route has not converged
  // (a block of pure rounding noise can do that) and Householder finishes the job.
  if (!cholqr_pass(Y, p, l, G, work, 0, &dev) || dev > 0.5) return householder(Y, p, l);
}

template <class T>
void condition(T* Y, i64 p, i64 l) {
  if (p == 0 || l == 0) return;
  const blas::SingleThreadScope one_thread(double(p) * l * l);  // small: blas.hpp
  std::vector<T> G, work;
  if (!cholqr_pass(Y, p, l, G, work, 1, nullptr) && !cholqr_pass(Y, p, l, G, work, 2, nullptr))
    return householder(Y, p, l);
  // The shifted pass leaves cond(Y) up to ~ (shift / ||Y||^2)^-1/2 (~100 in float32); without
  // a second pass those directions would shrink a little more with every power pass.
  if (!cholqr_pass(Y, p, l, G, work, 0, nullptr)) householder(Y, p, l);
}

template <class T>
void lu_normalize(T* Y, i64 p, i64 l) {
  if (p == 0 || l == 0) return;
  const blas::SingleThreadScope one_thread(double(p) * l * l);  // small: blas.hpp
  std::vector<i64> ipiv(static_cast<size_t>(std::min(p, l)));
  blas::getrf<T>(p, l, Y, p, ipiv.data());  // info > 0 (singular U) still leaves a finite L
  for (i64 j = 0; j < l; ++j) {              // keep the unit lower trapezoid L
    for (i64 i = 0; i < std::min(j, p); ++i) Y[i + j * p] = T(0);
    if (j < p) Y[j + j * p] = T(1);
  }
  for (i64 i = std::min(p, l) - 1; i >= 0; --i) {  // P L: undo the row interchanges
    const i64 r = ipiv[i] - 1;
    if (r != i)
      for (i64 j = 0; j < l; ++j) std::swap(Y[i + j * p], Y[r + j * p]);
  }
}

template <class T>
void rescale(T* Y, i64 count) {
  T mx = 0;
  for (i64 i = 0; i < count; ++i) mx = std::max(mx, std::abs(Y[i]));
  if (mx > T(0) && std::isfinite(mx)) {
    const T inv = T(1) / mx;
    for (i64 i = 0; i < count; ++i) Y[i] *= inv;
  }
}

template <class T>
void project_out(const T* Q, i64 p, i64 c, T* Y, i64 l, std::vector<T>& tmp, int rounds) {
  if (c == 0 || l == 0) return;
  const blas::SingleThreadScope one_thread(double(p) * c * l);  // small: blas.hpp
  tmp.resize(static_cast<size_t>(c * l));
  auto Qv = ccolmajor(Q, p, c, p);
  auto Yv = colmajor(Y, p, l, p);
  auto Cv = colmajor(tmp.data(), c, l, c);
  for (int round = 0; round < rounds; ++round) {
    blas::gemm<T>(T(1), Qv, true, Yv.as_const(), false, T(0), Cv);
    blas::gemm<T>(T(-1), Qv, false, Cv.as_const(), false, T(1), Yv);
  }
}

template <class T>
T worst_overlap(const T* Q, i64 p, i64 c, const T* Y, i64 l, std::vector<T>& tmp) {
  tmp.resize(static_cast<size_t>(c * l));
  blas::gemm<T>(T(1), ccolmajor(Q, p, c, p), true, ccolmajor(Y, p, l, p), false, T(0),
                colmajor(tmp.data(), c, l, c));
  T worst = 0;
  for (T v : tmp) worst = std::max(worst, std::abs(v));
  return worst;
}

template <class T>
void orthonormalize_against(const T* Q, i64 p, i64 c, T* Y, i64 l, std::vector<T>& tmp) {
  if (c == 0) return orthonormalize(Y, p, l);
  if (c + l > p) throw std::invalid_argument("orthonormalize_against: more columns than rows");
  const blas::SingleThreadScope one_thread(double(p) * (c + l) * l);  // small: blas.hpp
  // The orthogonality a healthy pass reaches: max|Q^T Y| is O(u) whatever p (the rounding left
  // by the projection, a vector of norm ~u; measured <= 0.8 eps for p from 100 to 4096 in both
  // precisions). Anything above shows in the result, since A - Q Q^T A grows like
  // max|Q^T Y| ||A||: a limit of 64 eps sqrt(p) let 650 eps residuals through.
  const T limit = T(4) * std::numeric_limits<T>::epsilon();
  // "Twice is enough" when (I - Q Q^T) Y is well conditioned. When Y lies (numerically) inside
  // range(Q), as in an exhausted Krylov space or a rank-deficient M, the first pass leaves
  // normalized rounding noise with O(1) components along Q, the second can leave hundreds of
  // eps, and a third pass starts from an orthonormal block: one more round then (cheap,
  // BLAS-3), and Householder completion of [Q Y] if even that does not reach the limit.
  for (int pass = 0; pass < 3; ++pass) {
    project_out(Q, p, c, Y, l, tmp, 1);
    orthonormalize(Y, p, l);
    if (pass >= 1 && worst_overlap(Q, p, c, Y, l, tmp) <= limit) return;
  }
  std::vector<T> F(static_cast<size_t>(p * (c + l)));
  std::copy(Q, Q + p * c, F.begin());
  std::copy(Y, Y + p * l, F.begin() + p * c);
  householder(F.data(), p, c + l);
  std::copy(F.begin() + p * c, F.end(), Y);
}

namespace {

// The sweeps of fix_signs over one row of U (entries x[j * cs]): the running column maxima of
// |U| and the signed entries where they were found; the sign flips (neg[j]: column j flips).
// cs == 1 is the case rsvd's row-major U takes, written apart so that it vectorizes.
template <class T>
void max_row(const T* x, i64 cs, i64 k, T* big, T* val) {
  auto step = [&](i64 j, T v) {
    const T a = std::abs(v);
    const bool gt = a > big[j];  // strictly: the first row keeps a tie; a NaN never wins
    big[j] = gt ? a : big[j];
    val[j] = gt ? v : val[j];
  };
  if (cs == 1)
    for (i64 j = 0; j < k; ++j) step(j, x[j]);
  else
    for (i64 j = 0; j < k; ++j) step(j, x[j * cs]);
}

template <class T>
void flip_row(T* x, i64 cs, i64 k, const unsigned char* neg) {
  if (cs == 1)
    for (i64 j = 0; j < k; ++j) x[j] = neg[j] ? -x[j] : x[j];
  else
    for (i64 j = 0; j < k; ++j) x[j * cs] = neg[j] ? -x[j * cs] : x[j * cs];
}

}  // namespace

template <class T>
void fix_signs(Mat<T> U, Mat<T> Vt) {
  const i64 k = U.cols;
  if (U.rows == 0 || k == 0) return;
  // Row by row (rsvd's U is row-major: a walk down a column touches a cache line per entry).
  std::vector<T> big(static_cast<size_t>(k), T(-1)), val(static_cast<size_t>(k), T(0));
  for (i64 i = 0; i < U.rows; ++i) max_row(&U(i, 0), U.cs, k, big.data(), val.data());
  std::vector<unsigned char> neg(static_cast<size_t>(k), 0);
  bool any = false;
  for (i64 j = 0; j < k; ++j) any |= (neg[j] = val[j] < T(0)) != 0;
  if (!any) return;
  for (i64 i = 0; i < U.rows; ++i) flip_row(&U(i, 0), U.cs, k, neg.data());
  for (i64 j = 0; j < k; ++j)
    if (neg[j])
      for (i64 i = 0; i < Vt.cols; ++i) Vt(j, i) = -Vt(j, i);
}

#define RSLORA_INSTANTIATE(T)                                              \
  template void orthonormalize<T>(T*, i64, i64);                           \
  template void lu_normalize<T>(T*, i64, i64);                             \
  template void condition<T>(T*, i64, i64);                                \
  template void rescale<T>(T*, i64);                                       \
  template void project_out<T>(const T*, i64, i64, T*, i64, std::vector<T>&, int); \
  template void orthonormalize_against<T>(const T*, i64, i64, T*, i64, std::vector<T>&); \
  template void fix_signs<T>(Mat<T>, Mat<T>);
RSLORA_INSTANTIATE(float)
RSLORA_INSTANTIATE(double)
#undef RSLORA_INSTANTIATE

}  // namespace rslora::detail
