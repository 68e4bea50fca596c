// AVX2+FMA versions of the small-group kernels (multi_kernels.hpp), chosen at run time on CPUs
// with AVX2 and FMA but no AVX-512 (most AMD Zen 2/3 and Intel client CPUs), or when forced.
// The algorithm is multi_kernels_tiled.hpp's; this file gives it 256-bit registers (16 of them).
#include "multi_kernels.hpp"

#if RSLORA_HAVE_X86_KERNELS
#include <immintrin.h>

#include <algorithm>

#define RSLORA_TARGET __attribute__((target("avx2,fma")))
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
  RSLORA_TARGET static RSLORA_INLINE V zero() { return _mm256_setzero_ps(); }
  RSLORA_TARGET static RSLORA_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  RSLORA_TARGET static RSLORA_INLINE V load(const float* p, int n) {  // first n lanes, rest 0
    static const int m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 8 - n)));
  }
  RSLORA_TARGET static RSLORA_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  RSLORA_TARGET static RSLORA_INLINE V set1(float a) { return _mm256_set1_ps(a); }
  RSLORA_TARGET static RSLORA_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  // v[0..8) rows -> columns.
  RSLORA_TARGET static RSLORA_INLINE void transpose(V* v) {
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
  RSLORA_TARGET static RSLORA_INLINE V zero() { return _mm256_setzero_pd(); }
  RSLORA_TARGET static RSLORA_INLINE V load(const double* p) { return _mm256_loadu_pd(p); }
  RSLORA_TARGET static RSLORA_INLINE V load(const double* p, int n) {
    static const long long m[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
    return _mm256_maskload_pd(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 4 - n)));
  }
  RSLORA_TARGET static RSLORA_INLINE void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  RSLORA_TARGET static RSLORA_INLINE V set1(double a) { return _mm256_set1_pd(a); }
  RSLORA_TARGET static RSLORA_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  RSLORA_TARGET static RSLORA_INLINE void transpose(V* v) {
    const V t0 = _mm256_unpacklo_pd(v[0], v[1]), t1 = _mm256_unpackhi_pd(v[0], v[1]);
    const V t2 = _mm256_unpacklo_pd(v[2], v[3]), t3 = _mm256_unpackhi_pd(v[2], v[3]);
    v[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
    v[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
    v[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
    v[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
  }
};

#include "multi_kernels_tiled.hpp"

}  // namespace

bool have_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

void add_group_avx2(const Group<float>& g, Dims dims, float* work) {
  add_group_tiled(g, dims, work);
}
void add_group_avx2(const Group<double>& g, Dims dims, double* work) {
  add_group_tiled(g, dims, work);
}

}  // namespace rslora::detail
#endif
