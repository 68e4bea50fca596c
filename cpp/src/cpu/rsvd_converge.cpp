// The stopping rule of n_iter = "auto" (subspace iteration): has the rank-k approximation from
// the current basis reached (1 + eps) x the Eckart-Young optimum in relative Frobenius error?
//
// With Q orthonormal (p x L) and W = A^T Q, the Ritz values s_1 >= ... >= s_L are the singular
// values of W (= of B = Q^T A). The rank-k result U_k diag(s) V_k^T is the projection of A onto
// its top k left Ritz vectors, so exactly
//     err^2 = ||A||_F^2 - sum_{i<=k} s_i^2,   opt^2 = ||A||_F^2 - sum_{i<=k} sigma_i^2,
//     err^2 - opt^2 = gap = sum_{i<=k} (sigma_i^2 - s_i^2) >= 0       (s_i <= sigma_i).
// The contract err <= (1 + eps) opt is gap <= ((1 + eps)^2 - 1) opt^2. Neither sigma nor opt is
// known. Two ways to decide, at O(q L^2) per basis from what the passes already give:
// - A bound (any basis, the sketch included): opt^2 >= below = sum_{k<i<=L} s_i^2 (Q^T A_k has
//   rank k and ||Q^T A - Q^T A_k|| <= ||A - A_k||), hence gap = err^2 - opt^2 <= err^2 - below
//   = ||A||_F^2 - sum_{i<=L} s_i^2, the energy outside the whole basis. When that is within the
//   allowance times below, the contract holds (up to rounding, counted below): a cliff inside
//   the sketch needs no iteration at all.
// - An estimate (from the first iteration on, with at least kMinTail = 4 Ritz values past k):
//   subspace iteration shrinks sigma_i^2 - s_i^2 by about rho_i = (sigma_{L+1} / sigma_i)^4 per
//   iteration (Halko et al. 2011, Thm 9.2, squared), and a shortfall that is a mix of terms
//   shrinking no slower than that is at most d_i rho_i / (1 - rho_i), with d_i the measured
//   increase of s_i^2 in the last iteration. sigma_{L+1} is not known: s_L stands for it, with
//   s_L^2 taken as risen once more by its last rise: while the bottom of the basis still rises,
//   s_L is far below sigma_{L+1} (power law (1+i)^-1/4, k = 2: s_12 = 0.37 after one iteration
//   where sigma_13 = 0.53, so rho_2 read 0.04 for 0.15, and the rule stopped at 1.0012x). (A
//   rise in proportion, s_L^2 / s_L,prev^2, cost "style" at 4096 an iteration: its s_L rose
//   1.5x from the sketch, already at sigma_L.) rho_i is capped at 0.95, and the total is taken no smaller than the observed rate
//   of the whole, inc(t) / inc(t-1), predicts.
//   Each of these factors is capped at 2 t after t iterations: a direction inside a cluster
//   (a flat noise floor across index k, where rho_i ~ 1 and the geometric model says ~19 d_i)
//   converges like 1/t, its shortfall after t iterations ~ (t + 1/2) d_t (measured: 1.5 d_1,
//   2.2 d_2, 3.2 d_3 on the noisy spectrum), and what it has left is small against opt^2, which
//   the floor fills. A geometrically converging direction with rho_i > 2t / (2t + 1) is then
//   under-estimated, but only at t = 1-2, and the half allowance below absorbs it.
//   opt^2: below, or ||A||_F^2 - sum_{i<=k} s_i^2 - gap where that is larger (slow decay).
//   With fewer than kMinTail values past k (oversample < 4) there is no rate to read, and the
//   first steps from so narrow a sketch are far from geometric (oversample 0, a 0.3x step at
//   k = 32: 1.062x at auto_tol 1e-2 after one iteration): only the bound stops it, or the cap.
// Each s_i^2 is trusted to a few units of rounding of s_i * s_1 (the error of W = A^T Q), and
// increases below that are not counted: they cannot be measured, and the result cannot hold
// the difference either.
// The cap (kRsvdAutoMaxIters): when neither has stopped it by then, rsvd keeps the estimate of
// err / opt the rule last formed (rsvd_last_uncertified) and the Python layer warns with it
// (RuntimeWarning): "auto" never returns an uncertified result silently.
// Where the estimate can still be missed: it extrapolates, so a spectrum whose decay changes
// after index L, or a stagnating start (Ritz values that barely move for an iteration before
// they converge: an unlucky sketch, probability ~ exp(-oversample)) can fool it; rsvd never
// asks on a basis that is most of the short side (s_L far below sigma_L): it takes a sketch of
// the whole short side (exact) when 2 l >= min(m, n). What bench/sweep_rsvd_auto.py still
// finds is in the rsvd docstring (python/rslora/svd.py, "Known misses").
// Block Krylov (krylov = true; rsvd.cpp's krylov_auto, on slow decay): cur holds the Ritz values
// of the whole (t + 1) l wide basis and prev those of the basis one block narrower. The bound is
// the same (any basis); in the estimate s_L is the whole basis's last Ritz value, and the
// estimate is doubled and not trusted before step 3: the whole's first observed rate can be far
// faster than the next (0.03 then 0.17 on (1+i)^-1/4 dropping 0.3x at index k - 20, k = 32:
// stopping at step 2 gave 1.0011x). Checked by C++ runs over power laws (exponents 1/4 to 1,
// with and without steps down by 0.2-0.7x around k), exponential decays, noise floors and
// Gaussian matrices (k 2..128, oversample 5..30, auto_tol 1e-2..1e-4, 6 shapes, 2 dtypes).
// Widening (rsvd_widen_cols): when the sketch fails the bound, its Ritz values may call for up
// to l more Gaussian columns (made orthogonal to the sketch) before any iteration: the rule
// above then judges the wider basis, so this changes the cost, never what "converged" means.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "rslora/blas.hpp"
#include "rsvd_kernels.hpp"

namespace rslora::detail {

namespace {

// g.W <- W (q x L, column-major) in float64: W itself, or (float32) its copy in g.Wd, where
// columns [0, from) are already in place (gram_eig_grow: copied by the step before).
template <class T>
void gram_wd(const T* W, i64 q, i64 L, i64 from, Gram& g) {
  if constexpr (std::is_same_v<T, double>) {
    g.W = W;
  } else {
    g.Wd.resize(static_cast<size_t>(q * L));
    std::copy(W + from * q, W + L * q, g.Wd.begin() + from * q);
    g.W = g.Wd.data();
  }
}

// g.G (the Gram, L x L) <- its eigenvectors (ascending), g.ev the eigenvalues, g.s the Ritz
// values (descending).
void gram_eigs(Gram& g) {
  const i64 L = g.L;
  g.ev.resize(static_cast<size_t>(L));
  blas::syevd<double>(L, g.G.data(), L, g.ev.data());
  for (i64 i = 0; i < L; ++i) g.s[i] = std::sqrt(std::max(g.ev[L - 1 - i], 0.0));
}

}  // namespace

template <class T>
void gram_eig(const T* W, i64 q, i64 L, Gram& g) {
  g.q = q, g.L = L;
  g.s.assign(static_cast<size_t>(L), 0.0);
  if (L == 0) return;
  const blas::SingleThreadScope one_thread(double(q) * L * L);  // small: blas.hpp
  gram_wd(W, q, L, 0, g);
  g.G.resize(static_cast<size_t>(L * L));
  blas::syrk<double>(true, true, L, q, 1.0, g.W, q, 0.0, g.G.data(), L);
  gram_eigs(g);
}

template <class T>
void gram_eig_grow(const T* W, i64 q, i64 c, i64 w, Gram& g, std::vector<double>& full) {
  const i64 L = c + w;
  if (static_cast<i64>(full.size()) != c * c) c = 0;  // no Gram of the first c: all of it
  g.q = q, g.L = L;
  g.s.assign(static_cast<size_t>(L), 0.0);
  if (L == 0) return;
  const blas::SingleThreadScope one_thread(double(q) * L * w);  // small: blas.hpp
  gram_wd(W, q, L, c, g);
  // The new columns of the Gram only: W^T W_new (q L w), not the whole (q L^2) every step.
  g.G.assign(static_cast<size_t>(L * L), 0.0);
  for (i64 j = 0; j < c; ++j) std::copy(&full[j * c], &full[j * c] + c, &g.G[j * L]);
  blas::gemm<double>(1.0, ccolmajor(g.W, q, L, q), true, ccolmajor(g.W + c * q, q, L - c, q), false,
                     0.0, colmajor(g.G.data() + c * L, L, L - c, L));
  for (i64 j = c; j < L; ++j)
    for (i64 i = 0; i < c; ++i) g.G[j + i * L] = g.G[i + j * L];
  full = g.G;
  gram_eigs(g);
}

bool Gram::well_conditioned(i64 cols, double floor) const {
  if (L == 0 || cols < 1 || cols > L) return false;
  const double top = ev[L - 1];
  return top > 0 && std::isfinite(top) && ev[L - cols] >= floor * top;
}

void Gram::scaled_vectors(i64 cols, std::vector<double>& out) const {
  std::vector<double> Vs(static_cast<size_t>(L * cols));
  for (i64 j = 0; j < cols; ++j) {
    const double inv = 1.0 / std::sqrt(ev[L - 1 - j]);
    for (i64 i = 0; i < L; ++i) Vs[i + j * L] = G[i + (L - 1 - j) * L] * inv;
  }
  out.resize(static_cast<size_t>(q * cols));
  blas::gemm<double>(1.0, ccolmajor(W, q, L, q), false, ccolmajor(Vs.data(), L, cols, L), false, 0.0,
                     colmajor(out.data(), q, cols, q));
}

constexpr i64 kMinTail = 4;

template <class T>
bool rsvd_converged(const std::vector<double>& prev, const std::vector<double>& cur, i64 k,
                    double normA2, double eps, double* inc_prev, int iter, bool krylov,
                    double* est_ratio) {
  const i64 L = static_cast<i64>(cur.size());
  if (est_ratio) *est_ratio = 0;
  if (k <= 0 || L < k) return true;
  const double u = std::numeric_limits<T>::epsilon() / 2;
  const double allow = (1 + eps) * (1 + eps) - 1;
  const double s1 = cur[0];
  const bool first = prev.empty();
  // s_L stands for sigma_{L+1} in the rates: a lower estimate while the bottom of the basis is
  // still rising (slow decay, small k: (1+i)^-1/4, k = 2 rose 0.32 -> 0.37 towards
  // sigma_13 = 0.53, and stopped at 1.0012x). Subspace iteration: s_L^2 taken as risen once
  // more by its last rise (Krylov: prev is of a narrower basis).
  double sL = cur[L - 1];
  if (!krylov && static_cast<i64>(prev.size()) == L && sL > prev[L - 1])
    sL = std::sqrt(2 * sL * sL - prev[L - 1] * prev[L - 1]);
  // A direction's shortfall is at most 2 t times its last increase after t iterations: a
  // direction inside a cluster (a flat tail across index k) converges like 1/t, not
  // geometrically, and has little energy left to gain (see the top of this file).
  const double cap = iter > 0 ? 2.0 * iter : std::numeric_limits<double>::infinity();
  double inc = 0, gap = 0, noise = 8 * u * normA2, top = 0, below = 0, below_noise = 0;
  for (i64 i = 0; i < L; ++i) {
    const double tau = 8 * u * cur[i] * (cur[i] + s1);  // rounding of s_i^2
    noise += tau;
    if (i < k) {
      top += cur[i] * cur[i];
      if (first) continue;
      const double d = std::max(cur[i] * cur[i] - prev[i] * prev[i] - tau, 0.0);
      const double rho_i = cur[i] > 0 ? std::min(std::pow(sL / cur[i], 4), 0.95) : 0.95;
      inc += d;
      gap += d * std::min(rho_i / (1 - rho_i), cap);  // each direction at its own rate
    } else {
      below += cur[i] * cur[i];
      below_noise += tau;
    }
  }
  // A bound, not an estimate: gap <= ||A||^2 - sum_{i<=L} s_i^2 (the energy outside the whole
  // basis; see above). Enough on its own when the basis holds all but a sliver of ||A||^2.
  const double outside = normA2 - top - below;
  if (outside + noise <= allow * std::max(below - below_noise, 0.0)) return true;
  if (first) return false;
  const bool had_rate = *inc_prev > 0;
  if (had_rate) {  // and the whole no faster than observed
    const double rho = std::min(inc / *inc_prev, 0.95);
    gap = std::max(gap, inc * std::min(rho / (1 - rho), cap));
  }
  *inc_prev = inc;
  // Block Krylov (rsvd.cpp's krylov_auto): s_L of the whole basis stands for the rate of its
  // directions; the whole's first observed rate (step 2) can be far faster than the next (0.03
  // then 0.17 on a power law with a step inside the basis: stopping at step 2 gave 1.0011x),
  // so the estimate is doubled, and decides from step 3 on.
  if (krylov) gap *= 2;
  const double err2 = normA2 - top;
  const double opt2 = std::max(below, err2 - gap - noise);  // below: a lower bound
  if (est_ratio) *est_ratio = opt2 > 0 ? std::sqrt(std::max(err2, 0.0) / opt2)
                                       : std::numeric_limits<double>::infinity();
  if (krylov && (!had_rate || iter < 3)) return false;
  if (inc == 0) return true;  // nothing measurable is left to gain
  // Fewer than kMinTail Ritz values past k (oversample < 4): nothing to extrapolate the rates
  // from (s_L is s_k's neighbour), and the first steps from a sketch that narrow are far from
  // geometric (oversample 0, a 0.3x step at k: 1.062x at auto_tol 1e-2 after 1 iteration). Only
  // the bound stops it, or the cap, which warns.
  if (L - k < kMinTail) return false;
  // Half the allowance: the geometric model is an estimate (rates early on are faster than
  // the asymptotic ones it extrapolates), measured to stop one iteration late rather than early.
  return gap <= 0.5 * allow * opt2;
}

}  // namespace rslora::detail

namespace rslora {

bool rsvd_auto_converged(const std::vector<double>& prev, const std::vector<double>& cur, i64 k,
                         double normA2, double eps, bool float64, double* inc_prev, int iter,
                         double* est_ratio) {
  return float64 ? detail::rsvd_converged<double>(prev, cur, k, normA2, eps, inc_prev, iter,
                                                  false, est_ratio)
                 : detail::rsvd_converged<float>(prev, cur, k, normA2, eps, inc_prev, iter, false,
                                                 est_ratio);
}

}  // namespace rslora

namespace rslora::detail {

template <class T>
i64 rsvd_widen_cols(const std::vector<double>& s, i64 k, double normA2, double eps, i64 room) {
  const i64 L = static_cast<i64>(s.size());
  const i64 h = k / 2;
  if (room <= 0 || k < 8 || L <= k || !(s[h] > 0) || !(s[k - 1] > 0) || !(s[L - 1] > 0)) return 0;
  const double u = std::numeric_limits<T>::epsilon() / 2;
  const double allow = (1 + eps) * (1 + eps) - 1;
  double in = 0, below = 0, noise = 8 * u * normA2;
  for (i64 i = 0; i < L; ++i) {
    (i < k ? in : below) += s[i] * s[i];
    noise += 8 * u * s[i] * (s[i] + s[0]) * (i < k ? 1 : 2);  // as rsvd_converged counts it
  }
  const double outside = normA2 - in - below;
  // (a) Fast decay: the columns that bring the sketch's bound within the allowance (the
  // geometric decay of s_i^2 over [k/2, k) carried past L), if that is cheaper than one
  // iteration and the bound is not below the rounding of the captured energy (float32 with a
  // tiny optimum: then only an iteration's measured increase can stop the rule).
  const double target = 0.5 * allow * below - noise;
  const double r = std::pow(s[k - 1] / s[h], 2.0 / static_cast<double>(k - 1 - h));
  double need = -1;
  if (target > 0 && outside > target && r > 0 && r < 1)
    need = std::ceil(std::log(target / outside) / std::log(r));
  // At most L columns (one iteration's cost), and the wider basis at most an eighth of the
  // short side (room + L): where it is most of it, rule 2's rates, from s_L, run far too fast
  // (a 100-column basis of a 150 x 400 noisy matrix stopped at 1.0012x).
  // (A flat tail at the edge is not widened: since rule 2 caps each direction's shortfall at
  // 2 t times its increase, noisy low rank stops after 1 iteration at l columns, half the
  // column-passes of 1 iteration at 2 l; in a float64 replay over 57 spectra and shapes the
  // second block never paid.)
  const i64 cap = std::min<i64>(L, (room + L) / 8 - L);
  if (cap < 1) return 0;
  if (need >= 0 && need <= static_cast<double>(cap))
    return std::min<i64>(cap, std::max<i64>(static_cast<i64>(need), 8));
  return 0;
}

#define RSLORA_INSTANTIATE(T)                                                                   \
  template void gram_eig<T>(const T*, i64, i64, Gram&);                                       \
  template void gram_eig_grow<T>(const T*, i64, i64, i64, Gram&, std::vector<double>&);       \
  template bool rsvd_converged<T>(const std::vector<double>&, const std::vector<double>&, i64, \
                                  double, double, double*, int, bool, double*);               \
  template i64 rsvd_widen_cols<T>(const std::vector<double>&, i64, double, double, i64);
RSLORA_INSTANTIATE(float)
RSLORA_INSTANTIATE(double)
#undef RSLORA_INSTANTIATE

}  // namespace rslora::detail
