// Power-of-two rescaling of M for the randomized SVD (see rsvd_kernels.hpp: Rescaled).
//
// The passes square what they compute (Gram matrices of CholeskyQR, ||M||_F^2 of rsvd_tol), so
// a float32 M whose entries pass ~1e19, or fall below ~1e-19, overflows or underflows inside
// the algorithm even when its singular values are representable: NaN out, or a "zero" M. When
// max|M| leaves the window where that cannot happen, the work is done on M * 2^e (exact: only
// the exponent changes), in a copy, and the singular values are scaled back by 2^-e.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "rsvd_kernels.hpp"
#include "rslora/sizes.hpp"

namespace rslora::detail {
namespace {

// One read of M: max|M| and ||M||_F^2 (float64 sums). NaN/Inf need no test of their own: they
// make the sum of squares NaN/Inf. The contiguous case uses SSE2 (part of every x86-64 CPU;
// the compiler does not vectorise these reductions by itself: ~9 instructions an element).
template <class T>
void scan_row_scalar(const T* x, i64 n, T& mx, double& ss) {
  for (i64 i = 0; i < n; ++i) {
    const T a = std::abs(x[i]);
    mx = a > mx ? a : mx;
    ss += double(x[i]) * double(x[i]);
  }
}

#if defined(__SSE2__)
void scan_row(const float* x, i64 n, float& mx, double& ss) {
  const __m128 sign = _mm_set1_ps(-0.0f);
  __m128 m0 = _mm_setzero_ps(), m1 = _mm_setzero_ps();
  __m128d s0 = _mm_setzero_pd(), s1 = _mm_setzero_pd(), s2 = _mm_setzero_pd(), s3 = _mm_setzero_pd();
  i64 i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128 a = _mm_loadu_ps(x + i), b = _mm_loadu_ps(x + i + 4);
    m0 = _mm_max_ps(_mm_andnot_ps(sign, a), m0);  // NaN lanes keep m (the sum flags them)
    m1 = _mm_max_ps(_mm_andnot_ps(sign, b), m1);
    const __m128d a0 = _mm_cvtps_pd(a), a1 = _mm_cvtps_pd(_mm_movehl_ps(a, a));
    const __m128d b0 = _mm_cvtps_pd(b), b1 = _mm_cvtps_pd(_mm_movehl_ps(b, b));
    s0 = _mm_add_pd(s0, _mm_mul_pd(a0, a0));
    s1 = _mm_add_pd(s1, _mm_mul_pd(a1, a1));
    s2 = _mm_add_pd(s2, _mm_mul_pd(b0, b0));
    s3 = _mm_add_pd(s3, _mm_mul_pd(b1, b1));
  }
  alignas(16) float m[4];
  alignas(16) double t[2];
  _mm_store_ps(m, _mm_max_ps(m0, m1));
  _mm_store_pd(t, _mm_add_pd(_mm_add_pd(s0, s1), _mm_add_pd(s2, s3)));
  for (float v : m) mx = v > mx ? v : mx;
  ss += t[0] + t[1];
  scan_row_scalar(x + i, n - i, mx, ss);
}

void scan_row(const double* x, i64 n, double& mx, double& ss) {
  const __m128d sign = _mm_set1_pd(-0.0);
  __m128d m0 = _mm_setzero_pd(), m1 = _mm_setzero_pd(), s0 = _mm_setzero_pd(), s1 = _mm_setzero_pd();
  i64 i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m128d a = _mm_loadu_pd(x + i), b = _mm_loadu_pd(x + i + 2);
    m0 = _mm_max_pd(_mm_andnot_pd(sign, a), m0);
    m1 = _mm_max_pd(_mm_andnot_pd(sign, b), m1);
    s0 = _mm_add_pd(s0, _mm_mul_pd(a, a));
    s1 = _mm_add_pd(s1, _mm_mul_pd(b, b));
  }
  alignas(16) double m[2], t[2];
  _mm_store_pd(m, _mm_max_pd(m0, m1));
  _mm_store_pd(t, _mm_add_pd(s0, s1));
  for (double v : m) mx = v > mx ? v : mx;
  ss += t[0] + t[1];
  scan_row_scalar(x + i, n - i, mx, ss);
}
#else
template <class T>
void scan_row(const T* x, i64 n, T& mx, double& ss) {
  scan_row_scalar(x, n, mx, ss);
}
#endif

template <class T>
T max_abs(Mat<const T> M, bool* finite, double* sumsq) {
  const bool rows_inner = std::abs(M.cs) <= std::abs(M.rs);
  const i64 outer = rows_inner ? M.rows : M.cols, inner = rows_inner ? M.cols : M.rows;
  const i64 step = rows_inner ? M.cs : M.rs;
  T mx = 0;
  double ss = 0;
  if (step == 1) {
    for (i64 o = 0; o < outer; ++o) scan_row(rows_inner ? &M(o, 0) : &M(0, o), inner, mx, ss);
  } else {
    for (i64 o = 0; o < outer; ++o)
      for (i64 i = 0; i < inner; ++i) {
        const T v = rows_inner ? M(o, i) : M(i, o);
        const T a = std::abs(v);
        mx = a > mx ? a : mx;
        ss += double(v) * double(v);
      }
  }
  *sumsq = ss;
  *finite = std::isfinite(ss);
  if (!*finite && std::isfinite(mx)) {  // float64 squares can overflow: is every entry finite?
    bool ok = true;
    for (i64 o = 0; o < outer && ok; ++o)
      for (i64 i = 0; i < inner; ++i) ok &= std::isfinite(rows_inner ? M(o, i) : M(i, o));
    *finite = ok;
  }
  return mx;
}

std::string sci(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

}  // namespace

template <class T>
Rescaled<T>::Rescaled(Mat<const T> M0, bool check_finite) : M(M0) {
  bool finite = true;
  const T amax = max_abs(M0, &finite, &sumsq);
  if (!finite) {
    if (check_finite)
      throw std::invalid_argument("M contains NaN or Inf (pass check_finite=False to skip this check)");
    return;  // NaN in, NaN out (documented for check_finite=False)
  }
  if (amax == T(0)) return;
  // Safe window: squares of ||M|| sized sums stay normal. size bounds how much a sum of
  // products can exceed max|M| (||M||_F <= max|M| sqrt(m n), times a Gaussian column's norm).
  using L = std::numeric_limits<T>;
  const double size = std::sqrt(double(M0.rows) * double(M0.cols) * double(std::max(M0.rows, M0.cols)));
  const double hi = std::ldexp(1.0, L::max_exponent / 2 - 8) / size;
  const double lo = std::ldexp(1.0, L::min_exponent / 2 + 4);
  if (double(amax) <= hi && double(amax) >= lo) return;
  exp = -std::ilogb(amax);  // max|M * 2^exp| in [1, 2)
  buf.resize(static_cast<size_t>(checked_size({M0.rows, M0.cols}, "M", sizeof(T))));
  double ss = 0;
  for (i64 i = 0; i < M0.rows; ++i)
    for (i64 j = 0; j < M0.cols; ++j) {
      const T v = std::ldexp(M0(i, j), exp);
      buf[i * M0.cols + j] = v;
      ss += double(v) * double(v);
    }
  M = {buf.data(), M0.rows, M0.cols, M0.cols, 1};
  sumsq = ss;
}

template <class T>
void Rescaled<T>::unscale(T* S, i64 k) const {
  if (exp == 0 || k == 0) return;
  const double top = std::ldexp(double(*std::max_element(S, S + k)), -exp);
  if (top > double(std::numeric_limits<T>::max()))
    throw std::invalid_argument(
        std::string("the singular values of M overflow ") + (sizeof(T) == 4 ? "float32" : "float64") +
        " (the largest is ~" + sci(top) + "): compute in float64 (M.astype(numpy.float64))");
  for (i64 i = 0; i < k; ++i) S[i] = std::ldexp(S[i], -exp);
}

template struct Rescaled<float>;
template struct Rescaled<double>;

}  // namespace rslora::detail
