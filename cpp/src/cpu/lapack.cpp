// LAPACK through the Fortran interface of the bound library: column-major buffers, workspace
// queries done here. Fortran character arguments get their hidden length appended.
#include <algorithm>
#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "rslora/blas.hpp"

namespace rslora::blas {
namespace {

template <class T> std::string pre();  // LAPACK precision letter
template <> std::string pre<float>() { return "s"; }
template <> std::string pre<double>() { return "d"; }

template <class F>
F fortran(const std::string& name) {
  auto f = reinterpret_cast<F>(symbol(name, false));
  if (!f) throw std::runtime_error("LAPACK routine " + name + " not found in " + info().path);
  return f;
}

template <class I>
I narrow(i64 v) {
  if (sizeof(I) == 4 && (v > INT_MAX || v < INT_MIN))
    throw std::invalid_argument("matrix dimension exceeds the 32-bit LAPACK interface");
  return static_cast<I>(v);
}

void check_info(const std::string& name, i64 info) {
  if (info < 0) throw std::runtime_error(name + ": illegal value in argument " + std::to_string(-info));
}

template <class T> i64 lwork_of(T w) { return std::max<i64>(1, static_cast<i64>(std::ceil(w))); }

template <class T, class I>
void geqrf_i(i64 m, i64 n, T* a, i64 lda, T* tau) {
  using fn = void (*)(const I*, const I*, T*, const I*, T*, T*, const I*, I*);
  auto f = fortran<fn>(pre<T>() + "geqrf");
  I M = narrow<I>(m), N = narrow<I>(n), LDA = narrow<I>(lda), lw = -1, info = 0;
  T q = 0;
  f(&M, &N, a, &LDA, tau, &q, &lw, &info);
  std::vector<T> work(lwork_of(q));
  lw = narrow<I>(static_cast<i64>(work.size()));
  f(&M, &N, a, &LDA, tau, work.data(), &lw, &info);
  check_info("geqrf", info);
}

template <class T, class I>
void orgqr_i(i64 m, i64 n, i64 k, T* a, i64 lda, const T* tau) {
  using fn = void (*)(const I*, const I*, const I*, T*, const I*, const T*, T*, const I*, I*);
  auto f = fortran<fn>(pre<T>() + "orgqr");
  I M = narrow<I>(m), N = narrow<I>(n), K = narrow<I>(k), LDA = narrow<I>(lda), lw = -1, info = 0;
  T q = 0;
  f(&M, &N, &K, a, &LDA, tau, &q, &lw, &info);
  std::vector<T> work(lwork_of(q));
  lw = narrow<I>(static_cast<i64>(work.size()));
  f(&M, &N, &K, a, &LDA, tau, work.data(), &lw, &info);
  check_info("orgqr", info);
}

template <class T, class I>
i64 getrf_i(i64 m, i64 n, T* a, i64 lda, i64* ipiv) {
  using fn = void (*)(const I*, const I*, T*, const I*, I*, I*);
  auto f = fortran<fn>(pre<T>() + "getrf");
  I M = narrow<I>(m), N = narrow<I>(n), LDA = narrow<I>(lda), info = 0;
  std::vector<I> piv(static_cast<size_t>(std::max<i64>(1, std::min(m, n))));
  f(&M, &N, a, &LDA, piv.data(), &info);
  check_info("getrf", info);
  for (i64 i = 0; i < std::min(m, n); ++i) ipiv[i] = piv[i];
  return info;
}

template <class T, class I>
void gesdd_i(i64 m, i64 n, T* a, i64 lda, T* s, T* u, i64 ldu, T* vt, i64 ldvt) {
  using fn = void (*)(const char*, const I*, const I*, T*, const I*, T*, T*, const I*, T*,
                      const I*, T*, const I*, I*, I*, size_t);
  auto f = fortran<fn>(pre<T>() + "gesdd");
  I M = narrow<I>(m), N = narrow<I>(n), LDA = narrow<I>(lda), LDU = narrow<I>(ldu),
    LDVT = narrow<I>(ldvt), lw = -1, info = 0;
  std::vector<I> iwork(static_cast<size_t>(8 * std::max<i64>(1, std::min(m, n))));
  T q = 0;
  f("S", &M, &N, a, &LDA, s, u, &LDU, vt, &LDVT, &q, &lw, iwork.data(), &info, 1);
  std::vector<T> work(lwork_of(q));
  lw = narrow<I>(static_cast<i64>(work.size()));
  f("S", &M, &N, a, &LDA, s, u, &LDU, vt, &LDVT, work.data(), &lw, iwork.data(), &info, 1);
  check_info("gesdd", info);
  if (info > 0) throw std::runtime_error("gesdd did not converge");
}

template <class T, class I>
i64 potrf_i(i64 n, T* a, i64 lda) {
  using fn = void (*)(const char*, const I*, T*, const I*, I*, size_t);
  auto f = fortran<fn>(pre<T>() + "potrf");
  I N = narrow<I>(n), LDA = narrow<I>(lda), info = 0;
  f("U", &N, a, &LDA, &info, 1);
  check_info("potrf", info);
  return info;
}

template <class T, class I>
void syevd_i(i64 n, T* a, i64 lda, T* w) {
  using fn = void (*)(const char*, const char*, const I*, T*, const I*, T*, T*, const I*, I*,
                      const I*, I*, size_t, size_t);
  auto f = fortran<fn>(pre<T>() + "syevd");
  I N = narrow<I>(n), LDA = narrow<I>(lda), lw = -1, liw = -1, info = 0, iq = 0;
  T q = 0;
  f("V", "U", &N, a, &LDA, w, &q, &lw, &iq, &liw, &info, 1, 1);
  std::vector<T> work(lwork_of(q));
  std::vector<I> iwork(std::max<I>(1, iq));
  lw = narrow<I>(static_cast<i64>(work.size()));
  liw = narrow<I>(static_cast<i64>(iwork.size()));
  f("V", "U", &N, a, &LDA, w, work.data(), &lw, iwork.data(), &liw, &info, 1, 1);
  check_info("syevd", info);
  if (info > 0) throw std::runtime_error("syevd did not converge");
}

}  // namespace

// Dispatch on the library's integer width.
#define RSLORA_BY_INT(call) (info().int64 ? call<T, long long> : call<T, int>)

template <class T> void geqrf(i64 m, i64 n, T* a, i64 lda, T* tau) {
  RSLORA_BY_INT(geqrf_i)(m, n, a, lda, tau);
}
template <class T> void orgqr(i64 m, i64 n, i64 k, T* a, i64 lda, const T* tau) {
  RSLORA_BY_INT(orgqr_i)(m, n, k, a, lda, tau);
}
template <class T> i64 getrf(i64 m, i64 n, T* a, i64 lda, i64* ipiv) {
  return RSLORA_BY_INT(getrf_i)(m, n, a, lda, ipiv);
}
template <class T> void gesdd(i64 m, i64 n, T* a, i64 lda, T* s, T* u, i64 ldu, T* vt, i64 ldvt) {
  RSLORA_BY_INT(gesdd_i)(m, n, a, lda, s, u, ldu, vt, ldvt);
}
template <class T> i64 potrf_upper(i64 n, T* a, i64 lda) { return RSLORA_BY_INT(potrf_i)(n, a, lda); }
template <class T> void syevd(i64 n, T* a, i64 lda, T* w) { RSLORA_BY_INT(syevd_i)(n, a, lda, w); }
#undef RSLORA_BY_INT

#define RSLORA_INSTANTIATE(T)                                                      \
  template void geqrf<T>(i64, i64, T*, i64, T*);                                   \
  template void orgqr<T>(i64, i64, i64, T*, i64, const T*);                        \
  template i64 getrf<T>(i64, i64, T*, i64, i64*);                                  \
  template void gesdd<T>(i64, i64, T*, i64, T*, T*, i64, T*, i64);                 \
  template i64 potrf_upper<T>(i64, T*, i64);                                       \
  template void syevd<T>(i64, T*, i64, T*);
RSLORA_INSTANTIATE(float)
RSLORA_INSTANTIATE(double)
#undef RSLORA_INSTANTIATE

}  // namespace rslora::blas
