// The fused LoRA linear layer and in-place merge (PEFT shapes: W (d_out, d_in), A (r, d_in),
// B (d_out, r)). Shapes are checked by the caller (bindings); the core assumes them consistent.
#pragma once
#include "rslora/view.hpp"

namespace rslora {

// y = x W^T + bias + s (x A^T) B^T, with x (n, d_in) and y (n, d_out).
// The only scratch is xa (n, r), which receives x A^T unscaled (the backward reuses it); s is
// applied inside the last GEMM, so no n-by-d_out temporary is ever made. bias may be null.
template <class T>
void lora_linear(Mat<const T> x, Mat<const T> W, Mat<const T> A, Mat<const T> B,
                 const Vec<const T>* bias, T s, Mat<T> y, Mat<T> xa);

// W += s B A in place: one GEMM with beta = 1, no d_out-by-d_in temporary. unmerge is s -> -s.
template <class T>
void merge(Mat<T> W, Mat<const T> A, Mat<const T> B, T s);

}  // namespace rslora
