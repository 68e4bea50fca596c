// Multi-adapter forward (lora_linear_multi) and the adapter part alone (lora_add_multi):
// validation of shapes/dtypes, then the core without the GIL (which checks the ids first).
#include <cstdint>

#include "pybind.hpp"
#include "rslora/multi.hpp"

namespace rslora::bind {
namespace {

std::string num(py::ssize_t v) { return std::to_string(v); }

template <class T>
Stack<T> stack(py::array& a, const char* name) {
  require_ndim(a, name, 3);
  require_aligned<std::remove_const_t<T>>(a, name);
  return {static_cast<T*>(const_cast<void*>(a.data())), a.shape(0), a.shape(1), a.shape(2),
          elem_stride<T>(a, 0, name), elem_stride<T>(a, 1, name), elem_stride<T>(a, 2, name)};
}

// The adapter stacks, ids and scales against x (n, d_in) and d_out.
void check_multi(const py::array& x, py::ssize_t d_out, const py::array& A, const py::array& B,
                 const py::array& ids, const py::array& scales) {
  require_ndim(x, "x", 2);
  require_ndim(A, "A_all", 3);
  require_ndim(B, "B_all", 3);
  const auto n = x.shape(0), d_in = x.shape(1), na = A.shape(0), r = A.shape(1);
  if (A.shape(2) != d_in)
    shape_error("A_all has shape " + shape_str(A) + " but x has d_in=" + num(d_in));
  if (B.shape(0) != na || B.shape(1) != d_out || B.shape(2) != r)
    shape_error("B_all has shape " + shape_str(B) + " but A_all " + shape_str(A) + " and d_out=" +
                num(d_out) + " need (" + num(na) + ", " + num(d_out) + ", " + num(r) + ")");
  if (!is_native<std::int64_t>(ids.dtype()) || ids.ndim() != 1 ||
      !(ids.flags() & py::array::c_style))
    throw type_error("adapter_ids must be a contiguous 1-D int64 array, got " +
                     std::string(py::str(ids.dtype())) + " with shape " + shape_str(ids));
  require_aligned<std::int64_t>(ids, "adapter_ids");
  if (ids.shape(0) != n)
    shape_error("adapter_ids has shape " + shape_str(ids) + " but x has " + num(n) + " rows");
  if (!is_native<double>(scales.dtype()) || scales.ndim() != 1 ||
      !(scales.flags() & py::array::c_style))
    throw type_error("scales must be a contiguous 1-D float64 array, got " +
                     std::string(py::str(scales.dtype())) + " with shape " + shape_str(scales));
  require_aligned<double>(scales, "scales");
  if (scales.shape(0) != na)
    shape_error("scales has shape " + shape_str(scales) + " but there are " + num(na) +
                " adapters (A_all " + shape_str(A) + ")");
}

template <class T>
void run_add(py::array& y, py::array& x, py::array& A, py::array& B, py::array& ids,
             py::array& scales) {
  auto yv = mat<T>(y, "y");
  auto xv = mat<const T>(x, "x");
  auto Av = stack<const T>(A, "A_all"), Bv = stack<const T>(B, "B_all");
  auto idp = static_cast<const i64*>(ids.data());
  auto sp = static_cast<const double*>(scales.data());
  py::gil_scoped_release nogil;
  lora_add_multi<T>(yv, xv, Av, Bv, idp, sp);
}

template <class T>
void run_linear(py::array& x, py::array& W, py::array& A, py::array& B, py::array& ids,
                py::array& scales, std::optional<py::array>& bias, py::array& y) {
  auto xv = mat<const T>(x, "x"), Wv = mat<const T>(W, "W");
  auto yv = mat<T>(y, "out");
  auto Av = stack<const T>(A, "A_all"), Bv = stack<const T>(B, "B_all");
  std::optional<Vec<const T>> bv;
  if (bias) bv = vec<const T>(*bias, "bias");
  auto idp = static_cast<const i64*>(ids.data());
  auto sp = static_cast<const double*>(scales.data());
  py::gil_scoped_release nogil;
  lora_linear_multi<T>(xv, Wv, Av, Bv, idp, sp, bv ? &*bv : nullptr, yv);
}

}  // namespace

void bind_multi(py::module_& m) {
  m.def(
      "lora_add_multi",
      [](py::array y, py::array x, py::array A, py::array B, py::array ids, py::array scales) {
        int kind = same_kind({{&y, "y"}, {&x, "x"}, {&A, "A_all"}, {&B, "B_all"}});
        require_ndim(y, "y", 2);
        check_multi(x, y.shape(1), A, B, ids, scales);
        if (y.shape(0) != x.shape(0))
          shape_error("y has shape " + shape_str(y) + " but x has " + num(x.shape(0)) + " rows");
        dispatch_float(kind, [&](auto tag) {
          run_add<typename decltype(tag)::type>(y, x, A, B, ids, scales);
        });
      },
      py::arg("y"), py::arg("x"), py::arg("A_all"), py::arg("B_all"), py::arg("adapter_ids"),
      py::arg("scales"),
      "y[i] += scales[a] * (x[i] @ A_all[a].T) @ B_all[a].T with a = adapter_ids[i] (-1: none), "
      "in place. 2-D x/y, 3-D stacks, int64 ids, float64 scales.");

  m.def(
      "lora_linear_multi",
      [](py::array x, py::array W, py::array A, py::array B, py::array ids, py::array scales,
         std::optional<py::array> bias, py::array out) {
        int kind = same_kind({{&x, "x"}, {&W, "W"}, {&A, "A_all"}, {&B, "B_all"},
                              {bias ? &*bias : nullptr, "bias"}, {&out, "out"}});
        require_ndim(W, "W", 2);
        check_multi(x, W.shape(0), A, B, ids, scales);
        if (W.shape(1) != x.shape(1))
          shape_error("W has shape " + shape_str(W) + " but x has d_in=" + num(x.shape(1)));
        if (bias && (bias->ndim() != 1 || bias->shape(0) != W.shape(0)))
          shape_error("bias has shape " + shape_str(*bias) + " but W has d_out=" + num(W.shape(0)));
        require_ndim(out, "out", 2);
        if (out.shape(0) != x.shape(0) || out.shape(1) != W.shape(0))
          shape_error("out has shape " + shape_str(out) + " but the result has shape (" +
                      num(x.shape(0)) + ", " + num(W.shape(0)) + ")");
        dispatch_float(kind, [&](auto tag) {
          run_linear<typename decltype(tag)::type>(x, W, A, B, ids, scales, bias, out);
        });
      },
      py::arg("x"), py::arg("W"), py::arg("A_all"), py::arg("B_all"), py::arg("adapter_ids"),
      py::arg("scales"), py::arg("bias"), py::arg("out"),
      "out = x @ W.T + bias, then lora_add_multi(out, x, ...). 2-D x/out.");
}

}  // namespace rslora::bind
