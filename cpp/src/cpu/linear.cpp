#include "rslora/linear.hpp"

#include <vector>

#include "rslora/blas.hpp"

namespace rslora {

template <class T>
void lora_linear(Mat<const T> x, Mat<const T> W, Mat<const T> A, Mat<const T> B,
                 const Vec<const T>* bias, T s, Mat<T> y, Mat<T> xa) {
  T beta = T(0);
  if (bias) {  // y starts as the bias, then the base GEMM accumulates onto it
    for (i64 i = 0; i < y.rows; ++i)
      for (i64 j = 0; j < y.cols; ++j) y(i, j) = (*bias)[j];
    beta = T(1);
  }
  blas::gemm<T>(T(1), x, false, W, true, beta, y);  // y (+)= x W^T
  if (A.rows == 0) return;                           // r = 0: the LoRA term is an empty sum
  blas::gemm<T>(T(1), x, false, A, true, T(0), xa);  // xa = x A^T       (shrink)
  if (s == T(0)) {
    // BLAS skips op(A) op(B) when alpha == 0; IEEE (and the NumPy expression) say 0 * Inf = NaN.
    std::vector<T> zero(static_cast<size_t>(xa.rows * xa.cols));
    for (i64 i = 0; i < xa.rows; ++i)
      for (i64 j = 0; j < xa.cols; ++j) zero[i * xa.cols + j] = T(0) * xa(i, j);
    Mat<const T> z{zero.data(), xa.rows, xa.cols, xa.cols, 1};
    blas::gemm<T>(T(1), z, false, B, true, T(1), y);
    return;
  }
  blas::gemm<T>(s, xa.as_const(), false, B, true, T(1), y);  // y += s xa B^T  (expand)
}

template <class T>
void merge(Mat<T> W, Mat<const T> A, Mat<const T> B, T s) {
  if (s == T(0) && !A.empty()) {  // as in lora_linear: keep 0 * Inf = NaN, which BLAS would skip
    std::vector<T> zero(static_cast<size_t>(B.rows * B.cols));
    for (i64 i = 0; i < B.rows; ++i)
      for (i64 j = 0; j < B.cols; ++j) zero[i * B.cols + j] = T(0) * B(i, j);
    blas::gemm<T>(T(1), Mat<const T>{zero.data(), B.rows, B.cols, B.cols, 1}, false, A, false,
                  T(1), W);
    return;
  }
  blas::gemm<T>(s, B, false, A, false, T(1), W);
}

template void lora_linear<float>(Mat<const float>, Mat<const float>, Mat<const float>,
                                 Mat<const float>, const Vec<const float>*, float, Mat<float>,
                                 Mat<float>);
template void lora_linear<double>(Mat<const double>, Mat<const double>, Mat<const double>,
                                  Mat<const double>, const Vec<const double>*, double,
                                  Mat<double>, Mat<double>);
template void merge<float>(Mat<float>, Mat<const float>, Mat<const float>, float);
template void merge<double>(Mat<double>, Mat<const double>, Mat<const double>, double);

}  // namespace rslora
