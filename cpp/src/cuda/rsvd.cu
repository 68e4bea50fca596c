// Randomized SVD on the GPU (float32), subspace iteration:
//   Y = orth(M Omega); repeat n_iter times: Z = orth(M^T Y), Y = orth(M Z);
//   Z = M^T Y = Q2 R (QR, keep R);  R^T = Ub S Vb^T (gesvdj, l x l);
//   U = Y Ub[:, :k],  Vt = (Q2 Vb[:, :k])^T.
// since M ~ Y Y^T M = Y (M^T Y)^T = Y R^T Q2^T. Every orth() is cuSOLVER geqrf + orgqr; the
// products are cuBLAS GEMMs reading M in its own layout (row- or column-major). Scratch is
// column-major. One host sync at the end reads gesvdj's convergence flag.
#include <algorithm>
#include <climits>

#include "philox.cuh"
#include "solver.cuh"

namespace rslora::cuda {
namespace {

__global__ void normal_kernel(float* out, i64 n, std::uint32_t k0, std::uint32_t k1) {
  const i64 groups = (n + 3) / 4;
  for (i64 g = blockIdx.x * (i64)blockDim.x + threadIdx.x; g < groups;
       g += (i64)gridDim.x * blockDim.x) {
    const Philox4 c = philox4x32_10(
        Philox4{{static_cast<std::uint32_t>(g), static_cast<std::uint32_t>(g >> 32), 0u, 0u}},
        k0, k1);
    float z[4];
    for (int p = 0; p < 2; ++p) {  // Box-Muller: two uniforms -> two normals
      const float rad = sqrtf(-2.0f * logf(uniform_open(c.v[2 * p])));
      float s, co;
      sincospif(2.0f * uniform_open(c.v[2 * p + 1]), &s, &co);
      z[2 * p] = rad * co;
      z[2 * p + 1] = rad * s;
    }
    for (int q = 0; q < 4; ++q)
      if (4 * g + q < n) out[4 * g + q] = z[q];
  }
}

// Rt (l x l, column-major) = R^T, R the upper triangle of the geqrf output Z (ld = ldz).
__global__ void transpose_r(const float* z, i64 ldz, float* rt, i64 l) {
  const i64 total = l * l;
  for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total;
       e += (i64)gridDim.x * blockDim.x) {
    const i64 i = e % l, j = e / l;  // Rt(i, j) = R(j, i)
    rt[i + j * l] = (i >= j) ? z[j + i * ldz] : 0.0f;
  }
}

__global__ void copy_vec(const float* src, float* dst, i64 n, i64 stride) {
  const i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x;
  if (i < n) dst[i * stride] = src[i];
}

DMat colmaj(float* p, i64 rows, i64 cols) { return {p, rows, cols, 1, std::max<i64>(rows, 1)}; }

unsigned grid_for(i64 n) { return static_cast<unsigned>(std::min<i64>(blocks_for(n, 256), 4096)); }

}  // namespace

void philox4x32_10_host(const std::uint32_t ctr[4], const std::uint32_t key[2],
                        std::uint32_t out[4]) {
  const Philox4 c = philox4x32_10(Philox4{{ctr[0], ctr[1], ctr[2], ctr[3]}}, key[0], key[1]);
  for (int i = 0; i < 4; ++i) out[i] = c.v[i];
}

void philox_normal(const Ctx& ctx, float* out, i64 n, std::uint64_t seed) {
  if (n == 0) return;
  DeviceGuard guard(ctx.device);
  normal_kernel<<<grid_for((n + 3) / 4), 256, 0, stream_of(ctx)>>>(
      out, n, static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
  RSLORA_LAUNCH_CHECK();
}

void rsvd(const Ctx& ctx, DMat M, i64 k, i64 oversample, int n_iter, std::uint64_t seed, DMat U,
          DVec S, DMat Vt) {
  DeviceGuard guard(ctx.device);
  const i64 m = M.rows, n = M.cols, mn = std::min(m, n);
  if (k <= 0) return;
  if (k > mn) throw std::invalid_argument("k must be <= min(m, n)");
  if (m > INT_MAX || n > INT_MAX) throw std::invalid_argument("M is too large for cuSOLVER");
  const i64 l = std::min(k + std::max<i64>(oversample, 0), mn);
  const int im = static_cast<int>(m), in = static_cast<int>(n), il = static_cast<int>(l);
  const Solver& sv = solver();
  cusolverDnHandle_t h = solver_handle(ctx);
  cudaStream_t st = stream_of(ctx);

  gesvdjInfo_t params = nullptr;
  RSLORA_CUSOLVER_CHECK(sv.create_gesvdj_info(&params));
  struct ParamsGuard {  // the info object lives until the end of the call (after the sync)
    const Solver& sv;
    gesvdjInfo_t p;
    ~ParamsGuard() { sv.destroy_gesvdj_info(p); }
  } params_guard{sv, params};

  // Scratch: Y (m x l), Z (n x l), Rt, Ub, Vb (l x l), tau, Sv (l), info.
  const i64 floats = m * l + n * l + 3 * l * l + 2 * l;
  Scratch buf(ctx, sizeof(float) * floats + sizeof(int));
  float* Y = buf.as<float>();
  float* Z = Y + m * l;
  float* Rt = Z + n * l;
  float* Ub = Rt + l * l;
  float* Vb = Ub + l * l;
  float* tau = Vb + l * l;
  float* Sv = tau + l;
  int* info = reinterpret_cast<int*>(Sv + l);

  int lwork = 0, w = 0;
  RSLORA_CUSOLVER_CHECK(sv.geqrf_size(h, im, il, Y, im, &w)); lwork = std::max(lwork, w);
  RSLORA_CUSOLVER_CHECK(sv.geqrf_size(h, in, il, Z, in, &w)); lwork = std::max(lwork, w);
  RSLORA_CUSOLVER_CHECK(sv.orgqr_size(h, im, il, il, Y, im, tau, &w)); lwork = std::max(lwork, w);
  RSLORA_CUSOLVER_CHECK(sv.orgqr_size(h, in, il, il, Z, in, tau, &w)); lwork = std::max(lwork, w);
  RSLORA_CUSOLVER_CHECK(sv.gesvdj_size(h, CUSOLVER_EIG_MODE_VECTOR, 1, il, il, Rt, il, Sv, Ub, il,
                                       Vb, il, &w, params));
  lwork = std::max(lwork, w);
  Scratch work(ctx, sizeof(float) * std::max(lwork, 1));

  auto orth = [&](float* a, int rows) {  // a (rows x l, ld rows) <- its Q factor
    RSLORA_CUSOLVER_CHECK(sv.geqrf(h, rows, il, a, rows, tau, work.as<float>(), lwork, info));
    RSLORA_CUSOLVER_CHECK(sv.orgqr(h, rows, il, il, a, rows, tau, work.as<float>(), lwork, info));
  };
  const DMat Yv = colmaj(Y, m, l), Zv = colmaj(Z, n, l);

  philox_normal(ctx, Z, n * l, seed);                              // Omega (n x l)
  gemm(ctx, DType::f32, DType::f32, 1.0f, M, false, Zv, false, 0.0f, Yv);  // Y = M Omega
  orth(Y, im);
  for (int it = 0; it < n_iter; ++it) {
    gemm(ctx, DType::f32, DType::f32, 1.0f, M, true, Yv, false, 0.0f, Zv);  // Z = M^T Y
    orth(Z, in);
    gemm(ctx, DType::f32, DType::f32, 1.0f, M, false, Zv, false, 0.0f, Yv);  // Y = M Z
    orth(Y, im);
  }
  gemm(ctx, DType::f32, DType::f32, 1.0f, M, true, Yv, false, 0.0f, Zv);  // Z = M^T Y = B^T
  RSLORA_CUSOLVER_CHECK(sv.geqrf(h, in, il, Z, in, tau, work.as<float>(), lwork, info));
  transpose_r<<<grid_for(l * l), 256, 0, st>>>(Z, n, Rt, l);
  RSLORA_LAUNCH_CHECK();
  RSLORA_CUSOLVER_CHECK(sv.orgqr(h, in, il, il, Z, in, tau, work.as<float>(), lwork, info));  // Q2
  RSLORA_CUSOLVER_CHECK(sv.gesvdj(h, CUSOLVER_EIG_MODE_VECTOR, 1, il, il, Rt, il, Sv, Ub, il, Vb,
                                  il, work.as<float>(), lwork, info, params));

  gemm(ctx, DType::f32, DType::f32, 1.0f, Yv, false, colmaj(Ub, l, k), false, 0.0f, U);
  gemm(ctx, DType::f32, DType::f32, 1.0f, colmaj(Vb, l, k), true, Zv, true, 0.0f, Vt);
  copy_vec<<<blocks_for(k, 256), 256, 0, st>>>(Sv, static_cast<float*>(S.data), k, S.stride);
  RSLORA_LAUNCH_CHECK();

  int info_host = 0;
  RSLORA_CUDA_CHECK(cudaMemcpyAsync(&info_host, info, sizeof(int), cudaMemcpyDeviceToHost, st));
  RSLORA_CUDA_CHECK(cudaStreamSynchronize(st));
  if (info_host != 0)
    throw cuda_error("rsvd: cuSOLVER gesvdj did not converge (info = " +
                     std::to_string(info_host) + ")");
}

}  // namespace rslora::cuda
