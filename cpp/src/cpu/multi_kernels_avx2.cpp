// AVX2+FMA versions of the small-group kernels (multi_kernels.hpp), chosen at run time on CPUs
// with AVX2 and FMA but no AVX-512 (most AMD Zen 2/3 and Intel client CPUs), or when forced.
// Same plan as the AVX-512 kernels with 256-bit registers (16 of them, so smaller tiles): the
// shrink keeps a K x Q tile of dot products in registers (each load feeds several FMAs, >= 8
// independent chains where c allows); the expand transposes B in 8 x 8 (float) / 4 x 4 (double)
// register blocks into a small L1 buffer, then streams the rows of y once per block.
// Summation order: lane sums over j then a horizontal sum in lane order (shrink); sum over q in
// order, then y += s * sum with one FMA (expand).
#include "multi_kernels.hpp"

#if RSLORA_HAVE_X86_KERNELS
#include <immintrin.h>

#include <algorithm>

#define RSLORA_AVX2 __attribute__((target("avx2,fma")))
#define RSLORA_INLINE inline __attribute__((always_inline))

namespace rslora::detail {
namespace {

// One 256-bit register of T and its lane count.
template <class T>
struct Simd;
template <>
struct Simd<float> {
  using V = __m256;
  static constexpr int L = 8;
  RSLORA_AVX2 static RSLORA_INLINE V zero() { return _mm256_setzero_ps(); }
  RSLORA_AVX2 static RSLORA_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  RSLORA_AVX2 static RSLORA_INLINE V load(const float* p, int n) {  // first n lanes, rest 0
    static const int m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 8 - n)));
  }
  RSLORA_AVX2 static RSLORA_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  RSLORA_AVX2 static RSLORA_INLINE V set1(float a) { return _mm256_set1_ps(a); }
  RSLORA_AVX2 static RSLORA_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  // v[0..8) rows -> columns.
  RSLORA_AVX2 static RSLORA_INLINE void transpose(V* v) {
    const V t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    const V t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    const V t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
    const V t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
    const V u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    const V u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const V u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    const V u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    const V u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    const V u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    const V u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    const V u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    v[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    v[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    v[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    v[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    v[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    v[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    v[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    v[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
  }
};
template <>
struct Simd<double> {
  using V = __m256d;
  static constexpr int L = 4;
  RSLORA_AVX2 static RSLORA_INLINE V zero() { return _mm256_setzero_pd(); }
  RSLORA_AVX2 static RSLORA_INLINE V load(const double* p) { return _mm256_loadu_pd(p); }
  RSLORA_AVX2 static RSLORA_INLINE V load(const double* p, int n) {
    static const long long m[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
    return _mm256_maskload_pd(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 4 - n)));
  }
  RSLORA_AVX2 static RSLORA_INLINE void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  RSLORA_AVX2 static RSLORA_INLINE V set1(double a) { return _mm256_set1_pd(a); }
  RSLORA_AVX2 static RSLORA_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  RSLORA_AVX2 static RSLORA_INLINE void transpose(V* v) {
    const V t0 = _mm256_unpacklo_pd(v[0], v[1]), t1 = _mm256_unpackhi_pd(v[0], v[1]);
    const V t2 = _mm256_unpacklo_pd(v[2], v[3]), t3 = _mm256_unpackhi_pd(v[2], v[3]);
    v[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
    v[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
    v[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
    v[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
  }
};

// The lanes of v summed in lane order.
template <class T>
RSLORA_AVX2 RSLORA_INLINE T lane_sum(typename Simd<T>::V v) {
  alignas(32) T t[Simd<T>::L];
  Simd<T>::store(t, v);
  T s = T(0);
  for (int l = 0; l < Simd<T>::L; ++l) s += t[l];
  return s;
}

// Elements of a row of A ahead to prefetch in the shrink: A streams from memory, and 256-bit
// loads leave fewer misses in flight than the AVX-512 kernel's (measured: ~20% off the shrink).
// Prefetches past the end of A are harmless (they never fault).
constexpr i64 kAhead = 512;

// xa[k * r + q0 + q] for K rows of x and Q rows of A from q0 on.
template <class T, int K, int Q>
RSLORA_AVX2 RSLORA_INLINE void shrink_tile(const T* const* x, const T* A, i64 A_rs, i64 d, i64 r,
                                           i64 q0, T* xa) {
  using S = Simd<T>;
  constexpr int L = S::L;
  const i64 dv = d - d % L;
  typename S::V acc[K][Q];
  for (int k = 0; k < K; ++k)
    for (int q = 0; q < Q; ++q) acc[k][q] = S::zero();
  const T* a = A + q0 * A_rs;
  for (i64 j = 0; j < dv; j += L) {
    if (j % (64 / sizeof(T)) == 0)  // A streams from memory: one prefetch per line, far ahead
      for (int q = 0; q < Q; ++q)
        _mm_prefetch(reinterpret_cast<const char*>(a + q * A_rs + j + kAhead), _MM_HINT_T0);
    typename S::V av[Q];
    for (int q = 0; q < Q; ++q) av[q] = S::load(a + q * A_rs + j);
    for (int k = 0; k < K; ++k) {
      typename S::V xv = S::load(x[k] + j);
      asm("" : "+x"(xv));  // one load of x per row: keep GCC from folding it into each FMA
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

// All r rows of A for K rows of x: Q rows at a time (K * Q + Q + 1 <= 16 registers), then one.
template <class T, int K, int Q>
RSLORA_AVX2 RSLORA_INLINE void shrink_rows(const T* const* x, const T* A, i64 A_rs, i64 d, i64 r,
                                           T* xa) {
  i64 q = 0;
  for (; q + Q <= r; q += Q) shrink_tile<T, K, Q>(x, A, A_rs, d, r, q, xa);
  for (; q < r; ++q) shrink_tile<T, K, 1>(x, A, A_rs, d, r, q, xa);
}

template <class T>
RSLORA_AVX2 void shrink_impl(const T* const* x, i64 c, const T* A, i64 r, i64 A_rs, i64 d, T* xa) {
  i64 k = 0;
  for (; k + 4 <= c; k += 4) shrink_rows<T, 4, 2>(x + k, A, A_rs, d, r, xa + k * r);
  if (c - k == 3) shrink_rows<T, 3, 3>(x + k, A, A_rs, d, r, xa + k * r);
  if (c - k == 2) shrink_rows<T, 2, 4>(x + k, A, A_rs, d, r, xa + k * r);
  if (c - k == 1) shrink_rows<T, 1, 8>(x + k, A, A_rs, d, r, xa + k * r);
}

// y[k][j0 .. j0 + jb) += s * sum_q xa[k * r + q] * bt[q * L ..] for K rows.
template <class T, int K>
RSLORA_AVX2 RSLORA_INLINE void expand_rows(T* const* y, i64 j0, i64 jb, const T* bt, i64 r,
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
      alignas(32) T t[S::L];
      S::store(t, acc[k]);
      for (i64 jj = 0; jj < jb; ++jj) y[k][j0 + jj] = __builtin_fma(s, t[jj], y[k][j0 + jj]);
    }
  }
}

constexpr i64 kPrefetchRows = 64;  // rows of B ahead (B streams from memory)

template <class T>
RSLORA_AVX2 void expand_impl(T* const* y, i64 c, const T* B, i64 r, i64 B_rs, i64 d_out,
                             const T* xa, T s, T* bt) {
  using S = Simd<T>;
  constexpr int L = S::L;
  typename S::V v[L];
  for (i64 j0 = 0; j0 < d_out; j0 += L) {
    const i64 jb = std::min<i64>(L, d_out - j0);
    if (j0 + kPrefetchRows + L <= d_out)
      for (int i = 0; i < L; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(B + (j0 + kPrefetchRows + i) * B_rs),
                     _MM_HINT_T0);
    // bt (r, L) = rows j0 .. j0 + jb of B transposed, zero-padded; L x L blocks in registers.
    for (i64 q0 = 0; q0 < r; q0 += L) {
      const int qb = static_cast<int>(std::min<i64>(L, r - q0));
      const T* b0 = B + j0 * B_rs + q0;
      if (jb == L && qb == L) {
        for (int i = 0; i < L; ++i) v[i] = S::load(b0 + i * B_rs);
      } else {
        for (int i = 0; i < L; ++i) v[i] = i < jb ? S::load(b0 + i * B_rs, qb) : S::zero();
      }
      S::transpose(v);
      for (int q = 0; q < L; ++q)
        if (q < qb) S::store(bt + (q0 + q) * L, v[q]);
    }
    i64 k = 0;
    for (; k + 4 <= c; k += 4) expand_rows<T, 4>(y + k, j0, jb, bt, r, xa + k * r, s);
    for (; k < c; ++k) expand_rows<T, 1>(y + k, j0, jb, bt, r, xa + k * r, s);
  }
}

}  // namespace

bool have_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

void shrink_avx2(const float* const* x, i64 c, const float* A, i64 r, i64 A_rs, i64 d, float* xa) {
  shrink_impl(x, c, A, r, A_rs, d, xa);
}
void shrink_avx2(const double* const* x, i64 c, const double* A, i64 r, i64 A_rs, i64 d,
                 double* xa) {
  shrink_impl(x, c, A, r, A_rs, d, xa);
}
void expand_avx2(float* const* y, i64 c, const float* B, i64 r, i64 B_rs, i64 d_out,
                 const float* xa, float s, float* bt) {
  expand_impl(y, c, B, r, B_rs, d_out, xa, s, bt);
}
void expand_avx2(double* const* y, i64 c, const double* B, i64 r, i64 B_rs, i64 d_out,
                 const double* xa, double s, double* bt) {
  expand_impl(y, c, B, r, B_rs, d_out, xa, s, bt);
}

}  // namespace rslora::detail
#endif
