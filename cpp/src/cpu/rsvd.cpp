// Fixed-rank randomized SVD: range finder with subspace iteration (Halko, Martinsson & Tropp
// 2011, Alg. 4.4) or block Krylov iteration (Musco & Musco 2015), see rslora/svd.hpp.
//
// Pass structure (A is p x q, p <= q; l = k + oversample columns; n_iter = t):
//   subspace: Y = A Om; t times { Z = A^T norm(Y); Y = A norm(Z) }; Q = orth(Y); W = A^T Q.
//   krylov:   Q_0 = orth(A Om); for i = 0..t { W_i = A^T Q_i; Q_{i+1} = orth_against(A W_i) }.
//   auto:     subspace, or, on slow decay seen in the sketch, krylov continued from the sketch
//             with the stopping rule after each block (krylov_auto).
// Both make 2t + 2 GEMM passes. W = A^T Q is B^T for B = Q^T A, so the small SVD needs no extra
// pass; in the Krylov case the W_i of every block are kept, so B of the whole (t+1) l wide
// Krylov basis costs nothing more than the passes that built it.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "rslora/blas.hpp"
#include "rslora/errors.hpp"
#include "rslora/random.hpp"
#include "rslora/svd.hpp"
#include "rsvd_kernels.hpp"

namespace rslora {
namespace detail {

template <class T>
void Sides<T>::mul(const T* X, i64 c, T* Y) const {
  blas::gemm_split<T>(T(1), A, false, ccolmajor(X, q, c, q), false, T(0), colmajor(Y, p, c, p));
}

template <class T>
void Sides<T>::mul_t(const T* Y, i64 c, T* Z) const {
  blas::gemm_split<T>(T(1), A, true, ccolmajor(Y, p, c, p), false, T(0), colmajor(Z, q, c, q));
}

namespace {

// float32: Uw = W V S^-1 from the eigen-decomposition W^T W = V S^2 V^T in float64. One syrk,
// a tiny syevd and one GEMM, a third of the CholeskyQR route. In float64 the squared condition
// costs nothing as long as S_j >= 1e-4 S_0 (Gram::well_conditioned; orthogonality error
// ~ 1e-16 (S_0 / S_j)^2 <= 1e-8, far below float32's); otherwise the caller falls back.
void small_svd_gram(const Gram& g, i64 cols, SmallSvd<float>& sv) {
  const i64 q = g.q, L = g.L;
  for (i64 j = 0; j < L; ++j) {
    const i64 src = L - 1 - j;
    sv.s[j] = static_cast<float>(g.s[j]);
    for (i64 i = 0; i < L; ++i) sv.Vwt[j + i * L] = static_cast<float>(g.G[i + src * L]);
  }
  g.scaled_vectors(cols, sv.Ud);  // write_factors reads Uw from here (no float32 copy between)
  sv.uw_in_ud = true;
}

}  // namespace

template <class T>
void small_svd(const T* W, i64 q, i64 L, i64 cols, SmallSvd<T>& sv, const Gram* known) {
  sv.q = q, sv.L = L;
  sv.uw_in_ud = false;
  sv.s.resize(static_cast<size_t>(L));
  sv.Vwt.resize(static_cast<size_t>(L * L));
  if (L == 0) return;
  const blas::SingleThreadScope one_thread(double(q) * L * L);  // small: blas.hpp
  if (!all_finite(W, q * L)) {
    // NaN/Inf in M (check_finite=False): NaN out, as LAPACK would refuse the input
    const T nan = std::numeric_limits<T>::quiet_NaN();
    sv.Uw.resize(static_cast<size_t>(q * cols));
    std::fill(sv.s.begin(), sv.s.end(), nan);
    std::fill(sv.Uw.begin(), sv.Uw.end(), nan);
    std::fill(sv.Vwt.begin(), sv.Vwt.end(), nan);
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    Gram own;
    if (!known) gram_eig(W, q, L, own);
    const Gram& g = known ? *known : own;
    if (g.well_conditioned(cols, 1e-8)) return small_svd_gram(g, cols, sv);
  }
  // W = Qw R (CholeskyQR, BLAS-3), then gesdd of the L x L R: LAPACK's own tall SVD spends its
  // time in threaded BLAS-2 calls that crawl on a busy machine.
  sv.Uw.resize(static_cast<size_t>(q * cols));
  std::vector<T> Qw(W, W + q * L), R(static_cast<size_t>(L * L)), Ur(static_cast<size_t>(L * L));
  orthonormalize(Qw.data(), q, L);
  auto Qv = ccolmajor(Qw.data(), q, L, q);
  blas::gemm<T>(T(1), Qv, true, ccolmajor(W, q, L, q), false, T(0), colmajor(R.data(), L, L, L));
  blas::gesdd<T>(L, L, R.data(), L, sv.s.data(), Ur.data(), L, sv.Vwt.data(), L);
  blas::gemm<T>(T(1), Qv, false, ccolmajor(Ur.data(), L, cols, L), false, T(0),
                colmajor(sv.Uw.data(), q, cols, q));
}

template <class T>
void check_sketch_finite(const Sides<T>& sd, const T* Y, i64 count) {
  if (all_finite(Y, count)) return;
  for (i64 i = 0; i < sd.p; ++i)
    for (i64 j = 0; j < sd.q; ++j)
      if (!std::isfinite(sd.A(i, j)))
        throw std::invalid_argument("M contains NaN or Inf (pass check_finite=False to skip this check)");
  throw std::invalid_argument("M is too large for its precision: products with it overflow; scale it down");
}

template <class T>
void write_factors(const Sides<T>& sd, const T* Q, const SmallSvd<T>& sv, i64 k, Mat<T> U, T* S,
                   Mat<T> Vt) {
  const blas::SingleThreadScope one_thread(double(sd.p) * sv.L * k);  // small: blas.hpp
  // Left factor of A: Q Vw[:, :k] (Vw = Vwt^T, so Vw[:, :k] is the transpose of Vwt's first k rows).
  Mat<T> left = sd.transposed ? Vt.t() : U;   // p x k
  Mat<T> right = sd.transposed ? U : Vt.t();  // q x k
  auto Vk = ccolmajor(sv.Vwt.data(), k, sv.L, sv.L);
  blas::gemm<T>(T(1), ccolmajor(Q, sd.p, sv.L, sd.p), false, Vk, true, T(0), left);
  if (sv.uw_in_ud)
    for (i64 j = 0; j < k; ++j)
      for (i64 i = 0; i < sd.q; ++i) right(i, j) = static_cast<T>(sv.Ud[i + j * sd.q]);
  else
    for (i64 j = 0; j < k; ++j)
      for (i64 i = 0; i < sd.q; ++i) right(i, j) = sv.Uw[i + j * sd.q];
  for (i64 j = 0; j < k; ++j) S[j] = sv.s[j];
  fix_signs(U, Vt);
}

}  // namespace detail

int rsvd_auto_iters(RsvdMethod method, i64 m, i64 n, i64 k, i64 oversample) {
  const i64 p = std::min(m, n);
  if (oversample >= p - k) return 0;  // the sketch spans the short side (k + oversample >= p)
  return method == RsvdMethod::krylov ? 3 : 5;
}

i64 rsvd_passes(RsvdMethod, int n_iter) { return 2 * static_cast<i64>(n_iter) + 2; }

namespace {
thread_local int last_n_iter = 0;
thread_local bool last_krylov = false;
thread_local double last_uncertified = 0;
}  // namespace

int rsvd_last_n_iter() { return last_n_iter; }
bool rsvd_last_krylov() { return last_krylov; }
double rsvd_last_uncertified() { return last_uncertified; }

namespace {

using detail::Sides;

template <class T>
void normalize(RsvdNormalizer how, T* Y, i64 rows, i64 cols) {
  switch (how) {
    case RsvdNormalizer::qr: return detail::condition(Y, rows, cols);
    case RsvdNormalizer::lu: return detail::lu_normalize(Y, rows, cols);
    case RsvdNormalizer::none: return detail::rescale(Y, rows * cols);
  }
}

// The first pass of both subspace variants: W (q x l) Gaussian, Q = A W (p x l), checked finite.
template <class T>
void sketch(const Sides<T>& sd, i64 l, std::uint64_t seed, bool check_finite, std::vector<T>& Q,
            std::vector<T>& W) {
  W.resize(static_cast<size_t>(sd.q * l));
  Q.resize(static_cast<size_t>(sd.p * l));
  random::normal<T>(W.data(), sd.q * l, seed, 0);
  sd.mul(W.data(), l, Q.data());
  if (check_finite) detail::check_sketch_finite(sd, Q.data(), sd.p * l);
  check_interrupt();
}

// Subspace iteration: returns L = l; Q (p x l) orthonormal and W = A^T Q (q x l).
template <class T>
i64 subspace(const Sides<T>& sd, i64 l, int iters, RsvdNormalizer how, std::uint64_t seed,
             bool check_finite, std::vector<T>& Q, std::vector<T>& W) {
  const i64 p = sd.p, q = sd.q;
  sketch(sd, l, seed, check_finite, Q, W);
  for (int it = 0; it < iters; ++it) {
    normalize(how, Q.data(), p, l);
    sd.mul_t(Q.data(), l, W.data());
    check_interrupt();
    normalize(how, W.data(), q, l);
    sd.mul(W.data(), l, Q.data());
    check_interrupt();
  }
  detail::orthonormalize(Q.data(), p, l);
  sd.mul_t(Q.data(), l, W.data());
  check_interrupt();
  return l;
}

// Scratch of one rsvd call, kept per thread between calls: repeated calls of one shape (a loop
// over the layers of a model, a benchmark) then find their buffers allocated and touched, with
// no page faults or zero-filling (fresh buffers cost 5-7% of a 2048 x 2048, k = 64 call). Released
// after a call that left more than kKeepBytes in it, so a one-off large call holds nothing.
template <class T>
struct Workspace {
  static constexpr size_t kKeepBytes = size_t(64) << 20;
  std::vector<T> Q, W;
  detail::Gram gram;
  std::vector<double> prev, tmp, full;
  detail::SmallSvd<T> sv;
  size_t bytes() const {
    return (Q.capacity() + W.capacity() + sv.s.capacity() + sv.Uw.capacity() + sv.Vwt.capacity()) *
               sizeof(T) +
           (gram.Wd.capacity() + gram.G.capacity() + tmp.capacity() + full.capacity() +
            sv.Ud.capacity()) * sizeof(double);
  }
  void trim() {
    if (bytes() > kKeepBytes) *this = Workspace();
  }
};

template <class T>
Workspace<T>& workspace() {
  static thread_local Workspace<T> ws;
  return ws;
}

// W (q x L) <- W V S^-1 from the eigen-decomposition of its Gram matrix (g, of this very W):
// a basis of the same span, orthonormal to ~1e-4 or better (all condition() promises), from the
// Ritz computation the stopping rule already made: one GEMM in place of condition()'s two
// CholeskyQR passes. False (W untouched) when s_L < 1e-6 s_1 (rounding noise, rank deficiency).
template <class T>
bool condition_by_gram(T* W, const detail::Gram& g, std::vector<double>& tmp) {
  const i64 q = g.q, L = g.L;
  if (!g.well_conditioned(L, 1e-12)) return false;
  const blas::SingleThreadScope one_thread(double(q) * L * L);  // small: blas.hpp
  g.scaled_vectors(L, tmp);
  std::copy(tmp.begin(), tmp.end(), W);
  return true;
}

// Q (p x l, orthonormal) and W = A^T Q grow by b columns: Q's from b more Gaussian columns
// (stream 1 of the seed; the sketch used stream 0) made orthogonal to the first l.
template <class T>
void widen(const Sides<T>& sd, i64 l, i64 b, std::uint64_t seed, Workspace<T>& ws) {
  const i64 p = sd.p, q = sd.q;
  ws.Q.resize(static_cast<size_t>(p * (l + b)));
  ws.W.resize(static_cast<size_t>(q * (l + b)));
  T* Om = ws.W.data() + q * l;  // W's new block holds the test matrix until A^T Q_new
  T* Y = ws.Q.data() + p * l;
  random::normal<T>(Om, q * b, seed, 1);
  sd.mul(Om, b, Y);
  check_interrupt();
  std::vector<T> tmp;
  detail::orthonormalize_against(ws.Q.data(), p, l, Y, b, tmp);
  sd.mul_t(Y, b, Om);
  check_interrupt();
}

// What the auto paths report when max_iters came before the rule certified the result: its
// estimate of err / opt, +Inf where it formed none.
inline double uncertified_ratio(double est) {
  return est > 0 ? est : std::numeric_limits<double>::infinity();
}

// Whether the sketch's Ritz values s (l of them) show a slow, smooth decay across index k, where
// subspace iteration needs several iterations and block Krylov fewer passes: the subspace rate
// of direction k, (s_l / s_k)^4, is >= 0.3, and s_{k/4} / s_k is in [1.1, 8] (a flat floor across
// k, where one iteration is enough, or a steep decay is not slow).
inline bool slow_decay(const std::vector<double>& s, i64 k) {
  const i64 L = static_cast<i64>(s.size());
  if (L <= k || k < 2 || !(s[L - 1] > 0)) return false;
  const double rho = std::pow(s[L - 1] / s[k - 1], 4);
  const double r = s[k / 4] / s[k - 1];
  return rho >= 0.3 && r >= 1.1 && r <= 8;
}

// Block Krylov continued from the sketch (ws.Q: l orthonormal columns, ws.W = A^T Q, ws.gram its
// Gram): each step appends Q_new = orth_against(A W_last) and W_new = A^T Q_new (2 l column-passes,
// as a subspace iteration; the orthogonalization against c columns, 4 p c l, and the Gram's new
// columns, q (c + l) l, cost less than a pass while c is a few l) and judges the whole basis
// with the rule of rsvd_converge.cpp (its Krylov variant). Returns the width of the basis;
// ws.gram is left holding the Gram of the final W. *uncertified: as subspace_auto's.
template <class T>
i64 krylov_auto(const Sides<T>& sd, i64 l, i64 k, int max_iters, double eps, double normA2,
                Workspace<T>& ws, int* iters, double* uncertified) {
  const i64 p = sd.p, q = sd.q;
  const i64 L_max = std::min<i64>(l * (static_cast<i64>(max_iters) + 1), p);
  ws.Q.reserve(static_cast<size_t>(p * L_max));  // grown a block at a time: no touching of
  ws.W.reserve(static_cast<size_t>(q * L_max));  // columns a short run never uses
  std::vector<T> tmp;
  double inc_prev = 0;
  ws.prev.clear();
  ws.full.clear();
  i64 c0 = 0, w = l;  // last block: columns [c0, c0 + w)
  for (int it = 1; it <= max_iters; ++it) {
    const i64 c = c0 + w;
    const i64 w_next = std::min(w, L_max - c);
    if (w_next <= 0) break;
    ws.prev = ws.gram.s;
    ws.Q.resize(static_cast<size_t>(p * (c + w_next)));
    ws.W.resize(static_cast<size_t>(q * (c + w_next)));
    T* Y = ws.Q.data() + c * p;
    sd.mul(ws.W.data() + c0 * q, w_next, Y);
    check_interrupt();
    detail::rescale(Y, p * w_next);
    detail::orthonormalize_against(ws.Q.data(), p, c, Y, w_next, tmp);
    sd.mul_t(Y, w_next, ws.W.data() + c * q);
    check_interrupt();
    c0 = c, w = w_next;
    *iters = it;
    detail::gram_eig_grow(ws.W.data(), q, c, w, ws.gram, ws.full);
    double est = 0;
    if (detail::rsvd_converged<T>(ws.prev, ws.gram.s, k, normA2, eps, &inc_prev, it, true, &est))
      break;
    if (it == max_iters) *uncertified = uncertified_ratio(est);
  }
  return c0 + w;
}

// Subspace iteration that stops when the rank-k result has converged to (1 + eps) x the optimal
// error (rsvd_converge.cpp), after at most max_iters iterations; the sketch alone may be enough
// (0 iterations). Each iteration's basis is orthonormalized to working precision, so its
// W = A^T Q gives the Ritz values (and is the final W when the rule says stop): no pass more
// than the same number of fixed iterations. ws.gram is left holding the Gram of the final W.
// *iters receives the iterations made; *uncertified, when max_iters came first, the rule's
// estimate of err / opt (+Inf: none formed), else it is left as is (0).
template <class T>
i64 subspace_auto(const Sides<T>& sd, i64 l0, i64 k, int max_iters, double eps, double normA2,
                  std::uint64_t seed, bool check_finite, Workspace<T>& ws, int* iters,
                  bool* went_krylov, double* uncertified) {
  const i64 p = sd.p, q = sd.q;
  i64 l = l0;
  sketch(sd, l, seed, check_finite, ws.Q, ws.W);
  double inc_prev = 0;
  ws.prev.clear();
  *iters = 0;
  for (int it = 0;; ++it) {
    detail::orthonormalize(ws.Q.data(), p, l);
    sd.mul_t(ws.Q.data(), l, ws.W.data());
    check_interrupt();
    detail::gram_eig(ws.W.data(), q, l, ws.gram);
    double est = 0;
    if (detail::rsvd_converged<T>(ws.prev, ws.gram.s, k, normA2, eps, &inc_prev, it, false, &est))
      break;
    if (it == 0) {
      // Fast decay: a wider sketch (2 b column-passes) may meet the bound where an iteration
      // (2 l) would be needed; the columns already computed are kept.
      const i64 b = detail::rsvd_widen_cols<T>(ws.gram.s, k, normA2, eps, p - l);
      if (b > 0) {
        widen(sd, l, b, seed, ws);
        l += b;
        detail::gram_eig(ws.W.data(), q, l, ws.gram);
        if (detail::rsvd_converged<T>(ws.prev, ws.gram.s, k, normA2, eps, &inc_prev, it)) break;
      }
    }
    if (it == 0 && l == l0 && slow_decay(ws.gram.s, k)) {
      *iters = 0;
      *went_krylov = true;
      return krylov_auto(sd, l, k, max_iters, eps, normA2, ws, iters, uncertified);
    }
    if (it == max_iters) {
      *uncertified = uncertified_ratio(est);
      break;
    }
    ws.prev = ws.gram.s;
    if (!condition_by_gram(ws.W.data(), ws.gram, ws.tmp)) detail::condition(ws.W.data(), q, l);
    sd.mul(ws.W.data(), l, ws.Q.data());
    check_interrupt();
    *iters = it + 1;
  }
  return l;
}

// Block Krylov with full reorthogonalization: returns L = width of the basis (<= p).
template <class T>
i64 krylov(const Sides<T>& sd, i64 l, int iters, std::uint64_t seed, bool check_finite,
           std::vector<T>& Q, std::vector<T>& W) {
  const i64 p = sd.p, q = sd.q;
  const i64 L_max = std::min<i64>(l * (static_cast<i64>(iters) + 1), p);
  Q.resize(static_cast<size_t>(p * L_max));
  W.resize(static_cast<size_t>(q * L_max));
  std::vector<T> tmp;
  random::normal<T>(W.data(), q * l, seed, 0);  // W's first block holds Om until A^T Q_0
  sd.mul(W.data(), l, Q.data());
  if (check_finite) detail::check_sketch_finite(sd, Q.data(), p * l);
  check_interrupt();
  detail::orthonormalize(Q.data(), p, l);
  i64 c0 = 0, w = l;  // current block: columns [c0, c0 + w)
  for (;;) {
    T* Wi = W.data() + c0 * q;
    sd.mul_t(Q.data() + c0 * p, w, Wi);
    check_interrupt();
    const i64 c = c0 + w;
    if (c >= L_max) return c;
    const i64 w_next = std::min(w, L_max - c);
    T* Y = Q.data() + c * p;
    sd.mul(Wi, w_next, Y);
    check_interrupt();
    detail::rescale(Y, p * w_next);
    detail::orthonormalize_against(Q.data(), p, c, Y, w_next, tmp);
    c0 = c, w = w_next;
  }
}

}  // namespace

template <class T>
void rsvd(Mat<const T> M, i64 k, const RsvdOptions& opt, Mat<T> U, T* S, Mat<T> Vt) {
  const i64 m = M.rows, n = M.cols;
  if (k < 1 || k > std::min(m, n))
    throw std::invalid_argument("k must be in [1, min(m, n)] = [1, " +
                                std::to_string(std::min(m, n)) + "], got " + std::to_string(k));
  if (opt.oversample < 0)
    throw std::invalid_argument("oversample must be >= 0, got " + std::to_string(opt.oversample));
  if (U.rows != m || U.cols != k || Vt.rows != k || Vt.cols != n)
    throw std::invalid_argument("rsvd: output shapes do not match M and k");
  if (opt.method == RsvdMethod::krylov && opt.normalizer != RsvdNormalizer::qr)
    throw std::invalid_argument("method='krylov' orthonormalizes its blocks: normalizer must be 'qr'");
  const blas::SplitCallScope whole_call;  // blas.hpp
  const detail::Rescaled<T> scaled(M, opt.check_finite);
  const Sides<T> sd(scaled.M);
  i64 l = opt.oversample >= sd.p - k ? sd.p : k + opt.oversample;  // no k + oversample overflow
  int iters = opt.n_iter < 0 ? rsvd_auto_iters(opt.method, m, n, k, opt.oversample) : opt.n_iter;
  // "auto" with a basis of at least half the short side: one iteration (4 l column-passes)
  // would cost as much as a sketch of all p columns (2 p), and that sketch is exact (it spans
  // the short side), where an estimate of convergence is least reliable (rsvd_converge.cpp).
  if (opt.n_iter < 0 && 2 * l >= sd.p) l = sd.p, iters = 0;
  const bool adapt = opt.n_iter < 0 && iters > 0 && opt.method == RsvdMethod::subspace &&
                     opt.normalizer == RsvdNormalizer::qr;
  Workspace<T>& ws = workspace<T>();
  bool went_krylov = opt.method == RsvdMethod::krylov;
  double uncertified = 0;
  last_uncertified = 0;
  const i64 L = adapt ? subspace_auto(sd, l, k, kRsvdAutoMaxIters, opt.auto_tol, scaled.sumsq,
                                      opt.seed, opt.check_finite, ws, &iters, &went_krylov,
                                      &uncertified)
                : opt.method == RsvdMethod::krylov
                    ? krylov(sd, l, iters, opt.seed, opt.check_finite, ws.Q, ws.W)
                    : subspace(sd, l, iters, opt.normalizer, opt.seed, opt.check_finite, ws.Q, ws.W);
  last_n_iter = iters;
  last_krylov = went_krylov;
  last_uncertified = uncertified;
  detail::small_svd(ws.W.data(), sd.q, L, k, ws.sv, adapt ? &ws.gram : nullptr);
  detail::write_factors(sd, ws.Q.data(), ws.sv, k, U, S, Vt);
  scaled.unscale(S, k);
  ws.trim();
}

#define RSLORA_INSTANTIATE(T)                                                                   \
  template struct detail::Sides<T>;                                                             \
  template void detail::small_svd<T>(const T*, i64, i64, i64, detail::SmallSvd<T>&,          \
                                     const detail::Gram*);                                      \
  template void detail::check_sketch_finite<T>(const detail::Sides<T>&, const T*, i64);       \
  template void detail::write_factors<T>(const detail::Sides<T>&, const T*,                     \
                                         const detail::SmallSvd<T>&, i64, Mat<T>, T*, Mat<T>);  \
  template void rsvd<T>(Mat<const T>, i64, const RsvdOptions&, Mat<T>, T*, Mat<T>);
RSLORA_INSTANTIATE(float)
RSLORA_INSTANTIATE(double)
#undef RSLORA_INSTANTIATE

}  // namespace rslora
