// The CUDA core's host API: plain C++ (no CUDA or pybind11 headers), so the bindings compile with
// the host compiler. All pointers are device pointers; every call is queued on `Ctx::stream`
// and returns without waiting, except where noted (multi-adapter validation reads a few ints).
//
// Matrices are strided views in elements, as on the CPU (`Mat`), plus a dtype tag. cuBLAS reads
// a matrix with one unit stride (row- or column-major with any leading dimension); the Python
// layer hands down such views (it copies, on the device, the rare view that has none).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace rslora::cuda {

using i64 = std::int64_t;

// A CUDA runtime, cuBLAS or cuSOLVER failure: the message names the call and the library's
// error string. Becomes RuntimeError in Python.
struct cuda_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class DType { f32, f16, bf16 };
const char* dtype_name(DType t);

struct DMat {
  void* data = nullptr;
  i64 rows = 0, cols = 0;
  i64 rs = 0, cs = 0;  // element strides of a row step and a column step
};

struct DVec {
  void* data = nullptr;
  i64 size = 0;
  i64 stride = 1;
};

// Where the work runs: a device ordinal and a cudaStream_t (nullptr = the legacy default stream).
struct Ctx {
  int device = 0;
  void* stream = nullptr;
};

// --- device queries (throw cuda_error when there is no driver or no device) --------------------
int device_count();
std::string device_name(int device);
// "major.minor" compute capability.
std::string compute_capability(int device);
// Wait for the work queued on ctx.stream (tests and benchmarks).
void synchronize(const Ctx& ctx);

// --- fused linear --------------------------------------------------------------------------------
// y = x W^T + bias + s (x A^T) B^T. x (n, d_in), W (d_out, d_in), A (r, d_in), B (d_out, r),
// y (n, d_out), xa (n, r) receives x A^T (unscaled). All of dtype t; bias (d_out) may be null.
// Three cuBLAS GEMMs with float32 accumulation: base (beta = 1 onto the broadcast bias, or 0),
// shrink into xa, expand into y with alpha = s and beta = 1 (no n-by-d_out temporary).
void lora_linear(const Ctx& ctx, DType t, DMat x, DMat W, DMat A, DMat B, const DVec* bias,
                 double s, DMat y, DMat xa);

// W += s B A in place: one GEMM with beta = 1.
void merge(const Ctx& ctx, DType t, DMat W, DMat A, DMat B, double s);

// Multi-adapter LoRA (SGMV): row i of x uses adapter ids[i] (-1: none).
// A_all (n_adapters, r, d_in) and B_all (n_adapters, d_out, r) are C-contiguous; ids are int64
// (stride in elements); scales is float32 (n_adapters) on the device. When `base` is true,
// y = x W^T + bias first (W, bias as in lora_linear); otherwise y is updated in place.
// The ids are checked on the device before any output is written; an id outside
// [-1, n_adapters) throws std::out_of_range naming the first bad row (one small read-back).
struct MultiArgs {
  DMat x, W, y;
  const DVec* bias = nullptr;
  const void* A_all = nullptr;
  const void* B_all = nullptr;
  i64 n_adapters = 0, r = 0;
  const std::int64_t* ids = nullptr;
  i64 ids_stride = 1;
  const float* scales = nullptr;
  bool base = true;
};
void lora_linear_multi(const Ctx& ctx, DType t, const MultiArgs& a);

// Randomized SVD of M (m, n), float32: subspace iteration with cuBLAS GEMMs and cuSOLVER QR,
// a Gaussian test matrix from a counter-based generator (Philox4x32-10) keyed by seed, and an
// l-by-l SVD (cuSOLVER gesvdj) of the triangular factor of the last QR. l = k + oversample,
// capped at min(m, n). U (m, k), S (k), Vt (k, n) are written; S is descending.
void rsvd(const Ctx& ctx, DMat M, i64 k, i64 oversample, int n_iter, std::uint64_t seed, DMat U,
          DVec S, DMat Vt);

// Fill a float32 buffer (n values, contiguous) with standard normals from Philox4x32-10:
// value i depends only on (seed, i), whatever the launch shape (tests check this).
void philox_normal(const Ctx& ctx, float* out, i64 n, std::uint64_t seed);
// One Philox4x32-10 block on the host: the same code as the device's (known-answer tests).
void philox4x32_10_host(const std::uint32_t ctr[4], const std::uint32_t key[2],
                        std::uint32_t out[4]);

}  // namespace rslora::cuda
