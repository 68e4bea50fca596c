// Philox4x32-10 and Box-Muller normals (float32 generated in float arithmetic, no float64 detour).
#include "rslora/random.hpp"

#include "rslora/kernel_path.hpp"
#include "multi_kernels.hpp"  // RSLORA_HAVE_X86_KERNELS

#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace rslora::random {
namespace {

constexpr std::uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // Philox multipliers
constexpr std::uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments

inline void mulhilo(std::uint32_t a, std::uint32_t b, std::uint32_t& hi, std::uint32_t& lo) {
  const std::uint64_t p = static_cast<std::uint64_t>(a) * b;
  hi = static_cast<std::uint32_t>(p >> 32);
  lo = static_cast<std::uint32_t>(p);
}

constexpr double kTwoPi = 6.283185307179586476925286766559;

}  // namespace

std::array<std::uint32_t, 4> philox(std::uint64_t ctr_lo, std::uint64_t ctr_hi, std::uint64_t key) {
  std::uint32_t c0 = static_cast<std::uint32_t>(ctr_lo), c1 = static_cast<std::uint32_t>(ctr_lo >> 32);
  std::uint32_t c2 = static_cast<std::uint32_t>(ctr_hi), c3 = static_cast<std::uint32_t>(ctr_hi >> 32);
  std::uint32_t k0 = static_cast<std::uint32_t>(key), k1 = static_cast<std::uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    std::uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c0, hi0, lo0);
    mulhilo(kM1, c2, hi1, lo1);
    const std::uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
    k0 += kW0, k1 += kW1;
  }
  return {c0, c1, c2, c3};
}

// Float32 normals, 16 Philox blocks (64 numbers) at a time, in plain float arithmetic that the
// compiler vectorizes: Philox in 32 x 32 -> 64-bit products, log by a series in
// s = (m - 1) / (m + 1), sin/cos by Taylor series after reduction to |a| <= pi/4 (all three within
// ~2 ulp; libm's scalar logf and sincosf took 3/4 of the time of a 2048 x 74 test matrix).
// Only +, -, *, / and sqrt, each correctly rounded, and no contraction into FMA (GCC's avx512f
// target brings FMA: it moved 6% of the numbers by an ulp), so every kernel path gives the same
// bits (tests/test_random_normal.py).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
namespace {

constexpr int kLanes = 16;

// In place, v >= 0. std::sqrt's errno branch keeps GCC from vectorizing a loop around it; sqrtps
// rounds exactly as sqrtss does.
inline void sqrt_lanes(float (&v)[kLanes]) {
#if defined(__SSE2__)
  for (int i = 0; i < kLanes; i += 4) _mm_storeu_ps(v + i, _mm_sqrt_ps(_mm_loadu_ps(v + i)));
#else
  for (float& x : v) x = std::sqrt(x);
#endif
}

// log(k 2^-24) for k in [1, 2^24], as float; 0 at k = 2^24.
inline float log_u24(std::uint32_t k) {
  const float x = static_cast<float>(k);  // exact: k < 2^25
  std::uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const std::uint32_t mant = bits & 0x7fffffu;
  const std::uint32_t big = (0x3504f3u - mant) >> 31;  // 1 when m > sqrt(2): use m / 2
  const std::uint32_t mbits = mant | (0x3f800000u - (big << 23));
  float m;
  std::memcpy(&m, &mbits, 4);  // in [sqrt(1/2), sqrt(2)]
  const float e = static_cast<float>(static_cast<int>(bits >> 23) - 127 + static_cast<int>(big) - 24);
  const float f = m - 1.0f;  // exact (Sterbenz)
  const float s = f / (m + 1.0f), z = s * s;  // |s| <= 0.1716
  const float logm =
      s * (2.0f + z * (0.6666666666666666f + z * (0.4f + z * (0.2857142857142857f + z * 0.2222222222222222f))));
  constexpr float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606820309417232e-06f;
  return (e * ln2_hi + logm) + e * ln2_lo;
}

// sin and cos of 2 pi k 2^-24, k in [0, 2^24).
inline void sincos_u24(std::uint32_t k, float& sn, float& cs) {
  const std::uint32_t quad = ((k + (1u << 21)) >> 22) & 3u;  // nearest multiple of pi/2
  const int rem = static_cast<int>(k) - static_cast<int>(((k + (1u << 21)) >> 22) << 22);
  const float a = static_cast<float>(rem) * 3.7450702829239286e-07f;  // pi / 2^23: |a| <= pi/4
  const float z = a * a;
  const float s = a + a * z * (-0.16666666666666666f + z * (0.008333333333333333f + z * (-0.0001984126984126984f + z * 2.7557319223985893e-06f)));
  const float c = 1.0f + z * (-0.5f + z * (0.041666666666666664f + z * (-0.001388888888888889f + z * (2.48015873015873e-05f + z * -2.755731922398589e-07f))));
  // theta = quad pi/2 + a: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s) for quad = 0..3
  const std::uint32_t swap = 0u - (quad & 1u);                          // all ones when odd
  const std::uint32_t sin_sign = (quad >> 1) << 31, cos_sign = ((quad + 1) >> 1 & 1u) << 31;
  std::uint32_t sb, cb;
  std::memcpy(&sb, &s, 4);
  std::memcpy(&cb, &c, 4);
  const std::uint32_t snb = ((cb & swap) | (sb & ~swap)) ^ sin_sign;
  const std::uint32_t csb = ((sb & swap) | (cb & ~swap)) ^ cos_sign;
  std::memcpy(&sn, &snb, 4);
  std::memcpy(&cs, &csb, 4);
}

// The loop of normal<float>; inlined into one copy per instruction set below.
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline void normals_f32(float* out, i64 n, std::uint64_t seed, std::uint64_t stream) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const std::uint32_t key0 = static_cast<std::uint32_t>(seed), key1 = static_cast<std::uint32_t>(seed >> 32);
  for (i64 c = 0; 4 * c < n; c += kLanes) {
    // Philox4x32-10 of blocks c .. c + 15, lane by lane (the same steps as philox()).
    std::uint32_t x0[kLanes], x1[kLanes], x2[kLanes], x3[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      const std::uint64_t ctr = static_cast<std::uint64_t>(c + i);
      std::uint32_t a0 = static_cast<std::uint32_t>(ctr), a1 = static_cast<std::uint32_t>(ctr >> 32);
      std::uint32_t a2 = static_cast<std::uint32_t>(stream), a3 = static_cast<std::uint32_t>(stream >> 32);
      std::uint32_t k0 = key0, k1 = key1;
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
      for (int round = 0; round < 10; ++round) {
        const std::uint64_t p0 = static_cast<std::uint64_t>(kM0) * a0;
        const std::uint64_t p1 = static_cast<std::uint64_t>(kM1) * a2;
        a0 = static_cast<std::uint32_t>(p1 >> 32) ^ a1 ^ k0;
        a2 = static_cast<std::uint32_t>(p0 >> 32) ^ a3 ^ k1;
        a1 = static_cast<std::uint32_t>(p1), a3 = static_cast<std::uint32_t>(p0);
        k0 += kW0, k1 += kW1;
      }
      x0[i] = a0, x1[i] = a1, x2[i] = a2, x3[i] = a3;
    }
    // Box-Muller: (x0, x1) -> z[4i], z[4i + 1]; (x2, x3) -> z[4i + 2], z[4i + 3].
    float r0[kLanes], r1[kLanes], s0[kLanes], c0[kLanes], s1[kLanes], c1[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      r0[i] = -2.0f * log_u24((x0[i] >> 8) + 1u);
      r1[i] = -2.0f * log_u24((x2[i] >> 8) + 1u);
      sincos_u24(x1[i] >> 8, s0[i], c0[i]);
      sincos_u24(x3[i] >> 8, s1[i], c1[i]);
    }
    sqrt_lanes(r0);
    sqrt_lanes(r1);
    float z[4 * kLanes];
    for (int i = 0; i < kLanes; ++i) {
      z[4 * i] = r0[i] * c0[i], z[4 * i + 1] = r0[i] * s0[i];
      z[4 * i + 2] = r1[i] * c1[i], z[4 * i + 3] = r1[i] * s1[i];
    }
    const i64 base = 4 * c, count = std::min<i64>(4 * kLanes, n - base);
    std::copy(z, z + count, out + base);
  }
}

#if RSLORA_HAVE_X86_KERNELS
// The same loop in wider vectors, chosen by the kernel path (rslora/kernel_path.hpp).
__attribute__((target("avx2"))) void normals_f32_avx2(float* out, i64 n, std::uint64_t seed,
                                                       std::uint64_t stream) {
  normals_f32(out, n, seed, stream);
}
__attribute__((target("avx512f"))) void normals_f32_avx512(float* out, i64 n, std::uint64_t seed,
                                                            std::uint64_t stream) {
  normals_f32(out, n, seed, stream);
}
#endif

}  // namespace

template <>
void normal<float>(float* out, i64 n, std::uint64_t seed, std::uint64_t stream) {
#if RSLORA_HAVE_X86_KERNELS
  switch (kernel_path()) {
    case KernelPath::avx512: return normals_f32_avx512(out, n, seed, stream);
    case KernelPath::avx2: return normals_f32_avx2(out, n, seed, stream);
    case KernelPath::baseline: break;
  }
#endif
  normals_f32(out, n, seed, stream);
}

template <>
void normal<double>(double* out, i64 n, std::uint64_t seed, std::uint64_t stream) {
  constexpr double kStep = 1.0 / 9007199254740992.0;  // 2^-53
  for (i64 c = 0; 2 * c < n; ++c) {
    const auto x = philox(static_cast<std::uint64_t>(c), stream, seed);
    const std::uint64_t a = (static_cast<std::uint64_t>(x[0]) << 21) ^ (x[1] >> 11);
    const std::uint64_t b = (static_cast<std::uint64_t>(x[2]) << 21) ^ (x[3] >> 11);
    const double u1 = static_cast<double>((a & ((1ull << 53) - 1)) + 1) * kStep;  // (0, 1]
    const double u2 = static_cast<double>(b & ((1ull << 53) - 1)) * kStep;        // [0, 1)
    const double r = std::sqrt(-2.0 * std::log(u1));
    out[2 * c] = r * std::cos(kTwoPi * u2);
    if (2 * c + 1 < n) out[2 * c + 1] = r * std::sin(kTwoPi * u2);
  }
}

}  // namespace rslora::random
