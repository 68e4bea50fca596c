#include "rslora/multi.hpp"

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "rslora/blas.hpp"
#include "rslora/errors.hpp"
#include "multi_kernels.hpp"

namespace rslora {
namespace {

// Small groups whose rows are not unit-stride go through gemv row by row (no gather/scatter
// copies; the adapter stays in cache between the rows).
constexpr i64 kGemvRows = 2;

template <class T>
void add_rows_gemv(Mat<T> y, Mat<const T> x, Mat<const T> A, Mat<const T> B, T s,
                   const i64* rows, i64 c, T* xa) {
  const i64 r = A.rows;
  for (i64 k = 0; k < c; ++k) {
    const i64 i = rows[k];
    Vec<const T> xi{&x(i, 0), x.cols, x.cs};
    Vec<T> yi{&y(i, 0), y.cols, y.cs};
    blas::gemv<T>(T(1), A, false, xi, T(0), Vec<T>{xa, r, 1});         // xa = A x_i
    blas::gemv<T>(s, B, false, Vec<const T>{xa, r, 1}, T(1), yi);      // y_i += s B xa
  }
}

// Row copies with the unit-stride case spelled out, so that it vectorizes.
template <class T>
void copy_row(const T* src, i64 stride, T* dst, i64 len) {
  if (stride == 1) {
    std::memcpy(dst, src, static_cast<size_t>(len) * sizeof(T));
  } else {
    for (i64 j = 0; j < len; ++j) dst[j] = src[j * stride];
  }
}

template <class T>
void add_row(const T* src, T* dst, i64 stride, i64 len) {
  if (stride == 1) {
    for (i64 j = 0; j < len; ++j) dst[j] += src[j];
  } else {
    for (i64 j = 0; j < len; ++j) dst[j * stride] += src[j];
  }
}

}  // namespace

void check_adapter_ids(const i64* ids, i64 n, i64 n_adapters) {
  for (i64 i = 0; i < n; ++i)
    if (ids[i] < -1 || ids[i] >= n_adapters)
      throw std::out_of_range("adapter_ids[" + std::to_string(i) + "] = " + std::to_string(ids[i]) +
                              " is out of range for " + std::to_string(n_adapters) +
                              " adapters (valid: -1 for the base model, 0.." +
                              std::to_string(n_adapters - 1) + ")");
}

template <class T>
void lora_add_multi(Mat<T> y, Mat<const T> x, Stack<const T> A, Stack<const T> B, const i64* ids,
                    const double* scales) {
  const i64 n = x.rows, na = A.count, r = A.rows, d_in = x.cols, d_out = y.cols;
  check_adapter_ids(ids, n, na);  // before any work: never an out-of-bounds read
  if (n == 0 || r == 0 || na == 0) return;

  // Counting sort of the rows by adapter; rows with id -1 are left out.
  std::vector<i64> start(static_cast<size_t>(na + 1), 0);
  for (i64 i = 0; i < n; ++i)
    if (ids[i] >= 0) ++start[ids[i] + 1];
  for (i64 a = 0; a < na; ++a) start[a + 1] += start[a];
  std::vector<i64> order(static_cast<size_t>(start[na]));
  {
    std::vector<i64> next(start.begin(), start.end() - 1);
    for (i64 i = 0; i < n; ++i)
      if (ids[i] >= 0) order[next[ids[i]]++] = i;
  }

  // The small-group kernels need unit-stride rows of x, y, A_a and B_a.
  const bool unit_rows = (x.cs == 1 || d_in <= 1) && (y.cs == 1 || d_out <= 1) &&
                         (A.cs == 1 || d_in <= 1) && (B.cs == 1 || r <= 1);
  std::vector<T> xbuf, ybuf, xabuf, btbuf(static_cast<size_t>(detail::kExpandBlock * r)),
      accbuf(static_cast<size_t>(detail::kShrinkScratch * r));
  std::vector<const T*> xp;
  std::vector<T*> yp;
  for (i64 a = 0; a < na; ++a) {
    const i64 c = start[a + 1] - start[a];
    if (c == 0) continue;
    const i64* rows = order.data() + start[a];
    const T s = static_cast<T>(scales[a]);
    xabuf.resize(static_cast<size_t>(c * r));
    if (c <= detail::kSmallGroup && unit_rows) {  // memory-bound: read A_a, B_a once, in place
      xp.resize(static_cast<size_t>(c));
      yp.resize(static_cast<size_t>(c));
      for (i64 k = 0; k < c; ++k) xp[k] = &x(rows[k], 0), yp[k] = &y(rows[k], 0);
      detail::shrink(xp.data(), c, A[a].data, r, A.rs, d_in, xabuf.data(), accbuf.data());
      if (c <= kGemvRows) {  // BLAS gemv beats the blocked transpose when it is not amortized
        for (i64 k = 0; k < c; ++k)
          blas::gemv<T>(s, B[a], false, Vec<const T>{xabuf.data() + k * r, r, 1}, T(1),
                        Vec<T>{yp[k], d_out, 1});
      } else {
        detail::expand(yp.data(), c, B[a].data, r, B.rs, d_out, xabuf.data(), s, btbuf.data());
      }
      continue;
    }
    if (c <= kGemvRows) {
      add_rows_gemv(y, x, A[a], B[a], s, rows, c, xabuf.data());
      continue;
    }
    Mat<T> xa = row_major(xabuf.data(), c, r);
    if (rows[c - 1] - rows[0] == c - 1) {  // consecutive rows (sorted batches): no copies
      blas::gemm<T>(T(1), x.block(rows[0], 0, c, d_in), false, A[a], true, T(0), xa);
      blas::gemm<T>(s, xa.as_const(), false, B[a], true, T(1), y.block(rows[0], 0, c, d_out));
      continue;
    }
    xbuf.resize(static_cast<size_t>(c * d_in));
    ybuf.resize(static_cast<size_t>(c * d_out));
    Mat<T> xg = row_major(xbuf.data(), c, d_in), yg = row_major(ybuf.data(), c, d_out);
    for (i64 k = 0; k < c; ++k) copy_row(&x(rows[k], 0), x.cs, &xg(k, 0), d_in);
    blas::gemm<T>(T(1), xg.as_const(), false, A[a], true, T(0), xa);
    blas::gemm<T>(s, xa.as_const(), false, B[a], true, T(0), yg);
    for (i64 k = 0; k < c; ++k) add_row(&yg(k, 0), &y(rows[k], 0), y.cs, d_out);
  }
}

template <class T>
void lora_linear_multi(Mat<const T> x, Mat<const T> W, Stack<const T> A, Stack<const T> B,
                       const i64* ids, const double* scales, const Vec<const T>* bias, Mat<T> y) {
  check_adapter_ids(ids, x.rows, A.count);  // before the base GEMM too
  T beta = T(0);
  if (bias) {
    for (i64 i = 0; i < y.rows; ++i)
      for (i64 j = 0; j < y.cols; ++j) y(i, j) = (*bias)[j];
    beta = T(1);
  }
  blas::gemm<T>(T(1), x, false, W, true, beta, y);
  check_interrupt();
  lora_add_multi<T>(y, x, A, B, ids, scales);
}

#define RSLORA_INSTANTIATE(T)                                                                   \
  template void lora_add_multi<T>(Mat<T>, Mat<const T>, Stack<const T>, Stack<const T>,         \
                                  const i64*, const double*);                                   \
  template void lora_linear_multi<T>(Mat<const T>, Mat<const T>, Stack<const T>, Stack<const T>, \
                                     const i64*, const double*, const Vec<const T>*, Mat<T>);
RSLORA_INSTANTIATE(float)
RSLORA_INSTANTIATE(double)
#undef RSLORA_INSTANTIATE

}  // namespace rslora
