// BLAS/LAPACK bound at run time to the library NumPy already loaded in the process (one thread
// pool per process: two OpenBLAS pools called alternately on 2 cores double each other's time).
// The library is chosen by the Python layer and handed to load(); symbols are resolved by name,
// whatever prefix/suffix and integer width the library uses (scipy-openblas64: scipy_cblas_sgemm64_
// with int64; scipy-openblas32: scipy_cblas_sgemm with int32; MKL/reference: cblas_sgemm).
//
// All matrix arguments are Mat views; gemm() picks transposes and leading dimensions, and copies
// a view only when BLAS cannot read it as it is. LAPACK wrappers take column-major buffers
// (the Fortran interface) and do their own workspace queries.
#pragma once
#include <initializer_list>
#include <optional>
#include <string>

#include "rslora/view.hpp"

namespace rslora::blas {

struct Info {
  std::string path;        // the shared library
  std::string prefix;      // symbol prefix ("scipy_" or "")
  std::string cblas_suffix;  // "64_" or ""
  bool int64 = false;      // ILP64 integer interface
  std::string config;      // openblas_get_config() when the library has it
};

// Bind to the library at `path` (dlopen; a library already loaded is reused). Throws
// std::runtime_error naming what is missing when the library lacks CBLAS or LAPACK.
void load(const std::string& path);
bool loaded();
const Info& info();
// Threads of the BLAS pool (openblas_get_num_threads / mkl_get_max_threads), -1 if unknown.
int num_threads();
// Small BLAS/LAPACK calls (orthonormalisation of a tall-skinny block, l x l Gram matrices and
// SVDs) gain nothing from a second thread and lose most when a core is busy. Inside a scope they
// run on one thread, through OpenBLAS's openblas_set_num_threads_local (>= 0.3.27; returns the
// previous count); the count is restored when the last scope in the process closes, so NumPy's
// setting is unchanged after every call. In pthreads builds of OpenBLAS the setter is in fact
// process-wide (measured on scipy-openblas64 0.3.31), hence one count shared by all threads:
// nested and concurrent scopes never restore a 1. Without the setter (older OpenBLAS, MKL) a
// scope does nothing. Wrap only small calls: the GEMM passes over M keep every thread.
// `work` is the multiply-adds of the calls inside (e.g. p l^2 for a p x l block): above
// kSmallWork (64 M, a few ms on one core) a second thread pays again and the scope does nothing,
// so a wide basis (rsvd_tol's growing rank, a long Krylov basis) keeps every thread.
inline constexpr double kSmallWork = 67108864.0;
class SingleThreadScope {
 public:
  explicit SingleThreadScope(double work);
  ~SingleThreadScope();
  SingleThreadScope(const SingleThreadScope&) = delete;
  SingleThreadScope& operator=(const SingleThreadScope&) = delete;

 private:
  bool active_ = false;
};
// Whether the bound library has the thread-local setter (what SingleThreadScope needs).
bool has_local_thread_setter();
// For split passes (gemm_split): one BLAS thread for the process while it lives, as a scope
// sets, whatever the work and the scopes hook; threads() is the count the caller may use (the
// count NumPy/threadpoolctl set, from before the first open scope), 0 without the setter (then
// nothing is changed and gemm_split does not split).
class PassThreads {
 public:
  PassThreads();
  ~PassThreads();
  PassThreads(const PassThreads&) = delete;
  PassThreads& operator=(const PassThreads&) = delete;
  int threads() const { return threads_; }

 private:
  int threads_ = 0;
};
// On a helper thread of a split pass: its BLAS calls must run on one thread. In pthreads builds of
// OpenBLAS the setter is process-wide and PassThreads has already set 1; where it really is
// thread-local (OpenMP builds) the helper sets its own (helpers only ever run one-thread blocks).
void one_thread_on_this_thread();
// Test hook: scopes opened while disabled do nothing (to compare results with and without).
// Returns the previous setting.
bool set_single_thread_scopes(bool enabled);
// The address of a symbol by its plain name ("cblas_sgemm", "sgeqrf"), nullptr when absent.
void* symbol(const std::string& plain_name, bool cblas);

// Throws std::invalid_argument unless every value (dimensions, |strides|) fits the BLAS integer
// type (32-bit libraries). In-place ops call it first, so that nothing is written before it.
void check_fits(std::initializer_list<i64> values);

// C = alpha * op(A) op(B) + beta * C, op = transpose when ta/tb. C must be writable; any views.
// k == 0 gives C = beta * C (beta == 0 writes zeros, never reads C). alpha == 0 keeps IEEE's
// 0 * Inf = NaN, as the NumPy expression `alpha * (A @ B)` does: BLAS may skip the product then
// (reference BLAS always, OpenBLAS for beta == 1 and in GEMV), which would drop NaN/Inf of A and B
// without a word; so the zero is applied to the smaller operand first, in a copy of it.
template <class T>
void gemm(T alpha, Mat<const T> A, bool ta, Mat<const T> B, bool tb, T beta, Mat<T> C);

// gemm for a big pass (rsvd's products with M): the rows of C are cut into blocks fixed by the
// shapes alone (the first a quarter of C, then a quarter of what is left, down to 64 rows), and the
// blocks run as one-thread GEMMs on up to BLAS-thread-count threads that take them in turn
// (block_pool.hpp): a core that something else holds takes fewer blocks, OpenBLAS's spinning pool
// is never woken, nothing spins. Each block's GEMM is the same call whichever thread runs it, so
// results never depend on timing or on the thread count. Small products, one BLAS thread, no
// thread-local setter (MKL, OpenBLAS < 0.3.27) or the hook off: plain gemm.
template <class T>
void gemm_split(T alpha, Mat<const T> A, bool ta, Mat<const T> B, bool tb, T beta, Mat<T> C);
// Test/bench hook: gemm_split is plain gemm while disabled. Returns the previous setting.
bool set_split_passes(bool enabled);
bool split_passes();  // the current setting

// For the whole of a call whose passes run split (rsvd, rsvd_tol): OpenBLAS at one thread
// meanwhile, so that no threaded call between passes (the Gram's vectors, an orthonormalization)
// wakes its pool, whose worker would then spin on the core a split helper needs (quiet, 2
// threads: the split passes ran no faster than one thread without it). Nothing when the split
// is off (the hook).
class SplitCallScope {
 public:
  SplitCallScope() {
    if (split_passes()) scope_.emplace();
  }

 private:
  std::optional<PassThreads> scope_;
};

// y = alpha op(A) x + beta y, op = transpose when ta; x and y strided vectors (any strides:
// reversed ones go through a unit-stride copy). alpha == 0 keeps NaN/Inf of A and x, as gemm.
// For matrix-times-one-vector work (a decode row through an adapter) without gathering rows.
template <class T>
void gemv(T alpha, Mat<const T> A, bool ta, Vec<const T> x, T beta, Vec<T> y);
// --- more BLAS-3, column-major buffers (cpp/src/cpu/blas_level3.cpp) ---------------------------
// C (n x n) = alpha op(A)^T-style rank-k update + beta C on one triangle: trans == false gives
// alpha A A^T (A is n x k), trans == true gives alpha A^T A (A is k x n). Only the `upper` (or
// lower) triangle of C is referenced and written.
template <class T>
void syrk(bool upper, bool trans, i64 n, i64 k, T alpha, const T* a, i64 lda, T beta, T* c, i64 ldc);
// B (m x n) = alpha op(A)^-1 B (left) or alpha B op(A)^-1 (right), A triangular.
template <class T>
void trsm(bool left, bool upper, bool trans, bool unit_diag, i64 m, i64 n, T alpha, const T* a,
          i64 lda, T* b, i64 ldb);
// B (m x n) = alpha op(A) B (left) or alpha B op(A) (right), A triangular (in place).
template <class T>
void trmm(bool left, bool upper, bool trans, bool unit_diag, i64 m, i64 n, T alpha, const T* a,
          i64 lda, T* b, i64 ldb);

// --- LAPACK, column-major buffers; info != 0 becomes std::runtime_error -------------------------
// QR: A (m x n, lda) is overwritten by the Householder form; tau has min(m, n) entries.
template <class T> void geqrf(i64 m, i64 n, T* a, i64 lda, T* tau);
// Form the first n columns of Q (m x n) from geqrf's output with k reflectors.
template <class T> void orgqr(i64 m, i64 n, i64 k, T* a, i64 lda, const T* tau);
// LU with partial pivoting; returns the LAPACK info (> 0: exactly singular, still usable).
template <class T> i64 getrf(i64 m, i64 n, T* a, i64 lda, i64* ipiv);
// Thin SVD A = U diag(s) Vt by divide and conquer (jobz 'S'). A is destroyed.
template <class T>
void gesdd(i64 m, i64 n, T* a, i64 lda, T* s, T* u, i64 ldu, T* vt, i64 ldvt);
// Cholesky of the upper triangle; returns info (> 0: not positive definite).
template <class T> i64 potrf_upper(i64 n, T* a, i64 lda);
// Symmetric eigen-decomposition (jobz 'V', upper): w ascending, a overwritten by eigenvectors.
template <class T> void syevd(i64 n, T* a, i64 lda, T* w);

}  // namespace rslora::blas
