// Multi-adapter LoRA (the SGMV/BGMV operation of multi-LoRA serving): every row of x picks its
// own adapter from a stack. PEFT shapes: A_all (n_adapters, r, d_in), B_all (n_adapters, d_out, r).
// Shapes are checked by the caller (bindings); adapter ids are checked here, before any work.
#pragma once
#include "rslora/view.hpp"

namespace rslora {

// A strided stack of equally shaped matrices (a 3-D array).
template <class T>
struct Stack {
  T* data = nullptr;
  i64 count = 0, rows = 0, cols = 0;
  i64 ms = 0, rs = 0, cs = 0;  // element strides between matrices, rows, columns
  Mat<T> operator[](i64 i) const { return {data + i * ms, rows, cols, rs, cs}; }
};

// Throws std::out_of_range naming the first row whose id is not in [-1, n_adapters).
void check_adapter_ids(const i64* ids, i64 n, i64 n_adapters);

// y[i] += scales[a] (x[i] A_a^T) B_a^T for every row i with a = ids[i] != -1 (-1: base only).
// Rows are grouped by adapter with a counting sort (stable: rows keep their order inside a
// group). Groups of up to 32 rows with unit-stride rows use the kernels of multi_kernels.hpp
// (AVX-512 where the CPU has it), which read x and write y in place and each adapter element
// once; these groups are shared out over threads of our own (as many as BLAS may use, so a
// threadpoolctl limit of 1 means one thread; spawned per call and joined, never spinning), with
// a result independent of the thread count. Bigger groups are GEMM-shaped: one shrink and one
// expand GEMM, straight on x and y when the rows are consecutive, gathered and scattered
// otherwise.
template <class T>
void lora_add_multi(Mat<T> y, Mat<const T> x, Stack<const T> A, Stack<const T> B, const i64* ids,
                    const double* scales);

// y = x W^T + bias (one GEMM over the whole batch), then lora_add_multi. bias may be null.
template <class T>
void lora_linear_multi(Mat<const T> x, Mat<const T> W, Stack<const T> A, Stack<const T> B,
                       const i64* ids, const double* scales, const Vec<const T>* bias, Mat<T> y);

}  // namespace rslora
