#include "rslora/backward.hpp"

#include <vector>

#include "rslora/blas.hpp"
#include "rslora/sizes.hpp"

namespace rslora {

template <class T>
void lora_linear_backward(Mat<const T> dy, Mat<const T> x, Mat<const T> W, Mat<const T> A,
                          Mat<const T> B, T s, const Mat<const T>* xa, Mat<T>* dx, Mat<T>* dA,
                          Mat<T>* dB) {
  const i64 n = dy.rows, r = A.rows;
  blas::check_fits({n, r, x.cols, dy.cols, dy.rs, dy.cs, x.rs, x.cs, W.rs, W.cs, A.rs, A.cs,
                    B.rs, B.cs});
  checked_size({n, r}, "dy B", sizeof(T));  // the scratch below
  // g = s dy B (n, r): shared by dx and dA; s folded in here so later GEMMs need no extra pass.
  std::vector<T> gbuf;
  Mat<T> g{};
  if (dx || dA) {
    gbuf.resize(static_cast<size_t>(n * r));
    g = row_major(gbuf.data(), n, r);
    blas::gemm<T>(s, dy, false, B, false, T(0), g);
  }
  if (dx) {
    blas::gemm<T>(T(1), dy, false, W, false, T(0), *dx);         // dx  = dy W
    blas::gemm<T>(T(1), g.as_const(), false, A, false, T(1), *dx);  // dx += g A
  }
  if (dA) blas::gemm<T>(T(1), g.as_const(), true, x, false, T(0), *dA);  // dA = g^T x
  if (dB) {
    std::vector<T> xabuf;
    Mat<const T> xav;
    if (xa) {
      xav = *xa;
    } else {
      xabuf.resize(static_cast<size_t>(n * r));
      Mat<T> t = row_major(xabuf.data(), n, r);
      blas::gemm<T>(T(1), x, false, A, true, T(0), t);  // x A^T, as the forward makes it
      xav = t.as_const();
    }
    blas::gemm<T>(s, dy, true, xav, false, T(0), *dB);  // dB = s dy^T xa
  }
}

#define RSLORA_INSTANTIATE(T)                                                                  \
  template void lora_linear_backward<T>(Mat<const T>, Mat<const T>, Mat<const T>, Mat<const T>, \
                                        Mat<const T>, T, const Mat<const T>*, Mat<T>*, Mat<T>*, \
                                        Mat<T>*);
RSLORA_INSTANTIATE(float)
RSLORA_INSTANTIATE(double)
#undef RSLORA_INSTANTIATE

}  // namespace rslora
