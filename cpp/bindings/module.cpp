// rslora._core: wires the bind_<area>.cpp files together and maps core exceptions to Python.
#include "pybind.hpp"

namespace rslora::bind {
void bind_blas(py::module_& m);
void bind_kernels(py::module_& m);
void bind_linear(py::module_& m);
void bind_backward(py::module_& m);
void bind_multi(py::module_& m);
void bind_svd(py::module_& m);
}  // namespace rslora::bind

namespace {
// Called by the core between passes of long work, without the GIL.
bool python_signal_pending() {
  py::gil_scoped_acquire gil;
  return PyErr_CheckSignals() != 0;  // leaves KeyboardInterrupt (or the handler's error) set
}
}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "rslora's compiled core (CPU). Use the functions in the rslora package instead.";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const rslora::type_error& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const rslora::interrupted&) {
      if (!PyErr_Occurred()) PyErr_SetNone(PyExc_KeyboardInterrupt);
    }
  });
  rslora::set_interrupt_checker(&python_signal_pending);
  rslora::bind::bind_blas(m);
  rslora::bind::bind_kernels(m);
  rslora::bind::bind_linear(m);
  rslora::bind::bind_backward(m);
  rslora::bind::bind_multi(m);
  rslora::bind::bind_svd(m);
}
