// AVX2+FMA version of the small-group kernel (multi_kernels.hpp), chosen at run time on CPUs
// with AVX2 and FMA but no AVX-512 (most AMD Zen 2/3 and Intel client CPUs), or when forced.
// 256-bit registers, 16 of them: tiles of at most 12 accumulators.
#include "multi_kernels.hpp"

#if RSLORA_HAVE_X86_KERNELS
#include <immintrin.h>

#include <algorithm>

#define RSLORA_TARGET __attribute__((target("avx2,fma")))
#define RSLORA_INLINE inline __attribute__((always_inline))

namespace rslora::detail {
namespace {

// One 256-bit register of T and its lane count.
template <class T>
struct Simd;
template <>
struct Simd<float> {
  using V = __m256;
  static constexpr int L = 8;
  RSLORA_TARGET static RSLORA_INLINE V zero() { return _mm256_setzero_ps(); }
  RSLORA_TARGET static RSLORA_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  RSLORA_TARGET static RSLORA_INLINE V load(const float* p, int n) {  // first n lanes, rest 0
    static const int m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_maskload_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 8 - n)));
  }
  RSLORA_TARGET static RSLORA_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  RSLORA_TARGET static RSLORA_INLINE V set1(float a) { return _mm256_set1_ps(a); }
  RSLORA_TARGET static RSLORA_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  // v[0..8) rows -> columns.
  RSLORA_TARGET static RSLORA_INLINE void transpose(V* v) {
    const V t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    const V t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    const V t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
    const V t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
    const V u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    const V u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const V u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    const V u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    const V u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    const V u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    const V u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    const V u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    v[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    v[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    v[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    v[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    v[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    v[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    v[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    v[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
  }
};
template <>
struct Simd<double> {
  using V = __m256d;
  static constexpr int L = 4;
  RSLORA_TARGET static RSLORA_INLINE V zero() { return _mm256_setzero_pd(); }
  RSLORA_TARGET static RSLORA_INLINE V load(const double* p) { return _mm256_loadu_pd(p); }
  RSLORA_TARGET static RSLORA_INLINE V load(const double* p, int n) {
    static const long long m[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
    return _mm256_maskload_pd(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 4 - n)));
  }
  RSLORA_TARGET static RSLORA_INLINE void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  RSLORA_TARGET static RSLORA_INLINE V set1(double a) { return _mm256_set1_pd(a); }
  RSLORA_TARGET static RSLORA_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  RSLORA_TARGET static RSLORA_INLINE void transpose(V* v) {
    const V t0 = _mm256_unpacklo_pd(v[0], v[1]), t1 = _mm256_unpackhi_pd(v[0], v[1]);
    const V t2 = _mm256_unpacklo_pd(v[2], v[3]), t3 = _mm256_unpackhi_pd(v[2], v[3]);
    v[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
    v[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
    v[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
    v[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
  }
};

// One group = c <= kSmallGroup rows of x and y on one adapter (A: r x d_in, B: d_out x r).
// - shrink (xa = x_rows A^T): K x Q register tiles of dot products (K rows of x against Q rows
//   of A), so each load feeds several FMAs and >= 8 FMA chains run where c allows, over chunks
//   of d_in that stay in L1 for every tile. Each dot product is summed over j lane-wise, then
//   horizontally in lane order, then the tail.
// - expand (y_rows += s xa B^T): d_out is cut into blocks of kBlockCols columns; each block of B
//   (kBlockCols rows of r) is transposed in L x L register blocks into `bt` (L1), then K rows of
//   y x J registers of columns are accumulated over q in order, y += s * sum (one FMA).
// Each phase prefetches into L2 what the next one reads, row after whole row (RunPrefetch in
// multi_kernels.hpp): the shrink this group's B and y rows, the expand the next group's A and x
// rows; the expand also prefetches B's next block into L1 as it transposes this one.

// Columns of y per expand block: J = 8 registers for a single row.
template <class T>
constexpr i64 kBlockCols = 8 * Simd<T>::L;
static_assert(kBlockCols<float> <= kExpandCols && kBlockCols<double> <= kExpandCols);

// y = sum over the lanes of v, in lane order.
template <class T>
RSLORA_TARGET RSLORA_INLINE T lane_sum(typename Simd<T>::V v) {
  alignas(64) T t[Simd<T>::L];
  Simd<T>::store(t, v);
  T s = T(0);
  for (int l = 0; l < Simd<T>::L; ++l) s += t[l];
  return s;
}

// --- shrink ------------------------------------------------------------------------------------

// The shrink in chunks of d: each chunk of kChunkBytes of every row of A and x is used for all
// c rows while it is in L1 (A and x are read from L2 once per group, not once per tile of
// rows). The K x Q tile's lane sums live in `acc` between chunks (one load and store per 32
// FMAs); each dot product is still summed over j in order, lane-wise, so the result does not
// depend on the chunk size.
// Groups of up to 4 rows (one tile of rows: A is read once however d is cut) take all of d in
// one chunk: that streams fewer rows at once.
constexpr i64 kChunkBytes = 1024;

// Columns of a shrink tile between two steps of its prefetch of the expand's data.
constexpr i64 kStepCols = 256;

// Bytes ahead in each row of A that a shrink tile prefetches into L1 (past the end of A:
// harmless, prefetches never fault): for groups of a row or two the shrink streams A from memory
// faster than the previous expand could bring it to L2 (decode batches, one row per adapter).
constexpr i64 kAheadBytes = 2048;

template <class T>
i64 shrink_chunk(i64 c, i64 d) {
  return c <= 4 ? std::max<i64>(d, 1) : kChunkBytes / static_cast<i64>(sizeof(T));
}

// acc[(k * r + q0 + q) * L ...] += the lane sums of K rows of x and Q rows of A over [j0, j1).
template <class T, int K, int Q>
RSLORA_TARGET RSLORA_INLINE void shrink_chunk_tile(const T* const* x, const T* A, i64 A_rs, i64 r,
                                                   i64 q0, i64 j0, i64 j1, T* acc,
                                                   RunPrefetch<T>& pf) {
  using S = Simd<T>;
  constexpr int L = S::L;
  constexpr i64 ahead = kAheadBytes / static_cast<i64>(sizeof(T));
  typename S::V s[K][Q];
  for (int k = 0; k < K; ++k)
    for (int q = 0; q < Q; ++q) s[k][q] = S::load(acc + (k * r + q0 + q) * L);
  const T* a = A + q0 * A_rs;
  for (i64 j = j0; j < j1; j += L) {
    if ((j - j0) % kStepCols == 0) pf.step();
    if (j % (64 / static_cast<i64>(sizeof(T))) == 0)  // each line of the rows of A, ahead
      for (int q = 0; q < Q; ++q)
        _mm_prefetch(reinterpret_cast<const char*>(a + q * A_rs + j + ahead), _MM_HINT_T0);
    typename S::V av[Q];
    for (int q = 0; q < Q; ++q) av[q] = S::load(a + q * A_rs + j);
    for (int k = 0; k < K; ++k) {
      typename S::V xv = S::load(x[k] + j);
      asm("" : "+v"(xv));  // one load of x per row: keep GCC from folding it into each FMA
      for (int q = 0; q < Q; ++q) s[k][q] = S::fma(xv, av[q], s[k][q]);
    }
  }
  for (int k = 0; k < K; ++k)
    for (int q = 0; q < Q; ++q) S::store(acc + (k * r + q0 + q) * L, s[k][q]);
}

// One chunk for K rows of x: all r rows of A, Q at a time (K * Q + Q + 1 <= 16 registers).
template <class T, int K, int Q>
RSLORA_TARGET RSLORA_INLINE void shrink_chunk_rows(const T* const* x, const T* A, i64 A_rs, i64 r,
                                                   i64 j0, i64 j1, T* acc, RunPrefetch<T>& pf) {
  i64 q = 0;
  for (; q + Q <= r; q += Q) shrink_chunk_tile<T, K, Q>(x, A, A_rs, r, q, j0, j1, acc, pf);
  for (; q < r; ++q) shrink_chunk_tile<T, K, 1>(x, A, A_rs, r, q, j0, j1, acc, pf);
}

// xa (c, r) = x_rows A^T: tiles of K = 4 rows (Q = 2: 8 FMA chains), the last 1-3 rows with
// wider Q, chunk by chunk of d; acc: c * r * L elements of lane sums. pf: what the expand reads
// next, one step per tile.
template <class T>
RSLORA_TARGET void shrink_tiled(const T* const* x, i64 c, const T* A, i64 r, i64 A_rs, i64 d,
                                T* xa, T* acc, RunPrefetch<T>& pf) {
  using S = Simd<T>;
  constexpr int L = S::L;
  const i64 dv = d - d % L;
  const i64 chunk = shrink_chunk<T>(c, dv);
  for (i64 t = 0; t < c * r * L; t += L) S::store(acc + t, S::zero());
  for (i64 j0 = 0; j0 < dv; j0 += chunk) {
    const i64 j1 = std::min(dv, j0 + chunk);
    i64 k = 0;
    for (; k + 4 <= c; k += 4)
      shrink_chunk_rows<T, 4, 2>(x + k, A, A_rs, r, j0, j1, acc + k * r * L, pf);
    T* last = acc + k * r * L;  // the lane sums of the last 1-3 rows
    if (c - k == 3) shrink_chunk_rows<T, 3, 3>(x + k, A, A_rs, r, j0, j1, last, pf);
    if (c - k == 2) shrink_chunk_rows<T, 2, 4>(x + k, A, A_rs, r, j0, j1, last, pf);
    if (c - k == 1) shrink_chunk_rows<T, 1, 8>(x + k, A, A_rs, r, j0, j1, last, pf);
  }
  pf.finish();
  for (i64 k = 0; k < c; ++k)
    for (i64 q = 0; q < r; ++q) {
      typename S::V v = S::load(acc + (k * r + q) * L);
      T sum = lane_sum<T>(v);
      for (i64 j = dv; j < d; ++j) sum += x[k][j] * A[q * A_rs + j];
      xa[k * r + q] = sum;
    }
}

// --- expand ------------------------------------------------------------------------------------

// y[k][j0 + jj] for K rows and J registers of columns from jj0: acc over q in order, then
// y += s * acc. jb: columns of the block that exist (the rest of bt is zero padding).
template <class T, int K, int J>
RSLORA_TARGET RSLORA_INLINE void expand_tile(T* const* y, i64 j0, i64 jj0, i64 jb, const T* bt,
                                             i64 r, const T* xa, T s) {
  using S = Simd<T>;
  constexpr int L = S::L;
  constexpr i64 W = kBlockCols<T>;
  typename S::V acc[K][J];
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < J; ++j) acc[k][j] = S::zero();
  for (i64 q = 0; q < r; ++q) {
    typename S::V b[J];
    for (int j = 0; j < J; ++j) b[j] = S::load(bt + q * W + jj0 + j * L);
    for (int k = 0; k < K; ++k) {
      const typename S::V w = S::set1(xa[k * r + q]);
      for (int j = 0; j < J; ++j) acc[k][j] = S::fma(w, b[j], acc[k][j]);
    }
  }
  const typename S::V sv = S::set1(s);
  if (jb - jj0 >= J * L) {  // every column exists: all loads of y before the first store (rows
    // 4 KB apart would alias a store with the next row's load and stall it)
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < J; ++j)
        acc[k][j] = S::fma(sv, acc[k][j], S::load(y[k] + j0 + jj0 + j * L));
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < J; ++j) S::store(y[k] + j0 + jj0 + j * L, acc[k][j]);
    return;
  }
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < J; ++j) {
      T* p = y[k] + j0 + jj0 + j * L;
      const i64 n = jb - jj0 - j * L;  // columns of this register that exist
      if (n >= L) {
        S::store(p, S::fma(sv, acc[k][j], S::load(p)));
      } else if (n > 0) {
        alignas(64) T t[L];
        S::store(t, acc[k][j]);
        for (i64 l = 0; l < n; ++l) p[l] = __builtin_fma(s, t[l], p[l]);
      }
    }
}

// All columns of the block for K rows, J registers at a time.
template <class T, int K, int J>
RSLORA_TARGET RSLORA_INLINE void expand_rows(T* const* y, i64 j0, i64 jb, const T* bt, i64 r,
                                             const T* xa, T s, RunPrefetch<T>& pf) {
  constexpr i64 step = J * Simd<T>::L;
  for (i64 jj0 = 0; jj0 < jb; jj0 += step) {
    pf.step();
    expand_tile<T, K, J>(y, j0, jj0, jb, bt, r, xa, s);
  }
}

// bt (r, W) = B[j0 .. j0 + jb, 0 .. r) transposed, zero-padded to W columns; L x L register
// blocks. The same rows of the next block are prefetched as each L rows are read (B streams from
// memory; a burst of W prefetches at once would stall on the miss queue; past B's end: harmless).
template <class T>
RSLORA_TARGET RSLORA_INLINE void transpose_block(const T* B, i64 B_rs, i64 r, i64 j0, i64 jb,
                                                 T* bt) {
  using S = Simd<T>;
  constexpr int L = S::L;
  constexpr i64 W = kBlockCols<T>;
  const i64 row_bytes = r * static_cast<i64>(sizeof(T));
  typename S::V v[L];
  for (i64 i0 = 0; i0 < W; i0 += L) {  // rows j0 + i0 .. of B -> columns i0 .. of bt
    for (i64 i = 0; i < L; ++i)
      for (i64 b = 0; b < row_bytes; b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(B + (j0 + W + i0 + i) * B_rs) + b, _MM_HINT_T0);
    const i64 ib = std::clamp<i64>(jb - i0, 0, L);
    for (i64 q0 = 0; q0 < r; q0 += L) {
      const int qb = static_cast<int>(std::min<i64>(L, r - q0));
      const T* b0 = B + (j0 + i0) * B_rs + q0;
      if (ib == L && qb == L) {
        for (int i = 0; i < L; ++i) v[i] = S::load(b0 + i * B_rs);
      } else {
        for (int i = 0; i < L; ++i) v[i] = i < ib ? S::load(b0 + i * B_rs, qb) : S::zero();
      }
      S::transpose(v);
      for (int q = 0; q < qb; ++q) S::store(bt + (q0 + q) * W + i0, v[q]);
    }
  }
}

// Rows in tiles of K = 4 (J = 2: 8 chains), the last 1-3 rows with wider J. pf: what the next
// group's shrink reads, one step per tile.
template <class T>
RSLORA_TARGET void expand_tiled(const Group<T>& g, Dims dims, const T* xa, T* bt,
                                RunPrefetch<T>& pf) {
  constexpr i64 W = kBlockCols<T>;
  const i64 c = g.c, r = dims.r, d_out = dims.d_out;
  for (i64 j0 = 0; j0 < d_out; j0 += W) {
    const i64 jb = std::min(W, d_out - j0);
    transpose_block<T>(g.B, g.B_rs, r, j0, jb, bt);
    T* const* y = g.y;
    i64 k = 0;
    for (; k + 4 <= c; k += 4) expand_rows<T, 4, 2>(y + k, j0, jb, bt, r, xa + k * r, g.s, pf);
    if (c - k == 3) expand_rows<T, 3, 2>(y + k, j0, jb, bt, r, xa + k * r, g.s, pf);
    if (c - k == 2) expand_rows<T, 2, 4>(y + k, j0, jb, bt, r, xa + k * r, g.s, pf);
    if (c - k == 1) expand_rows<T, 1, 8>(y + k, j0, jb, bt, r, xa + k * r, g.s, pf);
  }
  pf.finish();
}

// --- a group -----------------------------------------------------------------------------------

// Steps of each phase, over which its prefetches spread, as the loops above cut them: rows in
// tiles of 4, the last 1-3 rows in one tile, of Q = 3, 4, 8 rows of A (then single rows) and a
// step per kStepCols columns in the shrink, of J = 2, 4, 8 registers of columns in the expand.
template <class T>
i64 shrink_steps(i64 c, Dims dims) {
  constexpr i64 kQ[4] = {0, 8, 4, 3};  // Q of the last tile, by c % 4
  const i64 r = dims.r, dv = dims.d_in - dims.d_in % Simd<T>::L;
  const auto tiles = [r](i64 Q) { return r / Q + r % Q; };
  const i64 chunk = shrink_chunk<T>(c, dv), chunks = (dv + chunk - 1) / chunk;
  const i64 steps_per_chunk = (std::min(chunk, dv) + kStepCols - 1) / kStepCols;
  return chunks * steps_per_chunk * ((c / 4) * tiles(2) + (c % 4 ? tiles(kQ[c % 4]) : 0));
}
template <class T>
i64 expand_steps(i64 c, Dims dims) {
  constexpr i64 W = kBlockCols<T>, L = Simd<T>::L;
  constexpr i64 kJ[4] = {0, 8, 4, 2};  // J of the last tile, by c % 4
  const i64 blocks = (dims.d_out + W - 1) / W;
  return blocks * ((c / 4) * (W / (2 * L)) + (c % 4 ? W / (kJ[c % 4] * L) : 0));
}

template <class T>
RSLORA_TARGET void add_group_tiled(const Group<T>& g, Dims dims, T* work) {
  T* xa = work;
  T* rest = xa + kSmallGroup * dims.r;  // the shrink's lane sums, then the expand's block of B^T
  RunPrefetch<T> for_expand(g.B, dims.d_out, g.B_rs, dims.r, g.y, g.c, dims.d_out,
                            shrink_steps<T>(g.c, dims));
  shrink_tiled<T>(g.x, g.c, g.A, dims.r, g.A_rs, dims.d_in, xa, rest, for_expand);
  RunPrefetch<T> for_next(g.next_A, dims.r, g.A_rs, dims.d_in, g.next_x, g.next_c, dims.d_in,
                          expand_steps<T>(g.c, dims));
  expand_tiled<T>(g, dims, xa, rest, for_next);
}

}  // namespace

bool have_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

void add_group_avx2(const Group<float>& g, Dims dims, float* work) {
  add_group_tiled(g, dims, work);
}
void add_group_avx2(const Group<double>& g, Dims dims, double* work) {
  add_group_tiled(g, dims, work);
}

}  // namespace rslora::detail
#endif
