// The backward pass of the fused LoRA linear layer y = x W^T + s (x A^T) B^T (PEFT shapes:
// W (d_out, d_in), A (r, d_in), B (d_out, r)); W and the bias are frozen, as in LoRA training.
// Shapes are checked by the caller (bindings); the core assumes them consistent.
#pragma once
#include "rslora/view.hpp"

namespace rslora {

// Gradients of a loss L with dy = dL/dy (n, d_out), x (n, d_in):
//   dx = dy W + s (dy B) A        (n, d_in)
//   dA = s (dy B)^T x             (r, d_in)
//   dB = s dy^T (x A^T)           (d_out, r)
// Each output is computed only when its pointer is non-null. xa, when non-null, is the forward's
// x A^T (n, r) and saves one n*d_in*r GEMM; otherwise it is recomputed if dB needs it.
// The only scratch is n-by-r (s dy B, and x A^T when not given): dx is written by the base GEMM
// and the LoRA term is accumulated onto it (beta = 1), so no n-by-d_in temporary is made.
template <class T>
void lora_linear_backward(Mat<const T> dy, Mat<const T> x, Mat<const T> W, Mat<const T> A,
                          Mat<const T> B, T s, const Mat<const T>* xa, Mat<T>* dx, Mat<T>* dA,
                          Mat<T>* dB);

}  // namespace rslora
