// lora_linear_backward: shape/dtype validation of 2-D operands, then the core without the GIL.
#include "pybind.hpp"
#include "rslora/backward.hpp"

namespace rslora::bind {
namespace {

using opt_array = std::optional<py::array>;

std::string dims(py::ssize_t a, py::ssize_t b) {
  return "(" + std::to_string(a) + ", " + std::to_string(b) + ")";
}

void require_shape(const py::array& a, const char* name, py::ssize_t r, py::ssize_t c,
                   const std::string& why) {
  require_ndim(a, name, 2);
  if (a.shape(0) != r || a.shape(1) != c)
    shape_error(std::string(name) + " has shape " + shape_str(a) + " but " + why + " needs " +
                dims(r, c));
}

template <class T>
void run(py::array& dy, py::array& x, py::array& W, py::array& A, py::array& B, double s,
         opt_array& xa, opt_array& dx, opt_array& dA, opt_array& dB) {
  auto dyv = mat<const T>(dy, "dy"), xv = mat<const T>(x, "x"), Wv = mat<const T>(W, "W"),
       Av = mat<const T>(A, "A"), Bv = mat<const T>(B, "B");
  std::optional<Mat<const T>> xav;
  std::optional<Mat<T>> dxv, dAv, dBv;
  if (xa) xav = mat<const T>(*xa, "xa");
  if (dx) dxv = mat<T>(*dx, "dx");
  if (dA) dAv = mat<T>(*dA, "dA");
  if (dB) dBv = mat<T>(*dB, "dB");
  py::gil_scoped_release nogil;
  lora_linear_backward<T>(dyv, xv, Wv, Av, Bv, static_cast<T>(s), xav ? &*xav : nullptr,
                          dxv ? &*dxv : nullptr, dAv ? &*dAv : nullptr, dBv ? &*dBv : nullptr);
}

}  // namespace

void bind_backward(py::module_& m) {
  m.def(
      "lora_linear_backward",
      [](py::array dy, py::array x, py::array W, py::array A, py::array B, double s, opt_array xa,
         opt_array dx, opt_array dA, opt_array dB) {
        auto p = [](opt_array& a) { return a ? &*a : nullptr; };
        int kind = same_kind({{&dy, "dy"}, {&x, "x"}, {&W, "W"}, {&A, "A"}, {&B, "B"},
                              {p(xa), "xa"}, {p(dx), "dx"}, {p(dA), "dA"}, {p(dB), "dB"}});
        for (auto [a, name] : {std::pair{&dy, "dy"}, {&x, "x"}, {&W, "W"}, {&A, "A"}, {&B, "B"}})
          require_ndim(*a, name, 2);
        const auto n = x.shape(0), d_in = x.shape(1), d_out = W.shape(0), r = A.shape(0);
        if (W.shape(1) != d_in)
          shape_error("W has shape " + shape_str(W) + " but x has d_in=" + std::to_string(d_in));
        if (A.shape(1) != d_in)
          shape_error("A has shape " + shape_str(A) + " but x has d_in=" + std::to_string(d_in));
        require_shape(B, "B", d_out, r, "W (d_out) with A (r)");
        require_shape(dy, "dy", n, d_out, "x (n) with W (d_out)");
        if (xa) require_shape(*xa, "xa", n, r, "x @ A.T");
        if (dx) require_shape(*dx, "dx", n, d_in, "x");
        if (dA) require_shape(*dA, "dA", r, d_in, "A");
        if (dB) require_shape(*dB, "dB", d_out, r, "B");
        dispatch_float(kind, [&](auto tag) {
          run<typename decltype(tag)::type>(dy, x, W, A, B, s, xa, dx, dA, dB);
        });
      },
      py::arg("dy"), py::arg("x"), py::arg("W"), py::arg("A"), py::arg("B"), py::arg("scale"),
      py::arg("xa"), py::arg("dx"), py::arg("dA"), py::arg("dB"),
      "Write dx = dy W + s (dy B) A, dA = s (dy B)^T x, dB = s dy^T (x A^T) into the outputs "
      "given (None skips one). xa, if given, is x @ A.T. 2-D arrays only.");
}

}  // namespace rslora::bind
