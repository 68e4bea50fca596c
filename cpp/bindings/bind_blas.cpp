// Binding to the process's BLAS (chosen in python/rslora/_blas.py) and what it reports.
#include "pybind.hpp"
#include "rslora/blas.hpp"

namespace rslora::bind {

void bind_blas(py::module_& m) {
  m.def("blas_load", [](const std::string& path) { blas::load(path); }, py::arg("path"),
        "Bind the core to the CBLAS/LAPACK in the shared library at path (once per process).");
  m.def("blas_loaded", &blas::loaded);
  m.def("blas_info", []() {
    const auto& in = blas::info();
    py::dict d;
    d["path"] = in.path;
    d["symbol_prefix"] = in.prefix;
    d["symbol_suffix"] = in.cblas_suffix;
    d["int64"] = in.int64;
    d["config"] = in.config;
    d["num_threads"] = blas::num_threads();
    return d;
  });
  m.def("blas_num_threads", &blas::num_threads);
  m.def("blas_has_local_thread_setter", &blas::has_local_thread_setter,
        "Whether small calls inside rsvd/rsvd_tol can run on one thread (openblas_set_num_threads_local).");
  m.def("_blas_single_thread_scopes", &blas::set_single_thread_scopes, py::arg("enabled"),
        "Test hook: enable/disable the one-thread scopes around small calls; returns the previous setting.");
  m.def("_blas_split_passes", &blas::set_split_passes, py::arg("enabled"),
        "Test hook: enable/disable the row-block split of rsvd's passes over M; returns the previous setting.");
}

}  // namespace rslora::bind
