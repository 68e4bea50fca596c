// Errors, device queries, handles, scratch and the strided GEMM shared by all CUDA ops.
#include <algorithm>
#include <climits>
#include <stdexcept>
#include <vector>

#include "context.cuh"

namespace rslora::cuda {

void fail(const char* call, const char* file, int line, const std::string& why) {
  std::string f(file);
  auto slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  throw cuda_error("CUDA error in " + std::string(call) + " (" + f + ":" + std::to_string(line) +
                   "): " + why);
}

void fail_cuda(const char* call, const char* file, int line, cudaError_t err) {
  std::string why = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice)
    why += " (no usable NVIDIA GPU: this needs a GPU and a driver for CUDA 13)";
  fail(call, file, line, why);
}

const char* cusolver_status_string(int status) {
  switch (status) {  // cusolverStatus_t values (cuSOLVER has no string function of its own)
    case 1: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case 2: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case 3: return "CUSOLVER_STATUS_INVALID_VALUE";
    case 4: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case 5: return "CUSOLVER_STATUS_MAPPING_ERROR";
    case 6: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case 7: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case 8: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case 9: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "cuSOLVER error";
  }
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
  }
  return "?";
}

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::f16: return CUDA_R_16F;
    case DType::bf16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

size_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

int device_count() {
  int n = 0;
  RSLORA_CUDA_CHECK(cudaGetDeviceCount(&n));
  return n;
}

std::string device_name(int device) {
  cudaDeviceProp p{};
  RSLORA_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  return p.name;
}

std::string compute_capability(int device) {
  int major = 0, minor = 0;
  RSLORA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  RSLORA_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return std::to_string(major) + "." + std::to_string(minor);
}

void synchronize(const Ctx& ctx) {
  DeviceGuard g(ctx.device);
  RSLORA_CUDA_CHECK(cudaStreamSynchronize(stream_of(ctx)));
}

DeviceGuard::DeviceGuard(int device) : dev_(device) {
  RSLORA_CUDA_CHECK(cudaGetDevice(&prev_));
  if (prev_ != dev_) RSLORA_CUDA_CHECK(cudaSetDevice(dev_));
}

DeviceGuard::~DeviceGuard() {
  if (prev_ >= 0 && prev_ != dev_) cudaSetDevice(prev_);  // no throw from a destructor
}

cublasHandle_t blas_handle(const Ctx& ctx) {
  // One handle per (thread, device): cuBLAS handles must not be shared by concurrent threads.
  // Never destroyed: destroying them at thread exit can race the driver's own teardown.
  thread_local std::vector<cublasHandle_t> handles;
  if (ctx.device < 0) throw std::invalid_argument("negative CUDA device ordinal");
  if (handles.size() <= static_cast<size_t>(ctx.device)) handles.resize(ctx.device + 1, nullptr);
  cublasHandle_t& h = handles[ctx.device];
  if (!h) RSLORA_CUBLAS_CHECK(cublasCreate(&h));
  RSLORA_CUBLAS_CHECK(cublasSetStream(h, stream_of(ctx)));
  return h;
}

Scratch::Scratch(const Ctx& ctx, size_t bytes) : s_(stream_of(ctx)) {
  if (bytes) RSLORA_CUDA_CHECK(cudaMallocAsync(&p_, bytes, s_));
}

Scratch::~Scratch() {
  if (p_) cudaFreeAsync(p_, s_);
}

namespace {

// A view as cuBLAS sees it: view = trans ? Buf^T : Buf, Buf column-major with leading dim ld.
struct Cm {
  void* p;
  bool trans;
  i64 ld;
};

Cm colmajor(const DMat& v, const char* name) {
  const i64 r = v.rows, c = v.cols;
  // Row-major (unit column stride): the view is the transpose of a column-major buffer.
  if ((c <= 1 || v.cs == 1) && (r <= 1 || v.rs >= std::max<i64>(c, 1)))
    return {v.data, true, r <= 1 ? std::max<i64>(c, 1) : v.rs};
  if ((r <= 1 || v.rs == 1) && (c <= 1 || v.cs >= std::max<i64>(r, 1)))
    return {v.data, false, c <= 1 ? std::max<i64>(r, 1) : v.cs};
  throw std::invalid_argument(std::string(name) + " has strides (" + std::to_string(v.rs) + ", " +
                              std::to_string(v.cs) +
                              ") without a unit stride; cuBLAS needs a row- or column-major view");
}

int as_int(i64 v, const char* what) {
  if (v > INT_MAX) throw std::invalid_argument(std::string(what) + " exceeds cuBLAS's int range");
  return static_cast<int>(v);
}

template <class U>
__global__ void zero_kernel(U* p, i64 rows, i64 cols, i64 rs, i64 cs) {
  const i64 total = rows * cols;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total;
       e += (i64)gridDim.x * blockDim.x) {
    const i64 i = e / cols, j = e % cols;
    p[i * rs + j * cs] = U(0);
  }
}

// out (rows x cols, row-major) = 0 * P: 0 where P is finite, NaN where it holds NaN or Inf
// (IEEE's 0 * Inf), read from the exponent bits, so one kernel serves every float type.
template <class U>
__global__ void times_zero_kernel(const U* p, i64 rows, i64 cols, i64 rs, i64 cs, U exp_bits,
                                  U nan, U* out) {
  const i64 total = rows * cols;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total;
       e += (i64)gridDim.x * blockDim.x) {
    const i64 i = e / cols, j = e % cols;
    out[e] = (p[i * rs + j * cs] & exp_bits) == exp_bits ? nan : U(0);
  }
}

// 0 * P as a row-major matrix in scratch (which must outlive the work queued on it).
DMat times_zero(const Ctx& ctx, DType t, DMat P, const Scratch& buf) {
  const i64 total = P.rows * P.cols;
  const unsigned grid = std::min<i64>(blocks_for(total, 256), 65535);
  cudaStream_t st = stream_of(ctx);
  switch (t) {
    case DType::f32:
      times_zero_kernel<<<grid, 256, 0, st>>>(static_cast<const unsigned*>(P.data), P.rows, P.cols,
                                              P.rs, P.cs, 0x7F800000u, 0x7FC00000u,
                                              buf.as<unsigned>());
      break;
    case DType::f16:
    case DType::bf16: {
      using H = unsigned short;
      const bool f16 = t == DType::f16;
      times_zero_kernel<<<grid, 256, 0, st>>>(static_cast<const H*>(P.data), P.rows, P.cols, P.rs,
                                              P.cs, H(f16 ? 0x7C00 : 0x7F80),
                                              H(f16 ? 0x7E00 : 0x7FC0), buf.as<H>());
      break;
    }
  }
  RSLORA_LAUNCH_CHECK();
  return DMat{buf.as<void>(), P.rows, P.cols, P.cols, 1};
}

}  // namespace

void zero(const Ctx& ctx, DType t, DMat C) {
  const i64 total = C.rows * C.cols;
  if (total == 0) return;
  const unsigned grid = std::min<i64>(blocks_for(total, 256), 65535);
  if (dtype_size(t) == 4)
    zero_kernel<<<grid, 256, 0, stream_of(ctx)>>>(static_cast<unsigned*>(C.data), C.rows, C.cols,
                                                   C.rs, C.cs);
  else
    zero_kernel<<<grid, 256, 0, stream_of(ctx)>>>(static_cast<unsigned short*>(C.data), C.rows,
                                                   C.cols, C.rs, C.cs);
  RSLORA_LAUNCH_CHECK();
}

void gemm(const Ctx& ctx, DType tab, DType tc, float alpha, DMat A, bool ta, DMat B, bool tb,
          float beta, DMat C) {
  const i64 m = C.rows, n = C.cols, k = ta ? A.rows : A.cols;
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: cuBLAS is not asked to handle it
    if (beta == 0.0f) zero(ctx, tc, C);
    else if (beta != 1.0f) throw std::logic_error("gemm: k == 0 with beta not in {0, 1}");
    return;
  }
  if (alpha == 0.0f) {  // (0 A) B with 0 A the smaller copy: NaN/Inf of A and B reach C, as in
    // the CPU gemm (rslora/blas.hpp) and the NumPy expression; a BLAS may skip the product
    const bool on_a = A.rows * A.cols <= B.rows * B.cols;
    const DMat P = on_a ? A : B;
    Scratch buf(ctx, static_cast<size_t>(P.rows * P.cols) * dtype_size(tab));
    const DMat Z = times_zero(ctx, tab, P, buf);
    return on_a ? gemm(ctx, tab, tc, 1.0f, Z, ta, B, tb, beta, C)
                : gemm(ctx, tab, tc, 1.0f, A, ta, Z, tb, beta, C);
  }
  const Cm a = colmajor(A, "A"), b = colmajor(B, "B"), c = colmajor(C, "C");
  cublasHandle_t h = blas_handle(ctx);
  const cudaDataType_t t_ab = cuda_type(tab), t_c = cuda_type(tc);
  auto op = [](bool t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; };
  if (!c.trans) {
    // Buf_C (m x n) = op(A) op(B), where op(A) = Buf_A^(ta xor a.trans).
    RSLORA_CUBLAS_CHECK(cublasGemmEx(
        h, op(ta != a.trans), op(tb != b.trans), as_int(m, "m"), as_int(n, "n"), as_int(k, "k"),
        &alpha, a.p, t_ab, as_int(a.ld, "lda"), b.p, t_ab, as_int(b.ld, "ldb"), &beta, c.p, t_c,
        as_int(c.ld, "ldc"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  } else {
    // C = Buf_C^T, so Buf_C (n x m) = op(B)^T op(A)^T.
    RSLORA_CUBLAS_CHECK(cublasGemmEx(
        h, op(tb == b.trans), op(ta == a.trans), as_int(n, "n"), as_int(m, "m"), as_int(k, "k"),
        &alpha, b.p, t_ab, as_int(b.ld, "ldb"), a.p, t_ab, as_int(a.ld, "lda"), &beta, c.p, t_c,
        as_int(c.ld, "ldc"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
}

}  // namespace rslora::cuda
