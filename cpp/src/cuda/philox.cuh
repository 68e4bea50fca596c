// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011): a counter-based generator, so value i of a stream depends only on (seed, i) and
// any launch shape gives the same numbers. Host and device share this code (tests compare it
// with the paper's known-answer vectors on the host).
#pragma once
#include <cstdint>

namespace rslora::cuda {

struct Philox4 {
  std::uint32_t v[4];
};

__host__ __device__ inline std::uint32_t mulhi32(std::uint32_t a, std::uint32_t b) {
  return static_cast<std::uint32_t>((static_cast<std::uint64_t>(a) * b) >> 32);
}

__host__ __device__ inline Philox4 philox4x32_10(Philox4 c, std::uint32_t k0, std::uint32_t k1) {
  constexpr std::uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;  // round multipliers
  constexpr std::uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;  // key schedule (Weyl) bumps
  for (int round = 0; round < 10; ++round) {
    const std::uint32_t hi0 = mulhi32(M0, c.v[0]), lo0 = M0 * c.v[0];
    const std::uint32_t hi1 = mulhi32(M1, c.v[2]), lo1 = M1 * c.v[2];
    c = Philox4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    k0 += W0;
    k1 += W1;
  }
  return c;
}

// A uniform float in (0, 1) from the top 24 bits (never 0, so log() is finite).
__host__ __device__ inline float uniform_open(std::uint32_t bits) {
  return (static_cast<float>(bits >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

}  // namespace rslora::cuda
