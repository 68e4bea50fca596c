// Strided matrix views: the only way data enters the core. Strides are in elements and may be
// anything, negative (reversed axes) included; gemm() and gemv() decide whether BLAS can read a
// view as it is, and copy what it cannot.
#pragma once
#include <cstdint>

namespace rslora {

using i64 = std::int64_t;

template <class T>
struct Mat {
  T* data = nullptr;
  i64 rows = 0, cols = 0;
  i64 rs = 0, cs = 0;  // element strides of a row step and a column step

  T& operator()(i64 i, i64 j) const { return data[i * rs + j * cs]; }
  bool empty() const { return rows == 0 || cols == 0; }
  Mat<const T> as_const() const { return {data, rows, cols, rs, cs}; }
  Mat<T> t() const { return {data, cols, rows, cs, rs}; }  // transpose, no copy
  Mat<T> block(i64 r0, i64 c0, i64 nr, i64 nc) const {
    return {data + r0 * rs + c0 * cs, nr, nc, rs, cs};
  }
};

// A dense row-major view over a contiguous buffer.
template <class T>
Mat<T> row_major(T* data, i64 rows, i64 cols) {
  return {data, rows, cols, cols, 1};
}

// A strided vector (bias, scales).
template <class T>
struct Vec {
  T* data = nullptr;
  i64 size = 0;
  i64 stride = 1;
  T& operator[](i64 i) const { return data[i * stride]; }
};

}  // namespace rslora
