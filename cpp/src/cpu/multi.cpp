#include "rslora/multi.hpp"

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "rslora/blas.hpp"
#include "rslora/errors.hpp"
#include "rslora/sizes.hpp"
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

// Per-thread scratch of the small-group kernels.
template <class T>
struct Scratch {
  std::vector<T> xa, bt, acc;
  std::vector<const T*> xp;
  std::vector<T*> yp;
  explicit Scratch(i64 r)
      : bt(static_cast<size_t>(detail::kExpandBlock * r)),
        acc(static_cast<size_t>(detail::kShrinkScratch * r)) {}
};

// One group of c <= kSmallGroup rows (unit-stride rows): the adapter is read once, in place.
template <class T>
void add_small_group(Mat<T> y, Mat<const T> x, Mat<const T> A, Mat<const T> B, T s,
                     const i64* rows, i64 c, Scratch<T>& buf) {
  const i64 r = A.rows;
  buf.xa.resize(static_cast<size_t>(c * r));
  buf.xp.resize(static_cast<size_t>(c));
  buf.yp.resize(static_cast<size_t>(c));
  for (i64 k = 0; k < c; ++k) buf.xp[k] = &x(rows[k], 0), buf.yp[k] = &y(rows[k], 0);
  detail::shrink(buf.xp.data(), c, A.data, r, A.rs, x.cols, buf.xa.data(), buf.acc.data());
  detail::expand(buf.yp.data(), c, B.data, r, B.rs, y.cols, buf.xa.data(), s, buf.bt.data());
}

// A group's fixed cost (reading its adapter) in rows: a row costs 2 r (d_in + d_out) flops
// against r (d_in + d_out) adapter elements streamed from memory.
constexpr i64 kAdapterCost = 2;

// Threads of our own for `flops` of small-group work: as many as BLAS may use (so that
// threadpoolctl's limits, and a limit of one, apply to us too), none below ~2 MFLOP, where
// starting a thread costs more than it saves.
int threads_for(double flops) {
  if (flops < 2e6) return 1;
  int nt = blas::num_threads();
  const int hw = static_cast<int>(std::thread::hardware_concurrency());
  if (nt <= 0) nt = hw > 0 ? hw : 1;
  if (hw > 0) nt = std::min(nt, hw);
  return std::max(1, std::min(nt, static_cast<int>(flops / 1e6)));
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
  // Every error before the first write to y: ids, then what BLAS could refuse later.
  check_adapter_ids(ids, n, na);  // never an out-of-bounds read
  blas::check_fits({n, r, d_in, d_out, x.rs, x.cs, y.rs, y.cs, A.rs, A.cs, B.rs, B.cs});
  checked_size({n, d_in}, "x"), checked_size({n, d_out}, "y"), checked_size({n, r}, "x A^T");
  if (n == 0 || r == 0 || na == 0 || d_out == 0) return;  // nothing to add (and no row to form)
  if (d_in == 0) {  // x A^T = 0: y_i += s (0 B^T), which is NaN where B holds NaN/Inf (as NumPy)
    for (i64 i = 0; i < n; ++i) {
      if (ids[i] < 0) continue;
      const auto Ba = B[ids[i]];
      const T s = static_cast<T>(scales[ids[i]]);
      for (i64 j = 0; j < d_out; ++j) {
        T acc = T(0);
        for (i64 k = 0; k < r; ++k) acc += T(0) * Ba(j, k);
        y(i, j) += s * acc;
      }
    }
    return;
  }

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
  auto count = [&](i64 a) { return start[a + 1] - start[a]; };
  auto in_kernels = [&](i64 c) { return c > 0 && c <= detail::kSmallGroup && unit_rows; };

  // Groups for the small-group kernels, shared out over threads of our own: they touch disjoint
  // rows of y, call no BLAS, and the result does not depend on the split (each group is computed
  // the same way whichever thread takes it). Cost of a group ~ its rows plus reading its adapter.
  std::vector<i64> small;
  i64 work = 0;
  for (i64 a = 0; a < na; ++a)
    if (in_kernels(count(a))) small.push_back(a), work += count(a) + kAdapterCost;
  const int nt = threads_for(static_cast<double>(work) * r * (d_in + d_out));
  auto run_small = [&](size_t g0, size_t g1) {
    Scratch<T> buf(r);
    for (size_t g = g0; g < g1; ++g) {
      const i64 a = small[g], c = count(a);
      add_small_group(y, x, A[a], B[a], static_cast<T>(scales[a]), order.data() + start[a], c,
                      buf);
    }
  };
  if (nt <= 1) {
    run_small(0, small.size());
  } else {
    // Contiguous ranges of equal cost; thread t takes range t, this thread range 0.
    std::vector<size_t> cut(static_cast<size_t>(nt + 1), small.size());
    cut[0] = 0;
    i64 acc = 0;
    int t = 1;
    for (size_t g = 0; g < small.size() && t < nt; ++g) {
      acc += count(small[g]) + kAdapterCost;
      if (acc * nt >= work * t) cut[static_cast<size_t>(t++)] = g + 1;
    }
    std::vector<std::thread> pool;
    std::exception_ptr err;
    std::mutex err_mutex;
    auto range = [&](int k) {
      try {
        run_small(cut[static_cast<size_t>(k)], cut[static_cast<size_t>(k + 1)]);
      } catch (...) {
        std::lock_guard<std::mutex> lock(err_mutex);
        if (!err) err = std::current_exception();
      }
    };
    int k = 1;
    try {
      for (; k < nt; ++k) pool.emplace_back(range, k);
    } catch (const std::system_error&) {  // no thread to be had: the rest here
    }
    range(0);
    for (; k < nt; ++k) range(k);
    for (auto& th : pool) th.join();
    if (err) std::rethrow_exception(err);
  }

  // The rest (big groups, strided rows) through BLAS, which threads itself.
  std::vector<T> xbuf, ybuf, xabuf;
  for (i64 a = 0; a < na; ++a) {
    const i64 c = count(a);
    if (c == 0 || in_kernels(c)) continue;
    const i64* rows = order.data() + start[a];
    const T s = static_cast<T>(scales[a]);
    xabuf.resize(static_cast<size_t>(c * r));
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
  blas::check_fits({x.rows, x.cols, y.cols, A.rows, x.rs, x.cs, y.rs, y.cs, W.rs, W.cs, A.rs,
                    A.cs, B.rs, B.cs});
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
