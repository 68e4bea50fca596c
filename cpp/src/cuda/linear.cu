// Fused LoRA linear and merge on the GPU: cuBLAS GEMMs with float32 accumulation, the bias
// broadcast by a small kernel so the base GEMM can add onto it (beta = 1).
#include "context.cuh"

namespace rslora::cuda {
namespace {

// y[i, :] = bias for every row (any strides).
template <class T>
__global__ void broadcast_rows(T* y, i64 rows, i64 cols, i64 rs, i64 cs, const T* bias,
                               i64 bstride) {
  const i64 total = rows * cols;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total;
       e += (i64)gridDim.x * blockDim.x) {
    const i64 i = e / cols, j = e % cols;
    y[i * rs + j * cs] = bias[j * bstride];
  }
}

}  // namespace

// y = bias broadcast over rows (shared with the multi-adapter path).
void fill_bias(const Ctx& ctx, DType t, DMat y, const DVec& bias) {
  const i64 total = y.rows * y.cols;
  if (total == 0) return;
  const unsigned grid = std::min<i64>(blocks_for(total, 256), 65535);
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    broadcast_rows<T><<<grid, 256, 0, stream_of(ctx)>>>(static_cast<T*>(y.data), y.rows, y.cols,
                                                        y.rs, y.cs,
                                                        static_cast<const T*>(bias.data),
                                                        bias.stride);
    RSLORA_LAUNCH_CHECK();
  });
}

// y = x W^T (+ bias): the base GEMM (shared with the multi-adapter path).
void base_linear(const Ctx& ctx, DType t, DMat x, DMat W, const DVec* bias, DMat y) {
  if (bias) fill_bias(ctx, t, y, *bias);
  gemm(ctx, t, t, 1.0f, x, false, W, true, bias ? 1.0f : 0.0f, y);
}

void lora_linear(const Ctx& ctx, DType t, DMat x, DMat W, DMat A, DMat B, const DVec* bias,
                 double s, DMat y, DMat xa) {
  DeviceGuard guard(ctx.device);
  base_linear(ctx, t, x, W, bias, y);
  if (A.rows == 0) return;  // r == 0: no LoRA term (xa is (n, 0))
  // Shrink: xa = x A^T, unscaled (the backward reuses it). Expand: y += s xa B^T, the scale
  // folded into the GEMM's alpha and y updated in place through beta = 1.
  gemm(ctx, t, t, 1.0f, x, false, A, true, 0.0f, xa);
  gemm(ctx, t, t, static_cast<float>(s), xa, false, B, true, 1.0f, y);
}

void merge(const Ctx& ctx, DType t, DMat W, DMat A, DMat B, double s) {
  DeviceGuard guard(ctx.device);
  gemm(ctx, t, t, static_cast<float>(s), B, false, A, false, 1.0f, W);
}

}  // namespace rslora::cuda
