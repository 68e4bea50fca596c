#include "rslora/linear.hpp"

#include "rslora/blas.hpp"

namespace rslora {

template <class T>
void lora_linear(Mat<const T> x, Mat<const T> W, Mat<const T> A, Mat<const T> B,
                 const Vec<const T>* bias, T s, Mat<T> y, Mat<T> xa) {
  // What BLAS could refuse, before y is written (the bias goes in first).
  blas::check_fits({x.rows, x.cols, y.cols, A.rows, x.rs, x.cs, W.rs, W.cs, A.rs, A.cs, B.rs,
                    B.cs, y.rs, y.cs, xa.rs, xa.cs});
  T beta = T(0);
  if (bias) {  // y starts as the bias, then the base GEMM accumulates onto it
    for (i64 i = 0; i < y.rows; ++i)
      for (i64 j = 0; j < y.cols; ++j) y(i, j) = (*bias)[j];
    beta = T(1);
  }
  blas::gemm<T>(T(1), x, false, W, true, beta, y);  // y (+)= x W^T
  if (A.rows == 0) return;                           // r = 0: the LoRA term is an empty sum
  blas::gemm<T>(T(1), x, false, A, true, T(0), xa);  // xa = x A^T       (shrink)
  blas::gemm<T>(s, xa.as_const(), false, B, true, T(1), y);  // y += s xa B^T  (expand; s == 0
                                                             // keeps NaN/Inf, as NumPy does)
}

template <class T>
void merge(Mat<T> W, Mat<const T> A, Mat<const T> B, T s) {
  blas::check_fits({W.rows, W.cols, A.rows, W.rs, W.cs, A.rs, A.cs, B.rs, B.cs});
  if (A.empty()) return;  // r = 0
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
