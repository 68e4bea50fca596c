// Small-group kernels of the multi-adapter op (internal to cpp/src/cpu). A group is the rows of
// one adapter; for a handful of rows the op is memory-bound (each adapter is read once, the
// rows stay in cache), and BLAS would pack the adapter and gather/scatter the rows first.
// These read x rows and write y rows where they are and each adapter element once.
#pragma once
#include "rslora/view.hpp"

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
#define RSLORA_DECLARE_SIMD(SUFFIX)                                                              \
  void add_group_##SUFFIX(const Group<float>& g, Dims dims,             \
                          float* work);                                                          \
  void add_group_##SUFFIX(const Group<double>& g, Dims dims,           \
                          double* work);
RSLORA_DECLARE_SIMD(avx512)
RSLORA_DECLARE_SIMD(avx2)
#undef RSLORA_DECLARE_SIMD
#else
#define RSLORA_HAVE_X86_KERNELS 0
#endif

}  // namespace rslora::detail
