// gemv on strided views: A read as it is when one axis has unit stride, copied otherwise.
#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>
#include <vector>

#include "rslora/blas.hpp"

namespace rslora::blas {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

template <class T, class I>
using gemv_fn = void (*)(int, int, I, I, T, const T*, I, const T*, I, T, T*, I);

template <class T> const char* gemv_name();
template <> const char* gemv_name<float>() { return "cblas_sgemv"; }
template <> const char* gemv_name<double>() { return "cblas_dgemv"; }

template <class T, class I>
void call(bool trans, i64 m, i64 n, T alpha, const T* a, i64 lda, const T* x, i64 incx, T beta,
          T* y, i64 incy) {
  if constexpr (sizeof(I) == 4) {
    for (i64 v : {m, n, lda, incx, incy})
      if (v > INT_MAX)
        throw std::invalid_argument("matrix dimension exceeds the 32-bit BLAS interface");
  }
  // looked up once per process and type: the decode path calls this per row
  static auto f = reinterpret_cast<gemv_fn<T, I>>(symbol(gemv_name<T>(), true));
  if (!f) throw std::runtime_error(std::string("BLAS library lacks ") + gemv_name<T>());
  f(kRowMajor, trans ? kTrans : kNoTrans, (I)m, (I)n, alpha, a, (I)lda, x, (I)incx, beta, y,
    (I)incy);
}

}  // namespace

template <class T>
void gemv(T alpha, Mat<const T> A, bool ta, Vec<const T> x, T beta, Vec<T> y) {
  const i64 m = ta ? A.cols : A.rows, k = ta ? A.rows : A.cols;
  if (x.size != k || y.size != m) throw std::invalid_argument("gemv: inconsistent operand shapes");
  if (m == 0) return;
  if (k == 0) {
    for (i64 i = 0; i < m; ++i) y[i] = beta == T(0) ? T(0) : beta * y[i];
    return;
  }
  std::vector<T> buf;
  // Express A as row-major (rows, cols, ld) or as the transpose of a row-major matrix.
  bool trans = ta;
  i64 rows = A.rows, cols = A.cols, ld;
  const T* data = A.data;
  const i64 rmax = std::max<i64>(1, A.rows), cmax = std::max<i64>(1, A.cols);
  if ((A.cs == 1 || A.cols == 1) && (A.rows <= 1 || A.rs >= cmax)) {
    ld = A.rows <= 1 ? cmax : A.rs;
  } else if ((A.rs == 1 || A.rows == 1) && (A.cols <= 1 || A.cs >= rmax)) {
    trans = !ta, rows = A.cols, cols = A.rows, ld = A.cols <= 1 ? rmax : A.cs;
  } else {  // e.g. broadcast (zero) strides: BLAS cannot read it, so copy
    buf.resize(static_cast<size_t>(A.rows * A.cols));
    for (i64 i = 0; i < A.rows; ++i)
      for (i64 j = 0; j < A.cols; ++j) buf[i * A.cols + j] = A(i, j);
    data = buf.data(), ld = cmax;
  }
  std::vector<T> xbuf;
  if (x.size == 1) x.stride = 1;
  if (y.size == 1) y.stride = 1;
  if (alpha == T(0)) {  // A (0 x): BLAS would skip the product and drop NaN/Inf (see blas.hpp)
    xbuf.resize(static_cast<size_t>(x.size));
    for (i64 i = 0; i < x.size; ++i) xbuf[i] = T(0) * x[i];
    x = {xbuf.data(), x.size, 1};
    alpha = T(1);
  } else if (x.stride < 1) {  // broadcast or reversed: BLAS wants incx >= 1 (and walks negative ones backward)
    xbuf.resize(static_cast<size_t>(x.size));
    for (i64 i = 0; i < x.size; ++i) xbuf[i] = x[i];
    x = {xbuf.data(), x.size, 1};
  }
  Vec<T> out = y;
  std::vector<T> ybuf;
  if (y.stride < 1) {  // reversed (or broadcast) y: work in a unit-stride copy, written back below
    ybuf.resize(static_cast<size_t>(y.size));
    if (beta != T(0))
      for (i64 i = 0; i < y.size; ++i) ybuf[i] = y[i];
    out = {ybuf.data(), y.size, 1};
  }
  if (info().int64)
    call<T, long long>(trans, rows, cols, alpha, data, ld, x.data, x.stride, beta, out.data, out.stride);
  else
    call<T, int>(trans, rows, cols, alpha, data, ld, x.data, x.stride, beta, out.data, out.stride);
  if (!ybuf.empty())
    for (i64 i = 0; i < y.size; ++i) y[i] = ybuf[i];
}

template void gemv<float>(float, Mat<const float>, bool, Vec<const float>, float, Vec<float>);
template void gemv<double>(double, Mat<const double>, bool, Vec<const double>, double, Vec<double>);

}  // namespace rslora::blas
