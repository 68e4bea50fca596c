// Small-group kernels of the multi-adapter op (internal to cpp/src/cpu). A group is the rows of
// one adapter; for a handful of rows the op is memory-bound (each adapter is read once, the
// rows stay in cache), and BLAS would pack the adapter and gather/scatter the rows first.
// These read x rows and write y rows where they are and each adapter element once.
#pragma once
#include <algorithm>

#include "rslora/view.hpp"

#if defined(__x86_64__) && defined(__GNUC__)
#include <xmmintrin.h>
#endif

namespace rslora::detail {

// Largest group handled here; bigger groups are GEMM-shaped and go to BLAS.
constexpr i64 kSmallGroup = 32;

// One group: y_k += s * B (A x_k) for its c rows. Rows of x (length d_in) and of y (length
// d_out) are unit-stride; A (r, d_in) and B (d_out, r) have unit column strides.
// next_A, next_x, next_c: the A and x rows of the group the same thread adds next (or none),
// which the SIMD paths prefetch while this group's expand computes.
template <class T>
struct Group {
  const T* const* x = nullptr;
  T* const* y = nullptr;
  i64 c = 0;
  const T* A = nullptr;
  i64 A_rs = 0;
  const T* B = nullptr;
  i64 B_rs = 0;
  T s = T(0);
  const T* next_A = nullptr;
  const T* const* next_x = nullptr;
  i64 next_c = 0;
};

// Sizes shared by every group of a call.
struct Dims {
  i64 r = 0, d_in = 0, d_out = 0;
};

// Scratch of add_group in elements (per thread, reused for every group): xa (kSmallGroup x r),
// then the baseline shrink's lane sums (8 rows x r x 16 lanes) or the expand's transposed block
// of B (r x up to kExpandCols columns).
constexpr i64 kExpandCols = 128;
constexpr i64 group_scratch(i64 r) { return kSmallGroup * r + kExpandCols * r; }

// Adds group g (c <= kSmallGroup) into y with the kernel path in use (rslora/kernel_path.hpp).
// work: group_scratch(dims.r) elements.
void add_group(const Group<float>& g, Dims dims, float* work);
void add_group(const Group<double>& g, Dims dims, double* work);

// SIMD versions chosen at run time: AVX-512F (multi_kernels_avx512.cpp) and AVX2+FMA
// (multi_kernels_avx2.cpp); the loops in multi_kernels.cpp are the baseline path, compiled for
// the build's baseline ISA (x86-64: SSE2, no FMA).
#if defined(__x86_64__) && defined(__GNUC__)
#define RSLORA_HAVE_X86_KERNELS 1
bool have_avx512();
bool have_avx2_fma();
#define RSLORA_DECLARE_SIMD(SUFFIX)                                       \
  void add_group_##SUFFIX(const Group<float>& g, Dims dims, float* work); \
  void add_group_##SUFFIX(const Group<double>& g, Dims dims, double* work);
RSLORA_DECLARE_SIMD(avx512)
RSLORA_DECLARE_SIMD(avx2)
#undef RSLORA_DECLARE_SIMD

// The prefetch of the next group's shrink inputs, spread over the expand's blocks: block b asks
// for the b-th slice of every row of A and x (a few lines per row), so that the memory stream
// keeps going while the expand computes, and the next shrink finds its data in L2. Into L2 only
// (T1): into L1 they evicted the expand's own block of B and rows of y (measured 1.4x slower).
template <class T>
class NextGroupPrefetch {
 public:
  NextGroupPrefetch(const Group<T>& g, Dims dims, i64 blocks)
      : g_(g), dims_(dims), row_bytes_(dims.d_in * static_cast<i64>(sizeof(T))),
        seg_bytes_(ceil_div(ceil_div(row_bytes_, blocks), 64) * 64) {}
  void block(i64 b) const {
    if (!g_.next_A) return;
    const i64 lo = b * seg_bytes_, hi = std::min(lo + seg_bytes_, row_bytes_);
    for (i64 q = 0; q < dims_.r; ++q) lines(g_.next_A + q * g_.A_rs, lo, hi);
    for (i64 k = 0; k < g_.next_c; ++k) lines(g_.next_x[k], lo, hi);
  }

 private:
  static i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }
  static void lines(const T* row, i64 lo, i64 hi) {
    for (i64 b = lo; b < hi; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T1);
  }
  const Group<T>& g_;
  Dims dims_;
  i64 row_bytes_, seg_bytes_;  // a row of x or A; the slice of it prefetched per block
};
#else
#define RSLORA_HAVE_X86_KERNELS 0
#endif

}  // namespace rslora::detail
