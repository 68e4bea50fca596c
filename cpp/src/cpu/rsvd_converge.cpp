// The stopping rule of n_iter = "auto" (subspace iteration): has the rank-k approximation from
// the current basis reached (1 + eps) x the Eckart-Young optimum in relative Frobenius error?
//
// With Q orthonormal (p x L) and W = A^T Q, the Ritz values s_1 >= ... >= s_L are the singular
// values of W (= of B = Q^T A). The rank-k result U_k diag(s) V_k^T is the projection of A onto
// its top k left Ritz vectors, so exactly
//     err^2 = ||A||_F^2 - sum_{i<=k} s_i^2,   opt^2 = ||A||_F^2 - sum_{i<=k} sigma_i^2,
//     err^2 - opt^2 = gap = sum_{i<=k} (sigma_i^2 - s_i^2) >= 0       (s_i <= sigma_i).
// The contract err <= (1 + eps) opt is gap <= ((1 + eps)^2 - 1) opt^2. Neither sigma nor opt is
// known; both are estimated from what the passes already give, at O(q L^2) per pass:
// - gap: subspace iteration shrinks sigma_i^2 - s_i^2 by about rho_i = (sigma_{L+1} / sigma_i)^4
//   per iteration (Halko et al. 2011, Thm 9.2, squared). With the measured increase of s_i^2
//   between two iterations, d_i, the geometric tail gives gap_i ~= d_i rho_i / (1 - rho_i),
//   rho_i estimated by (s_L / s_i)^4 (capped at 0.95); and the total is taken no smaller than
//   the observed rate of the whole, inc(t) / inc(t-1), predicts.
// - opt^2: at least sum_{k<i<=L} s_i^2 (interlacing, a lower bound); and ||A||_F^2 - sum_{i<=k}
//   s_i^2 - gap where that difference is above its rounding noise (slowly decaying spectra).
// Each s_i^2 is trusted to a few units of rounding of s_i * s_1 (the error of W = A^T Q), and
// increases below that are not counted: they cannot be measured, and the result cannot hold
// the difference either.
// Where it can be missed: a spectrum whose decay changes after index L (the geometric model
// extrapolates from the first iterations), or a stagnating start (Ritz values that barely move
// for an iteration before they converge: an unlucky sketch, probability ~ exp(-oversample)).
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "rslora/blas.hpp"
#include "rsvd_kernels.hpp"

namespace rslora::detail {

template <class T>
void ritz_values(const T* W, i64 q, i64 L, std::vector<double>& G, std::vector<double>& Wd,
                 std::vector<double>& s) {
  s.assign(static_cast<size_t>(L), 0.0);
  if (L == 0) return;
  const blas::SingleThreadScope one_thread(double(q) * L * L);  // small: blas.hpp
  G.assign(static_cast<size_t>(L * L), 0.0);
  const double* Wp;
  if constexpr (std::is_same_v<T, double>) {
    Wp = W;
  } else {
    Wd.assign(W, W + q * L);
    Wp = Wd.data();
  }
  blas::syrk<double>(true, true, L, q, 1.0, Wp, q, 0.0, G.data(), L);
  std::vector<double> ev(static_cast<size_t>(L));
  blas::syevd<double>(L, G.data(), L, ev.data());  // ascending; vectors not used
  for (i64 i = 0; i < L; ++i) s[i] = std::sqrt(std::max(ev[L - 1 - i], 0.0));
}

template <class T>
bool rsvd_converged(const std::vector<double>& prev, const std::vector<double>& cur, i64 k,
                    double normA2, double eps, double* inc_prev) {
  const i64 L = static_cast<i64>(cur.size());
  if (k <= 0 || L < k) return true;
  const double u = std::numeric_limits<T>::epsilon() / 2;
  const double s1 = cur[0];
  const double sL = cur[L - 1];
  double inc = 0, gap = 0, noise = 0, top = 0, below = 0;
  for (i64 i = 0; i < L; ++i) {
    const double tau = 8 * u * cur[i] * (cur[i] + s1);  // rounding of s_i^2
    if (i < k) {
      const double d = std::max(cur[i] * cur[i] - prev[i] * prev[i] - tau, 0.0);
      const double rho_i = cur[i] > 0 ? std::min(std::pow(sL / cur[i], 4), 0.95) : 0.95;
      inc += d;
      gap += d * rho_i / (1 - rho_i);  // each direction converges at its own rate
      noise += tau;
      top += cur[i] * cur[i];
    } else {
      below += cur[i] * cur[i];
    }
  }
  if (*inc_prev > 0) {  // and the whole no faster than observed
    const double rho = std::min(inc / *inc_prev, 0.95);
    gap = std::max(gap, inc * rho / (1 - rho));
  }
  *inc_prev = inc;
  if (inc == 0) return true;  // nothing measurable is left to gain
  double opt2 = below;  // lower bound
  const double resid = normA2 - top - gap - noise - 8 * u * normA2;
  if (resid > opt2) opt2 = resid;
  // Half the allowance: the geometric model is an estimate (rates early on are faster than
  // the asymptotic ones it extrapolates), measured to stop one iteration late rather than early.
  return gap <= 0.5 * ((1 + eps) * (1 + eps) - 1) * opt2;
}

template <class T>
double frobenius2(Mat<const T> A) {
  double total = 0;
  for (i64 i = 0; i < A.rows; ++i) {
    double row = 0;
    const T* a = &A(i, 0);
    if (A.cs == 1) {
      for (i64 j = 0; j < A.cols; ++j) row += static_cast<double>(a[j]) * a[j];
    } else {
      for (i64 j = 0; j < A.cols; ++j) row += static_cast<double>(a[j * A.cs]) * a[j * A.cs];
    }
    total += row;
  }
  return total;
}

}  // namespace rslora::detail

namespace rslora {

bool rsvd_auto_converged(const std::vector<double>& prev, const std::vector<double>& cur, i64 k,
                         double normA2, double eps, bool float64, double* inc_prev) {
  return float64 ? detail::rsvd_converged<double>(prev, cur, k, normA2, eps, inc_prev)
                 : detail::rsvd_converged<float>(prev, cur, k, normA2, eps, inc_prev);
}

}  // namespace rslora

namespace rslora::detail {

#define RSLORA_INSTANTIATE(T)                                                                   \
  template void ritz_values<T>(const T*, i64, i64, std::vector<double>&, std::vector<double>&, \
                               std::vector<double>&);                                          \
  template bool rsvd_converged<T>(const std::vector<double>&, const std::vector<double>&, i64, \
                                  double, double, double*);                                    \
  template double frobenius2<T>(Mat<const T>);
RSLORA_INSTANTIATE(float)
RSLORA_INSTANTIATE(double)
#undef RSLORA_INSTANTIATE

}  // namespace rslora::detail
