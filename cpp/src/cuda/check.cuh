// Error checking for every CUDA runtime call, kernel launch, cuBLAS and cuSOLVER call: a failure
// throws rslora::cuda::cuda_error naming the call, the file:line and the library's own message.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "rslora/cuda/ops.hpp"

namespace rslora::cuda {

[[noreturn]] void fail(const char* call, const char* file, int line, const std::string& why);
// fail() for a CUDA runtime error, with a hint when there is no usable driver or GPU.
[[noreturn]] void fail_cuda(const char* call, const char* file, int line, cudaError_t err);
const char* cusolver_status_string(int status);

}  // namespace rslora::cuda

#define RSLORA_CUDA_CHECK(call)                                                              \
  do {                                                                                       \
    cudaError_t err_ = (call);                                                               \
    if (err_ != cudaSuccess) ::rslora::cuda::fail_cuda(#call, __FILE__, __LINE__, err_);     \
  } while (0)

// After every <<<...>>>: launch-configuration errors surface here, not at the next sync.
#define RSLORA_LAUNCH_CHECK() RSLORA_CUDA_CHECK(cudaGetLastError())

#define RSLORA_CUBLAS_CHECK(call)                                                             \
  do {                                                                                        \
    cublasStatus_t st_ = (call);                                                              \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                         \
      ::rslora::cuda::fail(#call, __FILE__, __LINE__, cublasGetStatusString(st_));           \
  } while (0)

#define RSLORA_CUSOLVER_CHECK(call)                                                           \
  do {                                                                                        \
    int st_ = static_cast<int>(call);                                                         \
    if (st_ != 0)                                                                             \
      ::rslora::cuda::fail(#call, __FILE__, __LINE__, ::rslora::cuda::cusolver_status_string(st_)); \
  } while (0)
