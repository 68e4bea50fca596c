// Small-group kernels of the multi-adapter op (internal to cpp/src/cpu). A group is the rows of
// one adapter; for a handful of rows the op is memory-bound (each adapter is read once, the
// rows stay in cache), and BLAS would pack the adapter and gather/scatter the rows first.
// These read x rows and write y rows where they are and each adapter element once.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>

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
// which the SIMD paths prefetch while this group's expand computes (RunPrefetch).
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
// then the shrink's lane sums (up to kSmallGroup rows x r x 16 lanes) or the expand's
// transposed block of B (r x up to kExpandCols columns).
constexpr i64 kExpandCols = 128;
constexpr i64 kMaxLanes = 16;
constexpr i64 group_scratch(i64 r) {
  return kSmallGroup * r + std::max(kExpandCols, kSmallGroup * kMaxLanes) * r;
}

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

// Prefetches (into L2) of what the next phase of the kernel reads, spread evenly over the steps
// of the phase now computing: during a group's shrink its B and y rows, during its expand the
// next group's A and x rows. Each row (or a packed adapter, as one run) is asked for whole and
// in order, so that the memory sees a few long sequential runs, not dozens of interleaved short
// ones (which open a new DRAM page every few lines: about half the bandwidth, measured on Zen 4
// with rows of 16 KB). A phase's data (c rows + one adapter) then waits in L2 for its phase.
template <class T>
class RunPrefetch {
 public:
  // An adapter (rows of len elements, rs apart) then the rows of x or y (len2 elements each).
  RunPrefetch(const T* M, i64 M_rows, i64 M_rs, i64 len, const T* const* rows, i64 c, i64 len2,
              i64 steps)
      : M_(M), rows_(rows), M_rows_(M ? M_rows : 0), M_rs_(M_rs), len_(len), c_(M ? c : 0),
        len2_(len2) {
    if (M_rows_ > 1 && M_rs_ == len_) len_ *= M_rows_, M_rows_ = 1;  // packed: one run
    i64 lines = M_rows_ * lines_of(len_) + c_ * lines_of(len2_);
    per_ = std::max<i64>(1, (lines + steps - 1) / std::max<i64>(1, steps));
  }
  void step() { issue(per_); }
  void finish() { issue(std::numeric_limits<i64>::max()); }

 private:
  static constexpr i64 kLine = 64;
  static i64 lines_of(i64 len) {
    return (len * static_cast<i64>(sizeof(T)) + kLine - 1) / kLine + 1;
  }
  // n more lines from the cursor (run run_, byte off_), run after run.
  void issue(i64 n) {
    while (n > 0 && run_ < M_rows_ + c_) {
      const bool adapter = run_ < M_rows_;
      const T* row = adapter ? M_ + run_ * M_rs_ : rows_[run_ - M_rows_];
      const char* p = reinterpret_cast<const char*>(row);
      const i64 bytes = (adapter ? len_ : len2_) * static_cast<i64>(sizeof(T));
      // A new run starts at the line holding its first byte (off_ <= 0 only there).
      if (off_ == 0) off_ = -static_cast<i64>(reinterpret_cast<std::uintptr_t>(p) % kLine);
      for (; n > 0 && off_ < bytes; off_ += kLine, --n) _mm_prefetch(p + off_, _MM_HINT_T1);
      if (off_ >= bytes) ++run_, off_ = 0;
    }
  }
  const T* M_;
  const T* const* rows_;
  i64 M_rows_, M_rs_, len_, c_, len2_, per_ = 1;
  i64 run_ = 0, off_ = 0;
};
#else
#define RSLORA_HAVE_X86_KERNELS 0
#endif

}  // namespace rslora::detail
