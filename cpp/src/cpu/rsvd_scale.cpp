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
#include <type_traits>

#include "multi_kernels.hpp"  // RSLORA_HAVE_X86_KERNELS
#include "rsvd_kernels.hpp"
#include "rslora/kernel_path.hpp"
#include "rslora/sizes.hpp"

namespace rslora::detail {
namespace {

// One read of M: max|M| and ||M||_F^2 (float64 sums). NaN/Inf need no test of their own: they
// make the sum of squares NaN/Inf. A contiguous line is read kLanes entries at a time into as
// many float64 sums and maxima (entry i to lane i % kLanes), folded by the same tree at its end:
// plain loops that GCC vectorizes (4 AVX-512 / 8 AVX2 registers of sums, enough independent
// chains to keep up with the memory stream), compiled once per kernel path, and every path adds
// the same numbers in the same order: the same bits everywhere (a float32 entry's square is exact
// in float64, so an FMA the AVX-512 copy may contract it into rounds as the add alone).
constexpr int kLanes = 32;

#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline void scan_line(const float* x, i64 n, float& mx, double& ss) {
  float m[kLanes] = {};
  double s[kLanes] = {};
  i64 i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float a = std::fabs(x[i + j]);
      m[j] = a > m[j] ? a : m[j];  // a NaN lane keeps m (the sum flags it)
      const double d = double(x[i + j]);
      s[j] += d * d;
    }
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) {
      s[j] += s[j + w];
      m[j] = m[j + w] > m[j] ? m[j + w] : m[j];
    }
  mx = m[0] > mx ? m[0] : mx;
  ss += s[0];
  for (; i < n; ++i) {
    const float a = std::fabs(x[i]);
    mx = a > mx ? a : mx;
    ss += double(x[i]) * double(x[i]);
  }
}

void scan_line_baseline(const float* x, i64 n, float& mx, double& ss) { scan_line(x, n, mx, ss); }
#if RSLORA_HAVE_X86_KERNELS
__attribute__((target("avx2"))) void scan_line_avx2(const float* x, i64 n, float& mx, double& ss) {
  scan_line(x, n, mx, ss);
}
__attribute__((target("avx512f"))) void scan_line_avx512(const float* x, i64 n, float& mx,
                                                          double& ss) {
  scan_line(x, n, mx, ss);
}
#endif

// The kernel path's copy of scan_line (rslora/kernel_path.hpp).
using ScanLine = void (*)(const float*, i64, float&, double&);
ScanLine scan_line_for_path() {
#if RSLORA_HAVE_X86_KERNELS
  switch (kernel_path()) {
    case KernelPath::avx512: return scan_line_avx512;
    case KernelPath::avx2: return scan_line_avx2;
    case KernelPath::baseline: break;
  }
#endif
  return scan_line_baseline;
}

// float64 M: the baseline loop (a float64 square is not exact: an FMA would change its bits), 4
// lanes folded as (0 + 2) + (1 + 3).
void scan_line_f64(const double* x, i64 n, double& mx, double& ss) {
  double m[4] = {}, s[4] = {};
  i64 i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) {
      const double a = std::fabs(x[i + j]);
      m[j] = a > m[j] ? a : m[j];
      s[j] += x[i + j] * x[i + j];
    }
  for (int j = 0; j < 4; ++j) mx = m[j] > mx ? m[j] : mx;
  ss += (s[0] + s[2]) + (s[1] + s[3]);
  for (; i < n; ++i) {
    const double a = std::fabs(x[i]);
    mx = a > mx ? a : mx;
    ss += x[i] * x[i];
  }
}

template <class T>
auto scan_for() {
  if constexpr (std::is_same_v<T, float>)
    return scan_line_for_path();
  else
    return &scan_line_f64;
}

template <class T>
T max_abs(Mat<const T> M, bool* finite, double* sumsq) {
  const bool rows_inner = std::abs(M.cs) <= std::abs(M.rs);
  const i64 outer = rows_inner ? M.rows : M.cols, inner = rows_inner ? M.cols : M.rows;
  const i64 step = rows_inner ? M.cs : M.rs;
  T mx = 0;
  double ss = 0;
  if (step == 1) {
    const auto scan = scan_for<T>();
    for (i64 o = 0; o < outer; ++o) scan(rows_inner ? &M(o, 0) : &M(0, o), inner, mx, ss);
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
  const double smax = double(*std::max_element(S, S + k));
  if (std::ldexp(smax, -exp) > double(std::numeric_limits<T>::max())) {
    // printed from its log: for float64 the value itself is beyond any double
    const double lg = std::log10(smax) - exp * std::log10(2.0), e = std::floor(lg);
    throw std::invalid_argument(
        std::string("the singular values of M overflow ") + (sizeof(T) == 4 ? "float32" : "float64") +
        " (the largest is ~" + sci(std::pow(10.0, lg - e)) + "e+" + std::to_string(int(e)) + "): " +
        (sizeof(T) == 4 ? "compute in float64 (M.astype(numpy.float64))"
                        : "no float64 holds them; divide M by a constant first (and multiply S by it)"));
  }
  for (i64 i = 0; i < k; ++i) S[i] = std::ldexp(S[i], -exp);
}

template struct Rescaled<float>;
template struct Rescaled<double>;

}  // namespace rslora::detail
