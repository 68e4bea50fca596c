// Multi-adapter LoRA (SGMV): every row of x picks its adapter. Rows are grouped into segments
// sharing an adapter (a counting sort on the device), cut into tiles of TM rows; each tile's
// shrink and expand load that adapter's A and B blocks once into shared memory for all its rows.
//
// Steps: count + validate ids (device) -> read the n_adapters counts back (the only host
// round trip: it sizes the tiles) -> error before any output is written if an id is bad ->
// base GEMM -> scatter row indices into segments -> shrink t = s_a x A_a^T (float32, n_sel x r)
// -> expand y += t B_a^T in place, float32 accumulation, one rounding to the output dtype.
#include <climits>
#include <vector>

#include "context.cuh"

namespace rslora::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int TM = 16;   // rows per tile
constexpr int KC = 32;   // d_in chunk of the shrink
constexpr int RC = 64;   // rank columns per shrink block
constexpr int RK = 32;   // rank chunk of the expand
constexpr int CN = 128;  // output columns per expand block

__global__ void count_ids(const std::int64_t* ids, i64 stride, i64 n, i64 n_adapters, int* counts,
                          int* first_bad) {
  const i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const std::int64_t a = ids[i * stride];
  if (a < -1 || a >= n_adapters) {
    atomicMin(first_bad, static_cast<int>(i));
    return;
  }
  if (a >= 0) atomicAdd(&counts[a], 1);
}

__global__ void scatter_rows(const std::int64_t* ids, i64 stride, i64 n, int* cursor, int* perm) {
  const i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const std::int64_t a = ids[i * stride];
  if (a >= 0) perm[atomicAdd(&cursor[a], 1)] = static_cast<int>(i);
}

// t[p, c] = s_a sum_k x[perm[p], k] A_a[c, k] for the TM rows p of one tile, RC columns c.
template <class T>
__global__ void __launch_bounds__(kThreads)
shrink(const T* __restrict__ x, i64 xrs, i64 xcs, i64 d_in, const T* __restrict__ A_all, i64 r,
       const int* __restrict__ tiles, const int* __restrict__ perm,
       const float* __restrict__ scales, float* __restrict__ t) {
  __shared__ float xs[TM][KC + 1];
  __shared__ float as[RC][KC + 1];
  const int a = tiles[3 * blockIdx.x], start = tiles[3 * blockIdx.x + 1],
            cnt = tiles[3 * blockIdx.x + 2];
  const i64 c0 = static_cast<i64>(blockIdx.y) * RC;
  const int tid = threadIdx.x, row = tid / 16, lane = tid % 16;
  const T* A = A_all + static_cast<i64>(a) * r * d_in;
  float acc[RC / 16] = {};
  for (i64 k0 = 0; k0 < d_in; k0 += KC) {
    for (int e = tid; e < TM * KC; e += kThreads) {
      const int rr = e / KC, kk = e % KC;
      xs[rr][kk] = (rr < cnt && k0 + kk < d_in)
                       ? to_float(x[static_cast<i64>(perm[start + rr]) * xrs + (k0 + kk) * xcs])
                       : 0.0f;
    }
    for (int e = tid; e < RC * KC; e += kThreads) {
      const int cc = e / KC, kk = e % KC;
      as[cc][kk] = (c0 + cc < r && k0 + kk < d_in) ? to_float(A[(c0 + cc) * d_in + k0 + kk]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < KC; ++kk) {
      const float xv = xs[row][kk];
#pragma unroll
      for (int j = 0; j < RC / 16; ++j) acc[j] += xv * as[lane + 16 * j][kk];
    }
    __syncthreads();
  }
  if (row < cnt) {
    const float s = scales[a];
#pragma unroll
    for (int j = 0; j < RC / 16; ++j) {
      const i64 c = c0 + lane + 16 * j;
      if (c < r) t[static_cast<i64>(start + row) * r + c] = s * acc[j];
    }
  }
}

// y[perm[p], j] += sum_c t[p, c] B_a[j, c] for the TM rows of one tile, CN output columns j.
template <class T>
__global__ void __launch_bounds__(kThreads)
expand(T* __restrict__ y, i64 yrs, i64 ycs, i64 d_out, const T* __restrict__ B_all, i64 r,
       const int* __restrict__ tiles, const int* __restrict__ perm, const float* __restrict__ t) {
  __shared__ float ts[TM][RK + 1];
  __shared__ float bs[CN][RK + 1];
  const int a = tiles[3 * blockIdx.x], start = tiles[3 * blockIdx.x + 1],
            cnt = tiles[3 * blockIdx.x + 2];
  const i64 j0 = static_cast<i64>(blockIdx.y) * CN;
  const int tid = threadIdx.x, row = tid / 16, lane = tid % 16;
  const T* B = B_all + static_cast<i64>(a) * d_out * r;
  float acc[CN / 16] = {};
  for (i64 k0 = 0; k0 < r; k0 += RK) {
    for (int e = tid; e < TM * RK; e += kThreads) {
      const int rr = e / RK, kk = e % RK;
      ts[rr][kk] = (rr < cnt && k0 + kk < r) ? t[static_cast<i64>(start + rr) * r + k0 + kk] : 0.0f;
    }
    for (int e = tid; e < CN * RK; e += kThreads) {
      const int cc = e / RK, kk = e % RK;
      bs[cc][kk] = (j0 + cc < d_out && k0 + kk < r) ? to_float(B[(j0 + cc) * r + k0 + kk]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < RK; ++kk) {
      const float tv = ts[row][kk];
#pragma unroll
      for (int j = 0; j < CN / 16; ++j) acc[j] += tv * bs[lane + 16 * j][kk];
    }
    __syncthreads();
  }
  if (row < cnt) {
    const i64 orig = perm[start + row];
#pragma unroll
    for (int j = 0; j < CN / 16; ++j) {
      const i64 col = j0 + lane + 16 * j;
      if (col < d_out) {
        T* p = y + orig * yrs + col * ycs;
        *p = from_float<T>(to_float(*p) + acc[j]);
      }
    }
  }
}

}  // namespace

void lora_linear_multi(const Ctx& ctx, DType t, const MultiArgs& m) {
  DeviceGuard guard(ctx.device);
  const i64 n = m.x.rows, na = m.n_adapters, r = m.r;
  if (n > INT_MAX) throw std::invalid_argument("x has more than 2**31 - 1 rows");
  cudaStream_t st = stream_of(ctx);

  // 1. Count rows per adapter and find the first bad id, before any output is touched.
  std::vector<int> host(na + 1, 0);
  if (n > 0) {
    Scratch meta(ctx, sizeof(int) * (na + 1));
    int* counts = meta.as<int>();
    int* first_bad = counts + na;
    host[na] = INT_MAX;
    RSLORA_CUDA_CHECK(cudaMemcpyAsync(counts, host.data(), sizeof(int) * (na + 1),
                                      cudaMemcpyHostToDevice, st));
    count_ids<<<blocks_for(n, kThreads), kThreads, 0, st>>>(m.ids, m.ids_stride, n, na, counts,
                                                            first_bad);
    RSLORA_LAUNCH_CHECK();
    RSLORA_CUDA_CHECK(cudaMemcpyAsync(host.data(), counts, sizeof(int) * (na + 1),
                                      cudaMemcpyDeviceToHost, st));
    RSLORA_CUDA_CHECK(cudaStreamSynchronize(st));
    if (host[na] != INT_MAX) {
      std::int64_t bad = 0;
      RSLORA_CUDA_CHECK(cudaMemcpy(&bad, m.ids + static_cast<i64>(host[na]) * m.ids_stride,
                                   sizeof(bad), cudaMemcpyDeviceToHost));
      throw std::out_of_range("adapter_ids[" + std::to_string(host[na]) + "] = " +
                              std::to_string(bad) + " is outside [-1, " + std::to_string(na) +
                              ") for " + std::to_string(na) + " adapters");
    }
  }

  // 2. The base layer over all rows.
  if (m.base) base_linear(ctx, t, m.x, m.W, m.bias, m.y);

  // 3. Segments and tiles (host, from the counts): cursor[a] = first sorted position of a.
  std::vector<int> meta_host(na);
  std::vector<int> tiles;
  int sel = 0;
  for (i64 a = 0; a < na; ++a) {
    meta_host[a] = sel;
    for (int s0 = 0; s0 < host[a]; s0 += TM)
      tiles.insert(tiles.end(), {static_cast<int>(a), sel + s0, std::min(TM, host[a] - s0)});
    sel += host[a];
  }
  if (sel == 0 || r == 0 || m.y.cols == 0) return;
  const i64 n_tiles = static_cast<i64>(tiles.size() / 3);
  meta_host.insert(meta_host.end(), tiles.begin(), tiles.end());

  Scratch ints(ctx, sizeof(int) * (meta_host.size() + sel));
  int* cursor = ints.as<int>();
  int* tiles_d = cursor + na;
  int* perm = tiles_d + 3 * n_tiles;
  RSLORA_CUDA_CHECK(cudaMemcpyAsync(cursor, meta_host.data(), sizeof(int) * meta_host.size(),
                                    cudaMemcpyHostToDevice, st));
  scatter_rows<<<blocks_for(n, kThreads), kThreads, 0, st>>>(m.ids, m.ids_stride, n, cursor, perm);
  RSLORA_LAUNCH_CHECK();

  // 4. Shrink into float32 scratch (sorted rows), then expand into y.
  Scratch tbuf(ctx, sizeof(float) * static_cast<size_t>(sel) * r);
  const i64 d_in = m.x.cols, d_out = m.y.cols;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    if (d_in > 0) {
      shrink<T><<<dim3(n_tiles, blocks_for(r, RC)), kThreads, 0, st>>>(
          static_cast<const T*>(m.x.data), m.x.rs, m.x.cs, d_in, static_cast<const T*>(m.A_all),
          r, tiles_d, perm, m.scales, tbuf.as<float>());
      RSLORA_LAUNCH_CHECK();
    } else {
      RSLORA_CUDA_CHECK(cudaMemsetAsync(tbuf.as<float>(), 0, sizeof(float) * sel * r, st));
    }
    expand<T><<<dim3(n_tiles, blocks_for(d_out, CN)), kThreads, 0, st>>>(
        static_cast<T*>(m.y.data), m.y.rs, m.y.cs, d_out, static_cast<const T*>(m.B_all), r,
        tiles_d, perm, tbuf.as<float>());
    RSLORA_LAUNCH_CHECK();
  });
}

}  // namespace rslora::cuda
