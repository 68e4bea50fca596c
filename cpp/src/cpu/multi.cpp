#include "rslora/multi.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "rslora/blas.hpp"
#include "rslora/errors.hpp"
#include "rslora/sizes.hpp"
#include "block_pool.hpp"
#include "multi_kernels.hpp"

namespace rslora {
namespace {

// --- arguments ---------------------------------------------------------------------------------

// Every error before the first write to y: ids (never an out-of-bounds read), then what BLAS
// could refuse later, then sizes whose products would wrap.
template <class T>
void check_add_multi_args(Mat<T> y, Mat<const T> x, Stack<const T> A, Stack<const T> B,
                          const i64* ids) {
  const i64 n = x.rows, r = A.rows, d_in = x.cols, d_out = y.cols;
  check_adapter_ids(ids, n, A.count);
  blas::check_fits({n, r, d_in, d_out, x.rs, x.cs, y.rs, y.cs, A.rs, A.cs, B.rs, B.cs});
  checked_size({n, d_in}, "x"), checked_size({n, d_out}, "y"), checked_size({n, r}, "x A^T");
}

// d_in == 0: x A^T = 0, and y_i += s (0 B^T), which is NaN where B holds NaN/Inf (as NumPy).
template <class T>
void add_multi_empty_x(Mat<T> y, Stack<const T> B, const i64* ids, const double* scales) {
  for (i64 i = 0; i < y.rows; ++i) {
    if (ids[i] < 0) continue;
    const auto Ba = B[ids[i]];
    const T s = static_cast<T>(scales[ids[i]]);
    for (i64 j = 0; j < y.cols; ++j) {
      T acc = T(0);
      for (i64 k = 0; k < Ba.cols; ++k) acc += T(0) * Ba(j, k);
      y(i, j) += s * acc;
    }
  }
}

// --- rows grouped by adapter -------------------------------------------------------------------

// The rows of each adapter: a counting sort by id (stable: rows keep their order inside a
// group); rows with id -1 are left out. Group a is rows(a)[0 .. count(a)).
struct Groups {
  std::vector<i64> start, order;
  i64 count(i64 a) const { return start[a + 1] - start[a]; }
  const i64* rows(i64 a) const { return order.data() + start[a]; }
};

Groups group_rows_by_adapter(const i64* ids, i64 n, i64 na) {
  Groups g;
  g.start.assign(static_cast<size_t>(na + 1), 0);
  for (i64 i = 0; i < n; ++i)
    if (ids[i] >= 0) ++g.start[ids[i] + 1];
  for (i64 a = 0; a < na; ++a) g.start[a + 1] += g.start[a];
  g.order.resize(static_cast<size_t>(g.start[na]));
  std::vector<i64> next(g.start.begin(), g.start.end() - 1);
  for (i64 i = 0; i < n; ++i)
    if (ids[i] >= 0) g.order[next[ids[i]]++] = i;
  return g;
}

// --- small groups: multi_kernels.hpp's kernels on the core's helper threads (block_pool) ----

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

// cut[t] .. cut[t + 1]: the items of thread t, contiguous ranges of about equal total cost.
std::vector<size_t> split_by_cost(const std::vector<i64>& cost, int nt) {
  i64 total = 0;
  for (i64 c : cost) total += c;
  std::vector<size_t> cut(static_cast<size_t>(nt + 1), cost.size());
  cut[0] = 0;
  i64 acc = 0;
  int t = 1;
  for (size_t g = 0; g < cost.size() && t < nt; ++g) {
    acc += cost[g];
    if (acc * nt >= total * t) cut[static_cast<size_t>(t++)] = g + 1;
  }
  return cut;
}

// The small groups (adapters `small`) through the kernels. Groups touch disjoint rows of y and
// call no BLAS; the result does not depend on the split (each group is computed the same way
// whichever thread takes it).
template <class T>
void add_small_groups(Mat<T> y, Mat<const T> x, Stack<const T> A, Stack<const T> B,
                      const double* scales, const Groups& groups, const std::vector<i64>& small) {
  if (small.empty()) return;
  const detail::Dims dims{A.rows, x.cols, y.cols};
  // Pointers to the rows of x and y in group order (a group's rows are a slice).
  std::vector<const T*> x_rows(groups.order.size());
  std::vector<T*> y_rows(groups.order.size());
  for (size_t k = 0; k < groups.order.size(); ++k)
    x_rows[k] = &x(groups.order[k], 0), y_rows[k] = &y(groups.order[k], 0);
  std::vector<i64> cost(small.size());
  for (size_t g = 0; g < small.size(); ++g) cost[g] = groups.count(small[g]) + kAdapterCost;
  i64 work = 0;
  for (i64 c : cost) work += c;
  const int nt = threads_for(static_cast<double>(work) * dims.r * (dims.d_in + dims.d_out));
  const std::vector<size_t> cut = split_by_cost(cost, nt);
  auto group = [&](size_t g) {
    const i64 a = small[g];
    detail::Group<T> grp;
    grp.x = x_rows.data() + groups.start[a];
    grp.y = y_rows.data() + groups.start[a];
    grp.c = groups.count(a);
    grp.A = A[a].data, grp.A_rs = A.rs;
    grp.B = B[a].data, grp.B_rs = B.rs;
    grp.s = static_cast<T>(scales[a]);
    return grp;
  };
  detail::run_blocks(nt, nt, [&](i64 t) {  // part t on the core's sleeping helpers
    // Scratch on a cache-line boundary: the kernels' vector loads of it never split a line.
    constexpr size_t kLineElems = 64 / sizeof(T);
    std::vector<T> buf(static_cast<size_t>(detail::group_scratch(dims.r)) + kLineElems);
    T* scratch = buf.data();
    while (reinterpret_cast<std::uintptr_t>(scratch) % 64 != 0) ++scratch;
    const size_t g0 = cut[static_cast<size_t>(t)], g1 = cut[static_cast<size_t>(t) + 1];
    for (size_t g = g0; g < g1; ++g) {
      detail::Group<T> grp = group(g);
      if (g + 1 < g1) {  // what this thread adds next, to prefetch meanwhile
        const detail::Group<T> next = group(g + 1);
        grp.next_A = next.A, grp.next_x = next.x, grp.next_c = next.c;
      }
      detail::add_group(grp, dims, scratch);
    }
  });
}

// --- big groups and strided rows: BLAS ----------------------------------------------------------

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

// Buffers of the BLAS path, reused from group to group.
template <class T>
struct BlasBuffers {
  std::vector<T> x, y, xa;
};

// Groups of up to kGemvRows rows go through gemv row by row (no gather/scatter copies; the
// adapter stays in cache between the rows).
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

// One group of c rows with one shrink and one expand GEMM (BLAS threads itself): straight on x
// and y when the rows are consecutive (sorted batches), else gathered and scattered.
template <class T>
void add_group_blas(Mat<T> y, Mat<const T> x, Mat<const T> A, Mat<const T> B, T s,
                    const i64* rows, i64 c, BlasBuffers<T>& buf) {
  const i64 r = A.rows, d_in = x.cols, d_out = y.cols;
  buf.xa.resize(static_cast<size_t>(c * r));
  if (c <= kGemvRows) return add_rows_gemv(y, x, A, B, s, rows, c, buf.xa.data());
  Mat<T> xa = row_major(buf.xa.data(), c, r);
  if (rows[c - 1] - rows[0] == c - 1) {
    blas::gemm<T>(T(1), x.block(rows[0], 0, c, d_in), false, A, true, T(0), xa);
    blas::gemm<T>(s, xa.as_const(), false, B, true, T(1), y.block(rows[0], 0, c, d_out));
    return;
  }
  buf.x.resize(static_cast<size_t>(c * d_in));
  buf.y.resize(static_cast<size_t>(c * d_out));
  Mat<T> xg = row_major(buf.x.data(), c, d_in), yg = row_major(buf.y.data(), c, d_out);
  for (i64 k = 0; k < c; ++k) copy_row(&x(rows[k], 0), x.cs, &xg(k, 0), d_in);
  blas::gemm<T>(T(1), xg.as_const(), false, A, true, T(0), xa);
  blas::gemm<T>(s, xa.as_const(), false, B, true, T(0), yg);
  for (i64 k = 0; k < c; ++k) add_row(&yg(k, 0), &y(rows[k], 0), y.cs, d_out);
}

}  // namespace

void check_adapter_ids(const i64* ids, i64 n, i64 n_adapters) {
  for (i64 i = 0; i < n; ++i)
    if (ids[i] < -1 || ids[i] >= n_adapters)
      throw std::out_of_range("adapter_ids[" + std::to_string(i) + "] = " + std::to_string(ids[i]) +
                              " is out of range for " + std::to_string(n_adapters) +
                              " adapters (valid: -1 for the base model" +
                              (n_adapters ? ", 0.." + std::to_string(n_adapters - 1) + ")"
                                          : std::string(" only)")));
}

template <class T>
void lora_add_multi(Mat<T> y, Mat<const T> x, Stack<const T> A, Stack<const T> B, const i64* ids,
                    const double* scales) {
  check_add_multi_args(y, x, A, B, ids);
  if (x.rows == 0 || A.rows == 0 || A.count == 0 || y.cols == 0) return;  // nothing to add
  if (x.cols == 0) return add_multi_empty_x(y, B, ids, scales);

  const Groups groups = group_rows_by_adapter(ids, x.rows, A.count);
  // The kernels take groups of up to kSmallGroup rows, with unit-stride rows of x, y, A_a, B_a.
  const i64 r = A.rows, d_in = x.cols, d_out = y.cols;
  const bool unit_rows = (x.cs == 1 || d_in <= 1) && (y.cs == 1 || d_out <= 1) &&
                         (A.cs == 1 || d_in <= 1) && (B.cs == 1 || r <= 1);
  std::vector<i64> small, big;
  for (i64 a = 0; a < A.count; ++a) {
    const i64 c = groups.count(a);
    if (c > 0) (c <= detail::kSmallGroup && unit_rows ? small : big).push_back(a);
  }
  add_small_groups(y, x, A, B, scales, groups, small);
  BlasBuffers<T> buf;
  for (i64 a : big)
    add_group_blas(y, x, A[a], B[a], static_cast<T>(scales[a]), groups.rows(a), groups.count(a),
                   buf);
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
