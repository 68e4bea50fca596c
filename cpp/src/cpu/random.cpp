// Philox4x32-10 and Box-Muller normals (float32 generated in float arithmetic, no float64 detour).
#include "rslora/random.hpp"

#include <cmath>

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

template <>
void normal<float>(float* out, i64 n, std::uint64_t seed, std::uint64_t stream) {
  // 24-bit uniforms: u1 in (0, 1] so log(u1) is finite; the largest |z| is sqrt(48 ln 2) ~ 5.8.
  constexpr float kStep = 1.0f / 16777216.0f;
  const float two_pi = static_cast<float>(kTwoPi);
  for (i64 c = 0; 4 * c < n; ++c) {
    const auto x = philox(static_cast<std::uint64_t>(c), stream, seed);
    float z[4];
    for (int h = 0; h < 2; ++h) {
      const float u1 = static_cast<float>((x[2 * h] >> 8) + 1u) * kStep;
      const float u2 = static_cast<float>(x[2 * h + 1] >> 8) * kStep;
      const float r = std::sqrt(-2.0f * std::log(u1));
      const float t = two_pi * u2;
      z[2 * h] = r * std::cos(t);
      z[2 * h + 1] = r * std::sin(t);
    }
    const i64 base = 4 * c;
    for (int j = 0; j < 4 && base + j < n; ++j) out[base + j] = z[j];
  }
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
