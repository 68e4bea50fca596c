// What every .cu file shares: the device guard, per-device cuBLAS handles bound to the caller's
// stream, stream-ordered scratch, dtype traits and the strided GEMM on views.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "check.cuh"

namespace rslora::cuda {

// Makes ctx.device current for the scope of a call, then restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1, dev_ = -1;
};

inline cudaStream_t stream_of(const Ctx& ctx) { return static_cast<cudaStream_t>(ctx.stream); }

// The calling thread's cuBLAS handle for ctx.device, set to ctx.stream (call under a DeviceGuard).
cublasHandle_t blas_handle(const Ctx& ctx);

// Device scratch from the stream-ordered pool: freed on the stream when the scope ends, so
// later work on the same stream may still use it safely until then.
class Scratch {
 public:
  Scratch(const Ctx& ctx, size_t bytes);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T>
  T* as() const { return static_cast<T*>(p_); }

 private:
  void* p_ = nullptr;
  cudaStream_t s_;
};

template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr cudaDataType_t value = CUDA_R_32F; };
template <> struct dtype_of<__half> { static constexpr cudaDataType_t value = CUDA_R_16F; };
template <> struct dtype_of<__nv_bfloat16> { static constexpr cudaDataType_t value = CUDA_R_16BF; };

cudaDataType_t cuda_type(DType t);
size_t dtype_size(DType t);

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Run f with the element type of t (float, __half or __nv_bfloat16).
template <class F>
void dispatch(DType t, F&& f) {
  switch (t) {
    case DType::f32: f(float{}); break;
    case DType::f16: f(__half{}); break;
    case DType::bf16: f(__nv_bfloat16{}); break;
  }
}

// C = alpha op(A) op(B) + beta C on strided views, with float32 accumulation (and float32
// alpha, beta). A and B have type tab, C has type tc (cuBLAS supports tab == tc, and half
// inputs with a float32 C). Each view needs one unit stride; throws std::invalid_argument if not.
// k == 0 scales C by beta (beta == 0 writes zeros). alpha == 0 keeps NaN/Inf of A and B in C
// (0 * Inf = NaN), as the CPU gemm does.
void gemm(const Ctx& ctx, DType tab, DType tc, float alpha, DMat A, bool ta, DMat B, bool tb,
          float beta, DMat C);

// Every entry of a view set to 0 (any strides).
void zero(const Ctx& ctx, DType t, DMat C);

// y = bias broadcast over rows; y = x W^T (+ bias). In linear.cu, shared with multi.cu.
void fill_bias(const Ctx& ctx, DType t, DMat y, const DVec& bias);
void base_linear(const Ctx& ctx, DType t, DMat x, DMat W, const DVec* bias, DMat y);

inline unsigned blocks_for(i64 n, int per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

}  // namespace rslora::cuda
