// gemm on strided views: reads any view BLAS can read as is (unit stride on one axis), copies the rest.
#include <algorithm>
#include <climits>
#include <stdexcept>
#include <vector>

#include "rslora/blas.hpp"

namespace rslora::blas {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

template <class T, class I>
using gemm_fn = void (*)(int, int, int, I, I, I, T, const T*, I, const T*, I, T, T*, I);

template <class T> const char* gemm_name();
template <> const char* gemm_name<float>() { return "cblas_sgemm"; }
template <> const char* gemm_name<double>() { return "cblas_dgemm"; }

// How BLAS can read a view: as row-major with leading dimension ld, or as the transpose of a
// row-major matrix (column-major storage). ok == false: it needs a copy.
struct Layout {
  bool ok = false;
  bool transposed = false;
  i64 ld = 0;
};

Layout layout_of(i64 rows, i64 cols, i64 rs, i64 cs) {
  if (rs < 0 || cs < 0) return {};
  if ((cs == 1 || cols <= 1) && (rows <= 1 || rs >= std::max<i64>(1, cols)))
    return {true, false, rows <= 1 ? std::max<i64>(1, cols) : rs};
  if ((rs == 1 || rows <= 1) && (cols <= 1 || cs >= std::max<i64>(1, rows)))
    return {true, true, cols <= 1 ? std::max<i64>(1, rows) : cs};
  return {};
}

template <class T>
Mat<const T> contiguous_copy(Mat<const T> m, std::vector<T>& buf) {
  buf.resize(static_cast<size_t>(m.rows * m.cols));
  for (i64 i = 0; i < m.rows; ++i)
    for (i64 j = 0; j < m.cols; ++j) buf[i * m.cols + j] = m(i, j);
  return {buf.data(), m.rows, m.cols, m.cols, 1};
}

template <class T, class I>
void call(bool ta, bool tb, i64 m, i64 n, i64 k, T alpha, const T* a, i64 lda, const T* b,
          i64 ldb, T beta, T* c, i64 ldc) {
  if constexpr (sizeof(I) == 4) {
    for (i64 v : {m, n, k, lda, ldb, ldc})
      if (v > INT_MAX)
        throw std::invalid_argument("matrix dimension exceeds the 32-bit BLAS interface");
  }
  auto f = reinterpret_cast<gemm_fn<T, I>>(symbol(gemm_name<T>(), true));
  if (!f) throw std::runtime_error(std::string("BLAS library lacks ") + gemm_name<T>());
  f(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, (I)m, (I)n, (I)k, alpha, a, (I)lda,
    b, (I)ldb, beta, c, (I)ldc);
}

// One output row (m == 1): c = alpha op(B)^T a + beta c as a GEMV. OpenBLAS runs a 1-row GEMM
// several times slower than the GEMV that reads the same matrix.
template <class T>
void gemm_row(T alpha, Mat<const T> A, bool ta, Mat<const T> B, bool tb, T beta, Mat<T> C) {
  const i64 k = ta ? A.rows : A.cols;
  Vec<const T> a{A.data, k, ta ? A.rs : A.cs};
  gemv<T>(alpha, B, !tb, a, beta, Vec<T>{C.data, C.cols, C.cs});
}

// 0 * P in a contiguous copy: zeros where P is finite, NaN where it holds NaN or Inf.
template <class T>
Mat<const T> times_zero(Mat<const T> P, std::vector<T>& buf) {
  buf.resize(static_cast<size_t>(P.rows * P.cols));
  for (i64 i = 0; i < P.rows; ++i)
    for (i64 j = 0; j < P.cols; ++j) buf[i * P.cols + j] = T(0) * P(i, j);
  return {buf.data(), P.rows, P.cols, P.cols, 1};
}

template <class T>
void scale_in_place(Mat<T> C, T beta) {
  for (i64 i = 0; i < C.rows; ++i)
    for (i64 j = 0; j < C.cols; ++j) C(i, j) = beta == T(0) ? T(0) : beta * C(i, j);
}

}  // namespace

void check_fits(std::initializer_list<i64> values) {
  if (info().int64) return;
  for (i64 v : values)
    if (v > INT_MAX || v < -INT_MAX)
      throw std::invalid_argument("matrix dimension or stride exceeds the 32-bit BLAS interface");
}

template <class T>
void gemm(T alpha, Mat<const T> A, bool ta, Mat<const T> B, bool tb, T beta, Mat<T> C) {
  const i64 m = C.rows, n = C.cols;
  const i64 k = ta ? A.rows : A.cols;
  if ((ta ? A.cols : A.rows) != m || (tb ? B.rows : B.cols) != n || (tb ? B.cols : B.rows) != k)
    throw std::invalid_argument("gemm: inconsistent operand shapes");
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_in_place(C, beta);
  if (alpha == T(0)) {  // (0 A) B, with 0 A the smaller copy: NaN/Inf reach C (see blas.hpp)
    std::vector<T> zero;
    if (A.rows * A.cols <= B.rows * B.cols) return gemm(T(1), times_zero(A, zero), ta, B, tb, beta, C);
    return gemm(T(1), A, ta, times_zero(B, zero), tb, beta, C);
  }
  if (m == 1 && C.cs >= 1) return gemm_row(alpha, A, ta, B, tb, beta, C);
  if (n == 1 && C.rs >= 1) return gemm_row(alpha, B, !tb, A, !ta, beta, C.t());

  Layout lc = layout_of(C.rows, C.cols, C.rs, C.cs);
  if (!lc.ok) {  // write through a contiguous buffer
    std::vector<T> buf(static_cast<size_t>(m * n));
    Mat<T> tmp{buf.data(), m, n, n, 1};
    if (beta != T(0))
      for (i64 i = 0; i < m; ++i)
        for (i64 j = 0; j < n; ++j) tmp(i, j) = C(i, j);
    gemm(alpha, A, ta, B, tb, beta, tmp);
    for (i64 i = 0; i < m; ++i)
      for (i64 j = 0; j < n; ++j) C(i, j) = tmp(i, j);
    return;
  }
  if (lc.transposed) {  // C^T = op(B)^T op(A)^T, and C^T is row-major
    return gemm(alpha, B, !tb, A, !ta, beta, C.t());
  }
  std::vector<T> abuf, bbuf;
  Layout la = layout_of(A.rows, A.cols, A.rs, A.cs);
  if (!la.ok) {
    A = contiguous_copy(A, abuf);
    la = layout_of(A.rows, A.cols, A.rs, A.cs);
  }
  Layout lb = layout_of(B.rows, B.cols, B.rs, B.cs);
  if (!lb.ok) {
    B = contiguous_copy(B, bbuf);
    lb = layout_of(B.rows, B.cols, B.rs, B.cs);
  }
  const bool eff_ta = ta != la.transposed, eff_tb = tb != lb.transposed;
  if (info().int64)
    call<T, long long>(eff_ta, eff_tb, m, n, k, alpha, A.data, la.ld, B.data, lb.ld, beta, C.data, lc.ld);
  else
    call<T, int>(eff_ta, eff_tb, m, n, k, alpha, A.data, la.ld, B.data, lb.ld, beta, C.data, lc.ld);
}

template void gemm<float>(float, Mat<const float>, bool, Mat<const float>, bool, float, Mat<float>);
template void gemm<double>(double, Mat<const double>, bool, Mat<const double>, bool, double, Mat<double>);

}  // namespace rslora::blas
