// Size arithmetic that cannot wrap: entry points compute buffer sizes from caller-given
// dimensions, and a wrapped product would become a small allocation that BLAS then overruns.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "rslora/view.hpp"

namespace rslora {

// a * b * ..., or std::invalid_argument naming `what` when the product of the (non-negative)
// factors does not fit in a byte count of `elem` sized elements.
inline i64 checked_size(std::initializer_list<i64> factors, const char* what, size_t elem = 1) {
  i64 total = 1;
  for (i64 f : factors) {
    if (f < 0) throw std::invalid_argument(std::string(what) + ": negative size");
    if (__builtin_mul_overflow(total, f, &total))
      throw std::invalid_argument(std::string(what) + ": size overflows 64-bit arithmetic");
  }
  i64 bytes;
  if (__builtin_mul_overflow(total, static_cast<i64>(elem), &bytes))
    throw std::invalid_argument(std::string(what) + ": size overflows 64-bit arithmetic");
  return total;
}

}  // namespace rslora
