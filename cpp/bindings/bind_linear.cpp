// lora_linear and merge: shape/dtype validation, then the core with the GIL released.
#include "pybind.hpp"
#include "rslora/linear.hpp"

namespace rslora::bind {
namespace {

void check_linear_shapes(const py::array& x, const py::array& W, const py::array& A,
                         const py::array& B, const py::array* bias) {
  require_ndim(x, "x", 2);
  require_ndim(W, "W", 2);
  require_ndim(A, "A", 2);
  require_ndim(B, "B", 2);
  const auto n = x.shape(0), d_in = x.shape(1), d_out = W.shape(0), r = A.shape(0);
  (void)n;
  if (W.shape(1) != d_in)
    shape_error("W has shape " + shape_str(W) + " but x has d_in=" + std::to_string(d_in));
  if (A.shape(1) != d_in)
    shape_error("A has shape " + shape_str(A) + " but x has d_in=" + std::to_string(d_in));
  if (B.shape(0) != d_out || B.shape(1) != r)
    shape_error("B has shape " + shape_str(B) + " but W and A need (" + std::to_string(d_out) +
                ", " + std::to_string(r) + ")");
  if (bias && (bias->ndim() != 1 || bias->shape(0) != d_out))
    shape_error("bias has shape " + shape_str(*bias) + " but W has d_out=" + std::to_string(d_out));
}

template <class T>
void run_linear(py::array& x, py::array& W, py::array& A, py::array& B, double s,
                std::optional<py::array>& bias, py::array& y, py::array& xa) {
  auto xv = mat<const T>(x, "x"), Wv = mat<const T>(W, "W"), Av = mat<const T>(A, "A"),
       Bv = mat<const T>(B, "B");
  auto yv = mat<T>(y, "out"), xav = mat<T>(xa, "xa");
  if (yv.rows != xv.rows || yv.cols != Wv.rows)
    shape_error("out has shape " + shape_str(y) + " but the result has shape (" +
                std::to_string(xv.rows) + ", " + std::to_string(Wv.rows) + ")");
  if (xav.rows != xv.rows || xav.cols != Av.rows)
    shape_error("xa has shape " + shape_str(xa) + " but x A^T has shape (" +
                std::to_string(xv.rows) + ", " + std::to_string(Av.rows) + ")");
  std::optional<Vec<const T>> bv;
  if (bias) bv = vec<const T>(*bias, "bias");
  py::gil_scoped_release nogil;
  lora_linear<T>(xv, Wv, Av, Bv, bv ? &*bv : nullptr, static_cast<T>(s), yv, xav);
}

template <class T>
void run_merge(py::array& W, py::array& A, py::array& B, double s) {
  auto Wv = mat<T>(W, "W");
  auto Av = mat<const T>(A, "A"), Bv = mat<const T>(B, "B");
  py::gil_scoped_release nogil;
  merge<T>(Wv, Av, Bv, static_cast<T>(s));
}

}  // namespace

void bind_linear(py::module_& m) {
  m.def(
      "lora_linear",
      [](py::array x, py::array W, py::array A, py::array B, double s,
         std::optional<py::array> bias, py::array out, py::array xa) {
        int kind = same_kind({{&x, "x"}, {&W, "W"}, {&A, "A"}, {&B, "B"},
                              {bias ? &*bias : nullptr, "bias"}, {&out, "out"}, {&xa, "xa"}});
        check_linear_shapes(x, W, A, B, bias ? &*bias : nullptr);
        dispatch_float(kind, [&](auto tag) {
          run_linear<typename decltype(tag)::type>(x, W, A, B, s, bias, out, xa);
        });
      },
      py::arg("x"), py::arg("W"), py::arg("A"), py::arg("B"), py::arg("scale"), py::arg("bias"),
      py::arg("out"), py::arg("xa"),
      "out = x @ W.T + bias + scale * (x @ A.T) @ B.T; xa receives x @ A.T. 2-D arrays only.");

  m.def(
      "merge",
      [](py::array W, py::array A, py::array B, double s) {
        int kind = same_kind({{&W, "W"}, {&A, "A"}, {&B, "B"}});
        require_ndim(W, "W", 2);
        require_ndim(A, "A", 2);
        require_ndim(B, "B", 2);
        if (A.shape(1) != W.shape(1))
          shape_error("A has shape " + shape_str(A) + " but W has d_in=" + std::to_string(W.shape(1)));
        if (B.shape(0) != W.shape(0) || B.shape(1) != A.shape(0))
          shape_error("B has shape " + shape_str(B) + " but W and A need (" +
                      std::to_string(W.shape(0)) + ", " + std::to_string(A.shape(0)) + ")");
        dispatch_float(kind, [&](auto tag) { run_merge<typename decltype(tag)::type>(W, A, B, s); });
      },
      py::arg("W"), py::arg("A"), py::arg("B"), py::arg("scale"), "W += scale * B @ A in place.");
}

}  // namespace rslora::bind
