// Fixed-accuracy randomized SVD: blocked QB with an error indicator (Yu, Gu & Li 2018,
// randQB_EI), then an SVD of B trimmed to the smallest rank that meets the tolerance.
//
// Each block: Y = (I - Q Q^T) A Om_i, power passes on the residual A - Q B (applied to thin
// blocks only; the dense residual is never formed), Q_i = orth_against(Q, Y), B_i^T = W_i =
// A^T Q_i. Since Q stays orthonormal, ||A - Q B||_F^2 = ||A||_F^2 - ||B||_F^2, so the error of
// the basis built so far is known without touching the residual.
//
// Cancellation: in working precision u, ||B||_F^2 carries an absolute error of order u ||A||_F^2,
// so once the indicator falls below ~100 u times the value it was computed from, its relative
// error grows past a few percent (float32: relative tolerances below ~3e-3). At that point the
// residual is computed exactly, one column chunk at a time (one extra pass, never a dense m x n
// temporary), and the indicator is re-based on it: later blocks subtract their energy from that
// exact, small number, which has no cancellation problem. Sums of squares are in float64.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "rslora/blas.hpp"
#include "rslora/errors.hpp"
#include "rslora/random.hpp"
#include "rslora/svd.hpp"
#include "rsvd_kernels.hpp"

namespace rslora {
namespace {

using detail::ccolmajor;
using detail::colmajor;
using detail::Sides;

template <class T>
double sumsq(const T* x, i64 count) {
  double s = 0;
  for (i64 i = 0; i < count; ++i) s += double(x[i]) * double(x[i]);
  return s;
}

// ||A - Q W^T||_F^2 with Q p x c, W q x c (column-major), by chunks of A's columns.
template <class T>
double residual2(const Sides<T>& sd, const T* Q, const T* W, i64 c) {
  const i64 p = sd.p, q = sd.q, chunk = 256;
  std::vector<T> R(static_cast<size_t>(p * std::min(chunk, q)));
  double s = 0;
  for (i64 j0 = 0; j0 < q; j0 += chunk) {
    const i64 cb = std::min(chunk, q - j0);
    auto Rv = colmajor(R.data(), p, cb, p);
    auto Ab = sd.A.block(0, j0, p, cb);
    if (std::abs(Ab.cs) <= std::abs(Ab.rs)) {
      for (i64 i = 0; i < p; ++i)
        for (i64 j = 0; j < cb; ++j) Rv(i, j) = Ab(i, j);
    } else {
      for (i64 j = 0; j < cb; ++j)
        for (i64 i = 0; i < p; ++i) Rv(i, j) = Ab(i, j);
    }
    if (c > 0)  // a pass-sized product: split like the passes (blas.hpp)
      blas::gemm_split<T>(T(-1), ccolmajor(Q, p, c, p), false, ccolmajor(W + j0, cb, c, q), true,
                          T(1), Rv);
    s += sumsq(R.data(), p * cb);
    check_interrupt();
  }
  return s;
}

// The basis built so far: Q (p x c) orthonormal, W = A^T Q (q x c), both column-major.
template <class T>
struct Basis {
  std::vector<T> Q, W;
  i64 c = 0;
};

// Y (p x b) = A Z for a fresh Gaussian Z (q x b) of the block's own stream.
template <class T>
void draw_block(const Sides<T>& sd, i64 b, std::uint64_t seed, std::uint64_t stream,
                std::vector<T>& Y, std::vector<T>& Z) {
  Z.resize(static_cast<size_t>(sd.q * b));
  Y.resize(static_cast<size_t>(sd.p * b));
  random::normal<T>(Z.data(), sd.q * b, seed, stream);
  sd.mul(Z.data(), b, Y.data());
  check_interrupt();
}

// Out (rows x b) -= F (G^T In), F rows x c and G inner x c (column-major): one side of the
// residual A - Q B = A - Q W^T applied to a thin block. C is scratch.
template <class T>
void subtract_projection(const T* F, i64 rows, const T* G, i64 inner, i64 c, const T* In, T* Out,
                         i64 b, std::vector<T>& C) {
  if (c == 0) return;
  const blas::SingleThreadScope one_thread(double(inner) * c * b);  // blas.hpp
  C.resize(static_cast<size_t>(c * b));
  auto Cv = colmajor(C.data(), c, b, c);
  blas::gemm<T>(T(1), ccolmajor(G, inner, c, inner), true, ccolmajor(In, inner, b, inner), false,
                T(0), Cv);
  blas::gemm<T>(T(-1), ccolmajor(F, rows, c, rows), false, Cv.as_const(), false, T(1),
                colmajor(Out, rows, b, rows));
}

// Z (q x b) -= W (Q^T Y): with Z = A^T Y, Z = (A - Q B)^T Y.
template <class T>
void deflate_t(const Basis<T>& bs, i64 p, i64 q, const T* Y, T* Z, i64 b, std::vector<T>& C) {
  subtract_projection(bs.W.data(), q, bs.Q.data(), p, bs.c, Y, Z, b, C);
}

// Y (p x b) -= Q (W^T Z): with Y = A Z, Y = (A - Q B) Z.
template <class T>
void deflate(const Basis<T>& bs, i64 p, i64 q, const T* Z, T* Y, i64 b, std::vector<T>& C) {
  subtract_projection(bs.Q.data(), p, bs.W.data(), q, bs.c, Z, Y, b, C);
}

// n_iter power passes on the residual A - Q B, applied to the thin blocks only (Y p x b in and
// out, Z q x b scratch): the dense residual is never formed.
template <class T>
void power_on_residual(const Sides<T>& sd, const Basis<T>& bs, int n_iter, std::vector<T>& Y,
                       std::vector<T>& Z, std::vector<T>& C, i64 b) {
  const i64 p = sd.p, q = sd.q;
  for (int it = 0; it < n_iter; ++it) {
    detail::orthonormalize(Y.data(), p, b);
    sd.mul_t(Y.data(), b, Z.data());
    check_interrupt();
    deflate_t(bs, p, q, Y.data(), Z.data(), b, C);
    detail::orthonormalize(Z.data(), q, b);
    sd.mul(Z.data(), b, Y.data());
    check_interrupt();
    deflate(bs, p, q, Z.data(), Y.data(), b, C);
  }
}

// Q_new = orth_against(Q, Y) appended to the basis with W_new = A^T Q_new; returns
// ||W_new||_F^2, the energy the new block captures (= ||B_new||_F^2).
template <class T>
double append_block(const Sides<T>& sd, Basis<T>& bs, std::vector<T>& Y, i64 b, std::vector<T>& tmp) {
  const i64 p = sd.p, q = sd.q, c = bs.c;
  detail::orthonormalize_against(bs.Q.data(), p, c, Y.data(), b, tmp);
  bs.Q.insert(bs.Q.end(), Y.begin(), Y.begin() + p * b);
  bs.W.resize(static_cast<size_t>(q * (c + b)));
  sd.mul_t(bs.Q.data() + c * p, b, bs.W.data() + c * q);
  check_interrupt();
  bs.c = c + b;
  return sumsq(bs.W.data() + c * q, q * b);
}

// The smallest rank r <= c whose error E + sum_{i > r} s_i^2 meets target (c when none does),
// with that error (added positive terms: no cancellation).
inline i64 trimmed_rank(const std::vector<double>& s2, double E, double target, double* err2) {
  const i64 c = static_cast<i64>(s2.size());
  std::vector<double> tail(static_cast<size_t>(c + 1), 0.0);
  for (i64 i = c - 1; i >= 0; --i) tail[i] = tail[i + 1] + s2[i];
  i64 r = c;
  for (i64 j = 1; j <= c; ++j)
    if (E + tail[j] <= target) {
      r = j;
      break;
    }
  *err2 = E + tail[r];
  return r;
}

}  // namespace

template <class T>
RsvdTolResult<T> rsvd_tol(Mat<const T> M, double tol, i64 max_rank, i64 block, int n_iter,
                          std::uint64_t seed, bool check_finite) {
  if (!(tol > 0 && tol < 1)) throw std::invalid_argument("tol must be in (0, 1), got " + std::to_string(tol));
  const i64 m = M.rows, n = M.cols;
  if (n_iter < 0) throw std::invalid_argument("n_iter must be >= 0, got " + std::to_string(n_iter));
  if (block < 1) throw std::invalid_argument("block must be >= 1, got " + std::to_string(block));
  const blas::SplitCallScope whole_call;  // blas.hpp
  const detail::Rescaled<T> scaled(M, check_finite);
  M = scaled.M;
  const Sides<T> sd(M);
  const i64 p = sd.p, q = sd.q;
  if (max_rank < 1 || max_rank > p)
    throw std::invalid_argument("max_rank must be in [1, min(m, n)] = [1, " + std::to_string(p) +
                                "], got " + std::to_string(max_rank));
  block = std::min(block, max_rank);  // a wider block changes nothing (and cannot overflow below)

  RsvdTolResult<T> res;
  const double norm2 = scaled.sumsq;  // NaN/Inf in M make it non-finite
  if (!std::isfinite(norm2)) {
    if (check_finite) {
      std::vector<T> probe(static_cast<size_t>(p));
      std::vector<T> one(static_cast<size_t>(q), T(1));
      sd.mul(one.data(), 1, probe.data());  // cheap: names the cause (NaN/Inf or overflow)
      detail::check_sketch_finite(sd, probe.data(), p);
    }
    throw std::invalid_argument("||M||_F is not finite: rsvd_tol needs a finite M");
  }
  if (norm2 == 0) {  // M = 0: rank 0 already has error 0 (reported as 0, not 0/0)
    res.rank = 0, res.error = 0;
    return res;
  }
  const double target = tol * tol * norm2;
  const double u = std::numeric_limits<T>::epsilon();
  Basis<T> bs;
  std::vector<T> Y, Z, C, tmp;
  bs.Q.reserve(static_cast<size_t>(p * std::min(max_rank, 4 * block)));
  bs.W.reserve(static_cast<size_t>(q * std::min(max_rank, 4 * block)));
  double E = norm2, base = norm2;  // indicator ||A - QB||^2, and the exact value it derives from
  for (std::uint64_t stream = 0; bs.c < max_rank && E > target; ++stream) {
    const i64 b = std::min(block, max_rank - bs.c);
    draw_block(sd, b, seed, stream, Y, Z);
    detail::project_out(bs.Q.data(), p, bs.c, Y.data(), b, tmp, 1);
    power_on_residual(sd, bs, n_iter, Y, Z, C, b);
    E -= append_block(sd, bs, Y, b, tmp);
    if (E <= 100 * u * base)  // the indicator is in its noisy range: re-base it on the truth
      E = base = residual2(sd, bs.Q.data(), bs.W.data(), bs.c);
  }
  E = std::max(E, 0.0);

  const i64 c = bs.c;
  detail::SmallSvd<T> sv;
  detail::small_svd(bs.W.data(), q, c, c, sv);
  std::vector<double> s2(static_cast<size_t>(c));
  for (i64 i = 0; i < c; ++i) s2[i] = double(sv.s[i]) * double(sv.s[i]);
  double err2 = 0;
  const i64 r = trimmed_rank(s2, E, target, &err2);
  res.rank = r;
  res.error = std::sqrt(err2 / norm2);
  res.U.resize(static_cast<size_t>(m * r));
  res.S.resize(static_cast<size_t>(r));
  res.Vt.resize(static_cast<size_t>(r * n));
  if (r > 0)
    detail::write_factors(sd, bs.Q.data(), sv, r, row_major(res.U.data(), m, r), res.S.data(),
                          row_major(res.Vt.data(), r, n));
  scaled.unscale(res.S.data(), r);
  return res;
}

template RsvdTolResult<float> rsvd_tol<float>(Mat<const float>, double, i64, i64, int, std::uint64_t, bool);
template RsvdTolResult<double> rsvd_tol<double>(Mat<const double>, double, i64, i64, int, std::uint64_t, bool);

}  // namespace rslora
