// gemm_split: a big GEMM as row blocks of C on threads that take them in turn (blas.hpp).
#include <algorithm>
#include <atomic>
#include <vector>

#include "block_pool.hpp"
#include "rslora/blas.hpp"

namespace rslora::blas {
namespace {

std::atomic<bool> g_split{true};

// Below this many multiply-adds one pass takes ~0.2 ms on one core: waking a helper gains little.
constexpr double kSplitWork = 8388608.0;
constexpr i64 kMinRows = 64;  // each block repacks all of op(B): keep it a small share of the block
constexpr i64 kRowUnit = 16;  // block edges on the GEMM kernels' tile rows

// Row offsets of the blocks: a quarter of the rows left each time (rounded down to kRowUnit),
// never under kMinRows, a short tail merged into the last block. Depends on m alone: big blocks
// first keep the blocks few, small ones last keep the wait for the slowest thread short.
std::vector<i64> row_blocks(i64 m) {
  std::vector<i64> at{0};
  for (i64 left = m; left > 0;) {
    i64 b = std::max(kMinRows, left / 4 / kRowUnit * kRowUnit);
    if (left - b < kMinRows) b = left;
    at.push_back(at.back() + b);
    left -= b;
  }
  return at;
}

}  // namespace

bool set_split_passes(bool enabled) { return g_split.exchange(enabled); }
bool split_passes() { return g_split.load(); }

template <class T>
void gemm_split(T alpha, Mat<const T> A, bool ta, Mat<const T> B, bool tb, T beta, Mat<T> C) {
  const i64 m = C.rows, n = C.cols, k = ta ? A.rows : A.cols;
  // n < 2 goes to GEMV in gemm(), whose own blocking over the rows could differ per block.
  if (!g_split.load() || m < 2 * kMinRows || n < 2 || double(m) * n * k < kSplitWork ||
      (ta ? A.cols : A.rows) != m)  // a shape error: gemm() reports it
    return gemm(alpha, A, ta, B, tb, beta, C);
  const PassThreads one;  // OpenBLAS's pool stays asleep: every block is a one-thread call
  if (one.threads() < 2) return gemm(alpha, A, ta, B, tb, beta, C);
  const std::vector<i64> at = row_blocks(m);
  detail::run_blocks(static_cast<i64>(at.size()) - 1, one.threads(), [&](i64 b) {
    one_thread_on_this_thread();
    const i64 r0 = at[b], rows = at[b + 1] - r0;
    Mat<const T> Ab = ta ? A.block(0, r0, A.rows, rows) : A.block(r0, 0, rows, A.cols);
    gemm<T>(alpha, Ab, ta, B, tb, beta, C.block(r0, 0, rows, n));
  });
}

template void gemm_split<float>(float, Mat<const float>, bool, Mat<const float>, bool, float, Mat<float>);
template void gemm_split<double>(double, Mat<const double>, bool, Mat<const double>, bool, double,
                                 Mat<double>);

}  // namespace rslora::blas
