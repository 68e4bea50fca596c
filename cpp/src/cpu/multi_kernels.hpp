// Small-group kernels of the multi-adapter op (internal to cpp/src/cpu). A group is the rows of
// one adapter; for a handful of rows the op is memory-bound (each adapter is read once, the
// rows stay in cache), and BLAS would pack the adapter and gather/scatter the rows first.
// These read x rows and write y rows where they are and each adapter element once.
#pragma once
#include "rslora/view.hpp"

namespace rslora::detail {

// Largest group handled here; bigger groups are GEMM-shaped and go to BLAS.
constexpr i64 kSmallGroup = 32;

// xa (c, r) = x_rows A^T, with x_rows[k] pointing at a unit-stride row of length d and A
// (r, d) read with unit column stride (row stride A_rs). acc: scratch of kShrinkScratch * r.
constexpr i64 kShrinkScratch = 8 * 16;
void shrink(const float* const* x_rows, i64 c, const float* A, i64 r, i64 A_rs, i64 d, float* xa,
            float* acc);
void shrink(const double* const* x_rows, i64 c, const double* A, i64 r, i64 A_rs, i64 d,
            double* xa, double* acc);

// y_rows[k] (length d_out, unit stride) += s * B xa[k]^T, B (d_out, r) with unit column stride
// (row stride B_rs), xa (c, r) row-major. bt: scratch of kExpandBlock * r elements.
constexpr i64 kExpandBlock = 64;
void expand(float* const* y_rows, i64 c, const float* B, i64 r, i64 B_rs, i64 d_out,
            const float* xa, float s, float* bt);
void expand(double* const* y_rows, i64 c, const double* B, i64 r, i64 B_rs, i64 d_out,
            const double* xa, double s, double* bt);

// SIMD versions chosen at run time (rslora/kernel_path.hpp): AVX-512F (multi_kernels_avx512.cpp)
// and AVX2+FMA (multi_kernels_avx2.cpp); the loops in multi_kernels.cpp are the baseline path,
// compiled for the build's baseline ISA (x86-64: SSE2, no FMA).
#if defined(__x86_64__) && defined(__GNUC__)
#define RSLORA_HAVE_X86_KERNELS 1
bool have_avx512();
bool have_avx2_fma();
#define RSLORA_DECLARE_SIMD(SUFFIX)                                                              \
  void shrink_##SUFFIX(const float* const* x_rows, i64 c, const float* A, i64 r, i64 A_rs,      \
                       i64 d, float* xa);                                                        \
  void shrink_##SUFFIX(const double* const* x_rows, i64 c, const double* A, i64 r, i64 A_rs,    \
                       i64 d, double* xa);                                                       \
  void expand_##SUFFIX(float* const* y_rows, i64 c, const float* B, i64 r, i64 B_rs, i64 d_out, \
                       const float* xa, float s, float* bt);                                     \
  void expand_##SUFFIX(double* const* y_rows, i64 c, const double* B, i64 r, i64 B_rs,          \
                       i64 d_out, const double* xa, double s, double* bt);
RSLORA_DECLARE_SIMD(avx512)
RSLORA_DECLARE_SIMD(avx2)
#undef RSLORA_DECLARE_SIMD
#else
#define RSLORA_HAVE_X86_KERNELS 0
#endif

}  // namespace rslora::detail
