// syrk, trsm and trmm through CBLAS (column-major), for CholeskyQR in the randomized SVD.
#include <climits>
#include <stdexcept>
#include <string>

#include "rslora/blas.hpp"

namespace rslora::blas {
namespace {

constexpr int kColMajor = 102, kNoTrans = 111, kTrans = 112, kUpper = 121, kLower = 122,
              kNonUnit = 131, kUnit = 132, kLeft = 141, kRight = 142;

template <class T> std::string pre();
template <> std::string pre<float>() { return "s"; }
template <> std::string pre<double>() { return "d"; }

template <class F>
F cblas(const std::string& name) {
  auto f = reinterpret_cast<F>(symbol(name, true));
  if (!f) throw std::runtime_error("BLAS library lacks " + name);
  return f;
}

template <class I>
I narrow(i64 v) {
  if (sizeof(I) == 4 && v > INT_MAX)
    throw std::invalid_argument("matrix dimension exceeds the 32-bit BLAS interface");
  return static_cast<I>(v);
}

template <class T, class I>
void syrk_i(bool upper, bool trans, i64 n, i64 k, T alpha, const T* a, i64 lda, T beta, T* c, i64 ldc) {
  using fn = void (*)(int, int, int, I, I, T, const T*, I, T, T*, I);
  auto f = cblas<fn>("cblas_" + pre<T>() + "syrk");
  f(kColMajor, upper ? kUpper : kLower, trans ? kTrans : kNoTrans, narrow<I>(n), narrow<I>(k),
    alpha, a, narrow<I>(lda), beta, c, narrow<I>(ldc));
}

template <class T, class I>
void trsm_i(bool left, bool upper, bool trans, bool unit, i64 m, i64 n, T alpha, const T* a, i64 lda,
            T* b, i64 ldb) {
  using fn = void (*)(int, int, int, int, int, I, I, T, const T*, I, T*, I);
  auto f = cblas<fn>("cblas_" + pre<T>() + "trsm");
  f(kColMajor, left ? kLeft : kRight, upper ? kUpper : kLower, trans ? kTrans : kNoTrans,
    unit ? kUnit : kNonUnit, narrow<I>(m), narrow<I>(n), alpha, a, narrow<I>(lda), b, narrow<I>(ldb));
}

template <class T, class I>
void trmm_i(bool left, bool upper, bool trans, bool unit, i64 m, i64 n, T alpha, const T* a, i64 lda,
            T* b, i64 ldb) {
  using fn = void (*)(int, int, int, int, int, I, I, T, const T*, I, T*, I);
  auto f = cblas<fn>("cblas_" + pre<T>() + "trmm");
  f(kColMajor, left ? kLeft : kRight, upper ? kUpper : kLower, trans ? kTrans : kNoTrans,
    unit ? kUnit : kNonUnit, narrow<I>(m), narrow<I>(n), alpha, a, narrow<I>(lda), b, narrow<I>(ldb));
}

}  // namespace

template <class T>
void syrk(bool upper, bool trans, i64 n, i64 k, T alpha, const T* a, i64 lda, T beta, T* c, i64 ldc) {
  if (n == 0) return;
  if (info().int64)
    syrk_i<T, long long>(upper, trans, n, k, alpha, a, lda, beta, c, ldc);
  else
    syrk_i<T, int>(upper, trans, n, k, alpha, a, lda, beta, c, ldc);
}

template <class T>
void trsm(bool left, bool upper, bool trans, bool unit_diag, i64 m, i64 n, T alpha, const T* a,
          i64 lda, T* b, i64 ldb) {
  if (m == 0 || n == 0) return;
  if (info().int64)
    trsm_i<T, long long>(left, upper, trans, unit_diag, m, n, alpha, a, lda, b, ldb);
  else
    trsm_i<T, int>(left, upper, trans, unit_diag, m, n, alpha, a, lda, b, ldb);
}

template <class T>
void trmm(bool left, bool upper, bool trans, bool unit_diag, i64 m, i64 n, T alpha, const T* a,
          i64 lda, T* b, i64 ldb) {
  if (m == 0 || n == 0) return;
  if (info().int64)
    trmm_i<T, long long>(left, upper, trans, unit_diag, m, n, alpha, a, lda, b, ldb);
  else
    trmm_i<T, int>(left, upper, trans, unit_diag, m, n, alpha, a, lda, b, ldb);
}

template void syrk<float>(bool, bool, i64, i64, float, const float*, i64, float, float*, i64);
template void syrk<double>(bool, bool, i64, i64, double, const double*, i64, double, double*, i64);
template void trsm<float>(bool, bool, bool, bool, i64, i64, float, const float*, i64, float*, i64);
template void trsm<double>(bool, bool, bool, bool, i64, i64, double, const double*, i64, double*, i64);
template void trmm<float>(bool, bool, bool, bool, i64, i64, float, const float*, i64, float*, i64);
template void trmm<double>(bool, bool, bool, bool, i64, i64, double, const double*, i64, double*, i64);

}  // namespace rslora::blas
