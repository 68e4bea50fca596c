// Counter-based random numbers (Philox4x32-10, Salmon et al. 2011). Every number is a pure
// function of (seed, stream, index), so a matrix comes out the same whatever the thread count
// or the order it is filled in. Used for the Gaussian test matrices of the randomized SVD.
#pragma once
#include <array>
#include <cstdint>

#include "rslora/view.hpp"

namespace rslora::random {

// One Philox4x32-10 block: 128 random bits for the 128-bit counter (ctr_lo, ctr_hi) under key.
std::array<std::uint32_t, 4> philox(std::uint64_t ctr_lo, std::uint64_t ctr_hi, std::uint64_t key);

// out[e] for e in [0, n): standard normal numbers by Box-Muller, generated directly in T.
// float32: Philox block c gives out[4c .. 4c+3]; float64: block c gives out[2c, 2c+1] (53-bit
// uniforms). The block counter is (c, stream): different streams never share a block.
template <class T>
void normal(T* out, i64 n, std::uint64_t seed, std::uint64_t stream);

}  // namespace rslora::random
