// AVX-512 versions of the small-group kernels (multi_kernels.hpp), chosen at run time when the CPU
// has AVX-512F. Register-tiled where the portable loops are not: the shrink keeps a K x Q tile of
// dot products (K rows of x against Q rows of A) in registers, so each load feeds several FMAs
// and there are always >= 4 independent FMA chains; the expand transposes B 16 rows at a time
// with in-register permutes instead of scalar copies. Same summation order as the portable
// kernels: lane sums over j then a horizontal sum (shrink), sum over q then y += s * sum (expand).
// (Lane counts and FMA differ between paths, so results agree to rounding, not bit for bit.)
#include "multi_kernels.hpp"

#if RSLORA_HAVE_X86_KERNELS
#include <immintrin.h>

#include <algorithm>

#define RSLORA_AVX512 __attribute__((target("avx512f")))
#define RSLORA_INLINE inline __attribute__((always_inline))

namespace rslora::detail {
namespace {

// One 512-bit register of T and its lane count.
template <class T>
struct Simd;
template <>
struct Simd<float> {
  using V = __m512;
  static constexpr int L = 16;
  RSLORA_AVX512 static RSLORA_INLINE V zero() { return _mm512_setzero_ps(); }
  RSLORA_AVX512 static RSLORA_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  RSLORA_AVX512 static RSLORA_INLINE V load(const float* p, int n) {  // first n lanes, rest 0
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  RSLORA_AVX512 static RSLORA_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  RSLORA_AVX512 static RSLORA_INLINE V set1(float a) { return _mm512_set1_ps(a); }
  RSLORA_AVX512 static RSLORA_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  RSLORA_AVX512 static RSLORA_INLINE V perm2(V a, __m512i idx, V b) {
    return _mm512_permutex2var_ps(a, idx, b);
  }
  RSLORA_AVX512 static RSLORA_INLINE __m512i index(const int* i) {
    return _mm512_loadu_si512(i);
  }
};
template <>
struct Simd<double> {
  using V = __m512d;
  static constexpr int L = 8;
  RSLORA_AVX512 static RSLORA_INLINE V zero() { return _mm512_setzero_pd(); }
  RSLORA_AVX512 static RSLORA_INLINE V load(const double* p) { return _mm512_loadu_pd(p); }
  RSLORA_AVX512 static RSLORA_INLINE V load(const double* p, int n) {
    return _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
  }
  RSLORA_AVX512 static RSLORA_INLINE void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  RSLORA_AVX512 static RSLORA_INLINE V set1(double a) { return _mm512_set1_pd(a); }
  RSLORA_AVX512 static RSLORA_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  RSLORA_AVX512 static RSLORA_INLINE V perm2(V a, __m512i idx, V b) {
    return _mm512_permutex2var_pd(a, idx, b);
  }
  RSLORA_AVX512 static RSLORA_INLINE __m512i index(const int* i) {
    long long w[8];
    for (int l = 0; l < 8; ++l) w[l] = i[l];
    return _mm512_loadu_si512(w);
  }
};

// The lanes of v summed in the order of the portable kernels (0, 1, ..., L-1).
template <class T>
RSLORA_AVX512 RSLORA_INLINE T lane_sum(typename Simd<T>::V v) {
  alignas(64) T t[Simd<T>::L];
  Simd<T>::store(t, v);
  T s = T(0);
  for (int l = 0; l < Simd<T>::L; ++l) s += t[l];
  return s;
}

// Columns of a shrink tile between two steps of its prefetch of the expand's data.
constexpr i64 kStepCols = 256;

// xa[k * r + q0 + q] for K rows of x and Q rows of A from q0 on.
template <class T, int K, int Q>
RSLORA_AVX512 RSLORA_INLINE void shrink_tile(const T* const* x, const T* A, i64 A_rs, i64 d, i64 r,
                                             i64 q0, T* xa, RunPrefetch<T>& pf) {
  using S = Simd<T>;
  constexpr int L = S::L;
  const i64 dv = d - d % L;
  typename S::V acc[K][Q];
  for (int k = 0; k < K; ++k)
    for (int q = 0; q < Q; ++q) acc[k][q] = S::zero();
  const T* a = A + q0 * A_rs;
  for (i64 j = 0; j < dv; j += L) {
    if (j % kStepCols == 0) pf.step();
    typename S::V av[Q];
    for (int q = 0; q < Q; ++q) av[q] = S::load(a + q * A_rs + j);
    for (int k = 0; k < K; ++k) {
      const typename S::V xv = S::load(x[k] + j);
      for (int q = 0; q < Q; ++q) acc[k][q] = S::fma(xv, av[q], acc[k][q]);
    }
  }
  for (int k = 0; k < K; ++k)
    for (int q = 0; q < Q; ++q) {
      T sum = lane_sum<T>(acc[k][q]);
      for (i64 j = dv; j < d; ++j) sum += x[k][j] * a[q * A_rs + j];
      xa[k * r + q0 + q] = sum;
    }
}

// All r rows of A for K rows of x: Q rows of A at a time, Q * K <= 16 accumulators.
template <class T, int K, int Q>
RSLORA_AVX512 RSLORA_INLINE void shrink_rows(const T* const* x, const T* A, i64 A_rs, i64 d, i64 r,
                                             T* xa, RunPrefetch<T>& pf) {
  i64 q = 0;
  for (; q + Q <= r; q += Q) shrink_tile<T, K, Q>(x, A, A_rs, d, r, q, xa, pf);
  for (; q + 4 <= r; q += 4) shrink_tile<T, K, 4>(x, A, A_rs, d, r, q, xa, pf);
  for (; q < r; ++q) shrink_tile<T, K, 1>(x, A, A_rs, d, r, q, xa, pf);
}

template <class T>
RSLORA_AVX512 void shrink_impl(const T* const* x, i64 c, const T* A, i64 r, i64 A_rs, i64 d,
                               T* xa, RunPrefetch<T>& pf) {
  i64 k = 0;
  for (; k + 4 <= c; k += 4) shrink_rows<T, 4, 4>(x + k, A, A_rs, d, r, xa + k * r, pf);
  if (c - k == 3) shrink_rows<T, 3, 4>(x + k, A, A_rs, d, r, xa + k * r, pf);
  if (c - k == 2) shrink_rows<T, 2, 8>(x + k, A, A_rs, d, r, xa + k * r, pf);
  if (c - k == 1) shrink_rows<T, 1, 8>(x + k, A, A_rs, d, r, xa + k * r, pf);
  pf.finish();
}

// The permutes of an L x L transpose: stage h swaps the off-diagonal h x h blocks of each
// 2h x 2h block (rows i and i + h exchange their lanes with bit h set / clear).
template <class T>
struct Transposer {
  using S = Simd<T>;
  static constexpr int L = S::L;
  static constexpr int kStages = L == 16 ? 4 : 3;
  __m512i lo[kStages], hi[kStages];

  RSLORA_AVX512 Transposer() {
    for (int s = 0, h = L / 2; s < kStages; ++s, h /= 2) {
      int a[16], b[16];
      for (int l = 0; l < L; ++l) {
        a[l] = (l & h) ? L + l - h : l;
        b[l] = (l & h) ? L + l : l + h;
      }
      lo[s] = S::index(a);
      hi[s] = S::index(b);
    }
  }
  template <int s>
  RSLORA_AVX512 RSLORA_INLINE void stage(typename S::V* v) const {
    constexpr int h = L >> (s + 1);
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i)
      if (!(i & h)) {
        const typename S::V a = v[i], b = v[i + h];
        v[i] = S::perm2(a, lo[s], b);
        v[i + h] = S::perm2(a, hi[s], b);
      }
  }
  RSLORA_AVX512 RSLORA_INLINE void operator()(typename S::V* v) const {
    stage<0>(v);
    stage<1>(v);
    stage<2>(v);
    if constexpr (kStages == 4) stage<3>(v);
  }
};

template <class T, int K>
RSLORA_AVX512 RSLORA_INLINE void expand_rows(T* const* y, i64 j0, i64 jb, const T* bt, i64 r,
                                             const T* xa, T s) {
  using S = Simd<T>;
  typename S::V acc[K];
  for (int k = 0; k < K; ++k) acc[k] = S::zero();
  for (i64 q = 0; q < r; ++q) {
    const typename S::V b = S::load(bt + q * S::L);
    for (int k = 0; k < K; ++k) acc[k] = S::fma(S::set1(xa[k * r + q]), b, acc[k]);
  }
  const typename S::V sv = S::set1(s);
  for (int k = 0; k < K; ++k) {
    if (jb == S::L) {
      S::store(y[k] + j0, S::fma(sv, acc[k], S::load(y[k] + j0)));
    } else {
      alignas(64) T t[S::L];
      S::store(t, acc[k]);
      for (i64 jj = 0; jj < jb; ++jj) y[k][j0 + jj] += s * t[jj];
    }
  }
}

// expand_rows for r == L with the transposed block of B still in registers (bt[q] = v[q]).
template <class T, int K>
RSLORA_AVX512 RSLORA_INLINE void expand_rows_reg(T* const* y, i64 j0, const typename Simd<T>::V* v,
                                                 const T* xa, T s) {
  using S = Simd<T>;
  constexpr int L = S::L;
  typename S::V acc[K];
  for (int k = 0; k < K; ++k) acc[k] = S::zero();
#pragma GCC unroll 16
  for (int q = 0; q < L; ++q)
    for (int k = 0; k < K; ++k) acc[k] = S::fma(S::set1(xa[k * L + q]), v[q], acc[k]);
  const typename S::V sv = S::set1(s);
  for (int k = 0; k < K; ++k) S::store(y[k] + j0, S::fma(sv, acc[k], S::load(y[k] + j0)));
}

constexpr i64 kPrefetch = 4;  // blocks of L rows of B ahead

// v[i] = B[j0 + i, q0 .. q0 + qb) for i < jb, zero-padded to L x L.
template <class T>
RSLORA_AVX512 RSLORA_INLINE void load_block(typename Simd<T>::V* v, const T* B, i64 B_rs,
                                            i64 d_out, i64 j0, i64 jb, i64 q0, int qb) {
  using S = Simd<T>;
  constexpr int L = S::L;
  if (jb == L && qb == L) {
    if (j0 + kPrefetch * L < d_out) {  // B streams from memory: ask for it early
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(B + (j0 + kPrefetch * L + i) * B_rs + q0),
                     _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) v[i] = S::load(B + (j0 + i) * B_rs + q0);
  } else {
    for (int i = 0; i < L; ++i)
      v[i] = i >= jb ? S::zero() : S::load(B + (j0 + i) * B_rs + q0, qb);
  }
}

template <class T>
RSLORA_AVX512 void expand_impl(T* const* y, i64 c, const T* B, i64 r, i64 B_rs, i64 d_out,
                               const T* xa, T s, T* bt, RunPrefetch<T>& pf) {
  using S = Simd<T>;
  constexpr int L = S::L;
  const Transposer<T> transpose;
  typename S::V v[L];
  for (i64 j0 = 0; j0 < d_out; j0 += L) {
    pf.step();
    const i64 jb = std::min<i64>(L, d_out - j0);
    if (r == L && jb == L) {  // the common case: the transposed block stays in registers
      load_block<T>(v, B, B_rs, d_out, j0, jb, 0, L);
      transpose(v);
      i64 k = 0;
      for (; k + 4 <= c; k += 4) expand_rows_reg<T, 4>(y + k, j0, v, xa + k * r, s);
      for (; k < c; ++k) expand_rows_reg<T, 1>(y + k, j0, v, xa + k * r, s);
      continue;
    }
    // bt (r, L) = rows j0 .. j0 + jb of B transposed, zero-padded.
    for (i64 q0 = 0; q0 < r; q0 += L) {
      const int qb = static_cast<int>(std::min<i64>(L, r - q0));
      load_block<T>(v, B, B_rs, d_out, j0, jb, q0, qb);
      transpose(v);
#pragma GCC unroll 16
      for (int q = 0; q < L; ++q)
        if (q < qb) S::store(bt + (q0 + q) * L, v[q]);
    }
    i64 k = 0;
    for (; k + 4 <= c; k += 4) expand_rows<T, 4>(y + k, j0, jb, bt, r, xa + k * r, s);
    for (; k < c; ++k) expand_rows<T, 1>(y + k, j0, jb, bt, r, xa + k * r, s);
  }
  pf.finish();
}

template <class T>
RSLORA_AVX512 void add_group_impl(const Group<T>& g, Dims dims, T* work) {
  constexpr i64 L = Simd<T>::L;
  // The prefetches of each phase spread over its steps (multi_kernels.hpp): a step per
  // kStepCols columns of a shrink tile (tiles as shrink_impl and shrink_rows cut them), a step
  // per expand block.
  const i64 r = dims.r, c = g.c;
  const auto tiles = [r](i64 Q) { return r / Q + (r % Q) / 4 + (r % Q) % 4; };
  const i64 shrink_steps = ((c / 4) * tiles(4) + (c % 4 == 3 ? tiles(4) : c % 4 ? tiles(8) : 0)) *
                           ((dims.d_in + kStepCols - 1) / kStepCols);
  RunPrefetch<T> for_expand(g.B, dims.d_out, g.B_rs, dims.r, g.y, g.c, dims.d_out, shrink_steps);
  shrink_impl(g.x, g.c, g.A, dims.r, g.A_rs, dims.d_in, work, for_expand);
  RunPrefetch<T> for_next(g.next_A, dims.r, g.A_rs, dims.d_in, g.next_x, g.next_c, dims.d_in,
                          (dims.d_out + L - 1) / L);
  expand_impl(g.y, g.c, g.B, dims.r, g.B_rs, dims.d_out, work, g.s, work + kSmallGroup * dims.r,
              for_next);
}

}  // namespace

bool have_avx512() { return __builtin_cpu_supports("avx512f"); }

void add_group_avx512(const Group<float>& g, Dims dims, float* work) {
  add_group_impl(g, dims, work);
}
void add_group_avx512(const Group<double>& g, Dims dims, double* work) {
  add_group_impl(g, dims, work);
}

}  // namespace rslora::detail
#endif
