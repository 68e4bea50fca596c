// Randomized SVD: argument validation, then the core with the GIL released.
#include "pybind.hpp"
#include "rslora/random.hpp"
#include "rslora/svd.hpp"

namespace rslora::bind {
namespace {

RsvdMethod method_of(const std::string& s) {
  if (s == "subspace") return RsvdMethod::subspace;
  if (s == "krylov") return RsvdMethod::krylov;
  throw std::invalid_argument("method must be 'subspace' or 'krylov', got '" + s + "'");
}

RsvdNormalizer normalizer_of(const std::string& s) {
  if (s == "qr") return RsvdNormalizer::qr;
  if (s == "lu") return RsvdNormalizer::lu;
  if (s == "none") return RsvdNormalizer::none;
  throw std::invalid_argument("normalizer must be 'qr', 'lu' or 'none', got '" + s + "'");
}

void check_k(const py::array& M, i64 k, const char* what) {
  const i64 lo = std::min<i64>(M.shape(0), M.shape(1));
  if (k < 1 || k > lo)
    throw std::invalid_argument(std::string(what) + " must be in [1, min(m, n)] = [1, " +
                                std::to_string(lo) + "] for M of shape " + shape_str(M) + ", got " +
                                std::to_string(k));
}

template <class T>
py::tuple run_rsvd(py::array& M, i64 k, const RsvdOptions& opt) {
  auto Mv = mat<const T>(M, "M");
  py::array_t<T> U({Mv.rows, k}), S(k), Vt({k, Mv.cols});
  auto Uv = row_major(U.mutable_data(), Mv.rows, k);
  auto Vv = row_major(Vt.mutable_data(), k, Mv.cols);
  T* s = S.mutable_data();
  {
    py::gil_scoped_release nogil;
    rsvd<T>(Mv, k, opt, Uv, s, Vv);
  }
  return py::make_tuple(U, S, Vt);
}

template <class T>
py::array_t<T> owned(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule free_when_done(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, heap->data(), free_when_done);
}

template <class T>
py::tuple run_rsvd_tol(py::array& M, double tol, i64 max_rank, i64 block, int n_iter, std::uint64_t seed,
                       bool check_finite) {
  auto Mv = mat<const T>(M, "M");
  RsvdTolResult<T> r;
  {
    py::gil_scoped_release nogil;
    r = rsvd_tol<T>(Mv, tol, max_rank, block, n_iter, seed, check_finite);
  }
  const py::ssize_t m = Mv.rows, n = Mv.cols, rank = r.rank;
  return py::make_tuple(owned(std::move(r.U), {m, rank}), owned(std::move(r.S), {rank}),
                        owned(std::move(r.Vt), {rank, n}), r.error);
}

}  // namespace

void bind_svd(py::module_& m) {
  m.def(
      "rsvd",
      [](py::array M, i64 k, i64 oversample, int n_iter, const std::string& method,
         const std::string& normalizer, std::uint64_t seed, bool check_finite, double auto_tol) {
        int kind = same_kind({{&M, "M"}});
        require_ndim(M, "M", 2);
        check_k(M, k, "k");
        if (oversample < 0) throw std::invalid_argument("oversample must be >= 0, got " + std::to_string(oversample));
        if (n_iter < -1) throw std::invalid_argument("n_iter must be >= 0 or 'auto', got " + std::to_string(n_iter));
        RsvdOptions opt;
        opt.oversample = oversample, opt.n_iter = n_iter, opt.method = method_of(method);
        opt.normalizer = normalizer_of(normalizer), opt.seed = seed, opt.check_finite = check_finite;
        if (!(auto_tol > 0 && auto_tol < 1))
          throw std::invalid_argument("auto_tol must be in (0, 1), got " + std::to_string(auto_tol));
        opt.auto_tol = auto_tol;
        return dispatch_float(kind, [&](auto tag) { return run_rsvd<typename decltype(tag)::type>(M, k, opt); });
      },
      py::arg("M"), py::arg("k"), py::arg("oversample"), py::arg("n_iter"), py::arg("method"),
      py::arg("normalizer"), py::arg("seed"), py::arg("check_finite"), py::arg("auto_tol") = 1e-3,
      "(U, S, Vt): rank-k randomized SVD of the 2-D float array M; n_iter = -1 means auto.");
  m.def("rsvd_last_n_iter", &rsvd_last_n_iter,
        "Power iterations the last rsvd call on this thread made (what 'auto' chose).");
  m.def("rsvd_last_krylov", &rsvd_last_krylov,
        "Whether the last rsvd call on this thread ran block Krylov (what 'auto' chose).");
  m.def("rsvd_last_uncertified", &rsvd_last_uncertified,
        "0.0, or when the last rsvd call on this thread with n_iter='auto' stopped at its "
        "iteration cap uncertified: the rule's estimate of its error over the optimum (inf: none).");

  m.def(
      "rsvd_tol",
      [](py::array M, double tol, i64 max_rank, i64 block, int n_iter, std::uint64_t seed,
         bool check_finite) {
        int kind = same_kind({{&M, "M"}});
        require_ndim(M, "M", 2);
        check_k(M, max_rank, "max_rank");
        return dispatch_float(kind, [&](auto tag) {
          return run_rsvd_tol<typename decltype(tag)::type>(M, tol, max_rank, block, n_iter, seed,
                                                            check_finite);
        });
      },
      py::arg("M"), py::arg("tol"), py::arg("max_rank"), py::arg("block"), py::arg("n_iter"),
      py::arg("seed"), py::arg("check_finite"), "(U, S, Vt, error): smallest rank with relative Frobenius error <= tol.");

  m.def(
      "rsvd_auto_iters",
      [](const std::string& method, i64 m, i64 n, i64 k, i64 oversample) {
        return rsvd_auto_iters(method_of(method), m, n, k, oversample);
      },
      py::arg("method"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("oversample"),
      "The n_iter that 'auto' stands for.");
  m.def(
      "rsvd_passes", [](const std::string& method, int n_iter) { return rsvd_passes(method_of(method), n_iter); },
      py::arg("method"), py::arg("n_iter"), "GEMM passes over M that rsvd makes.");

  m.def(
      "_rsvd_converged",
      [](const std::vector<double>& prev, const std::vector<double>& cur, i64 k, double normA2,
         double eps, bool float64, double inc_prev, int iteration) {
        if (prev.size() != cur.size()) throw std::invalid_argument("prev and cur differ in length");
        if (iteration < 0) throw std::invalid_argument("iteration must be >= 0");
        double est = 0;
        const bool done =
            rsvd_auto_converged(prev, cur, k, normA2, eps, float64, &inc_prev, iteration, &est);
        return py::make_tuple(done, inc_prev, est);
      },
      py::arg("prev"), py::arg("cur"), py::arg("k"), py::arg("normA2"), py::arg("eps"),
      py::arg("float64"), py::arg("inc_prev"), py::arg("iteration") = 0,
      "(converged, inc_prev, estimated err/opt or 0): the n_iter='auto' rule on Ritz values "
      "formed by the caller.");

  m.def(
      "random_normal",
      [](i64 count, std::uint64_t seed, std::uint64_t stream, bool float64) -> py::array {
        if (count < 0) throw std::invalid_argument("count must be >= 0");
        return dispatch_float(float64 ? 1 : 0, [&](auto tag) -> py::array {
          using T = typename decltype(tag)::type;
          py::array_t<T> out(count);
          random::normal<T>(out.mutable_data(), count, seed, stream);
          return out;
        });
      },
      py::arg("count"), py::arg("seed"), py::arg("stream"), py::arg("float64"),
      "Standard normal numbers from the core's Philox generator (element i depends only on seed, stream, i).");
}

}  // namespace rslora::bind
