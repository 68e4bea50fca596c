// The baseline path of the small-group kernels: loops written so the compiler vectorizes them for
// the build's baseline ISA (fixed-width lane accumulators, unit strides), and the dispatch to the
// SIMD paths (rslora/kernel_path.hpp). No -march=native in wheels.
#include "multi_kernels.hpp"

#include <algorithm>

#include "rslora/kernel_path.hpp"

#define RSLORA_INLINE inline __attribute__((always_inline))

namespace rslora::detail {
namespace {

constexpr int kLanes = 16;  // partial sums per dot product: one AVX-512 register of floats

constexpr i64 kChunk = 256;  // columns of x per pass: 8 rows of it stay in L1 for all r rows of A

// acc[k][l] += x_k[j] * a[j] over one chunk [j0, j1) (a multiple of kLanes long), for K <= 8 rows
// sharing each load of a (the adapter row). acc: K blocks of kLanes, acc_stride apart.
template <class T, int K>
RSLORA_INLINE void dots_chunk(const T* const* x, const T* a, i64 j0, i64 j1, T* acc,
                              i64 acc_stride) {
  T loc[K][kLanes];
  for (int k = 0; k < K; ++k)
    for (int l = 0; l < kLanes; ++l) loc[k][l] = acc[k * acc_stride + l];
  for (i64 j = j0; j < j1; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const T av = a[j + l];
      for (int k = 0; k < K; ++k) loc[k][l] += x[k][j + l] * av;
    }
  for (int k = 0; k < K; ++k)
    for (int l = 0; l < kLanes; ++l) acc[k * acc_stride + l] = loc[k][l];
}

// xa[k][q] for K rows: chunks of d outer, adapter rows inner, lane sums reduced at the end.
template <class T, int K>
RSLORA_INLINE void shrink_rows(const T* const* x, const T* A, i64 r, i64 A_rs, i64 d, T* xa,
                               T* acc) {
  const i64 stride = r * kLanes, dv = d - d % kLanes;
  for (i64 t = 0; t < K * stride; ++t) acc[t] = T(0);
  for (i64 j0 = 0; j0 < dv; j0 += kChunk) {
    const i64 j1 = std::min(dv, j0 + kChunk);
    for (i64 q = 0; q < r; ++q) dots_chunk<T, K>(x, A + q * A_rs, j0, j1, acc + q * kLanes, stride);
  }
  for (int k = 0; k < K; ++k)
    for (i64 q = 0; q < r; ++q) {
      const T* lanes = acc + k * stride + q * kLanes;
      T sum = T(0);
      for (int l = 0; l < kLanes; ++l) sum += lanes[l];
      for (i64 j = dv; j < d; ++j) sum += x[k][j] * A[q * A_rs + j];
      xa[k * r + q] = sum;
    }
}

template <class T>
RSLORA_INLINE void shrink_impl(const T* const* x, i64 c, const T* A, i64 r, i64 A_rs, i64 d,
                               T* xa, T* acc) {
  i64 k = 0;
  for (; k + 8 <= c; k += 8) shrink_rows<T, 8>(x + k, A, r, A_rs, d, xa + k * r, acc);
  for (; k + 4 <= c; k += 4) shrink_rows<T, 4>(x + k, A, r, A_rs, d, xa + k * r, acc);
  for (; k < c; ++k) shrink_rows<T, 1>(x + k, A, r, A_rs, d, xa + k * r, acc);
}

template <class T>
RSLORA_INLINE void expand_impl(T* const* y, i64 c, const T* B, i64 r, i64 B_rs, i64 d_out,
                               const T* xa, T s, T* bt) {
  constexpr i64 J = 64;  // columns per block (<= kExpandCols)
  for (i64 j0 = 0; j0 < d_out; j0 += J) {
    const i64 jb = std::min(J, d_out - j0);
    // bt (r, J) = this block of B transposed (zero-padded), so the loop below is unit-stride.
    for (i64 jj = 0; jj < jb; ++jj)
      for (i64 q = 0; q < r; ++q) bt[q * J + jj] = B[(j0 + jj) * B_rs + q];
    for (i64 jj = jb; jj < J; ++jj)
      for (i64 q = 0; q < r; ++q) bt[q * J + jj] = T(0);
    for (i64 k = 0; k < c; ++k) {
      T acc[J] = {};
      for (i64 q = 0; q < r; ++q) {
        const T w = xa[k * r + q];
        const T* b = bt + q * J;
        for (i64 jj = 0; jj < J; ++jj) acc[jj] += w * b[jj];
      }
      T* yk = y[k] + j0;
      for (i64 jj = 0; jj < jb; ++jj) yk[jj] += s * acc[jj];
    }
  }
}

// The baseline path of a whole group: no prefetch (the hardware prefetcher follows the rows).
template <class T>
void add_group_portable(const Group<T>& g, Dims dims, T* work) {
  static_assert(8 * kLanes <= kExpandCols, "shrink_rows<T, 8> lane sums fit the scratch");
  T* xa = work;
  T* rest = xa + kSmallGroup * dims.r;  // lane sums of the shrink, then B^T of the expand
  shrink_impl(g.x, g.c, g.A, dims.r, g.A_rs, dims.d_in, xa, rest);
  expand_impl(g.y, g.c, g.B, dims.r, g.B_rs, dims.d_out, xa, g.s, rest);
}

template <class T>
void add_group_any(const Group<T>& g, Dims dims, T* work) {
#if RSLORA_HAVE_X86_KERNELS
  switch (kernel_path()) {
    case KernelPath::avx512: return add_group_avx512(g, dims, work);
    case KernelPath::avx2: return add_group_avx2(g, dims, work);
    case KernelPath::baseline: break;
  }
#endif
  add_group_portable(g, dims, work);
}

}  // namespace

void add_group(const Group<float>& g, Dims dims, float* work) {
  add_group_any(g, dims, work);
}
void add_group(const Group<double>& g, Dims dims, double* work) {
  add_group_any(g, dims, work);
}

}  // namespace rslora::detail
