// The SIMD kernel path (rslora/kernel_path.hpp): which one runs, which this CPU supports, and a
// way to force one (tests and benchmarks run every path on every machine).
#include "pybind.hpp"
#include "rslora/kernel_path.hpp"

namespace rslora::bind {

void bind_kernels(py::module_& m) {
  m.def("kernel_path", []() { return std::string(kernel_path_name(kernel_path())); },
        "The SIMD kernel path in use: 'avx512', 'avx2' or 'baseline'.");
  m.def("set_kernel_path", [](const std::string& name) { set_kernel_path(name); },
        py::arg("name"),
        "Use the SIMD kernel path name from now on (process-wide); ValueError if unknown or if "
        "this CPU cannot run it.");
  m.def("kernel_paths", []() {
    py::dict d;  // every path -> "" when supported, else why not
    for (KernelPath p : {KernelPath::baseline, KernelPath::avx2, KernelPath::avx512})
      d[kernel_path_name(p)] = kernel_path_unsupported_reason(p);
    return d;
  }, "Every kernel path mapped to '' where this CPU supports it, else the reason it cannot run.");
}

}  // namespace rslora::bind
