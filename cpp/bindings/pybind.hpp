// The one header through which the bindings see pybind11, plus the array helpers they share.
// Bindings validate (with the GIL held), convert to core views, then release the GIL; no math here.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "rslora/errors.hpp"
#include "rslora/view.hpp"

namespace py = pybind11;

namespace rslora::bind {

inline std::string shape_str(const py::array& a) {
  std::ostringstream os;
  os << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  os << (a.ndim() == 1 ? ",)" : ")");
  return os.str();
}

// Whether d is T in native byte order. Compared by value, not identity: an array that went
// through pickle (multiprocessing, Dask) has an equal dtype that is not NumPy's singleton.
template <class T>
bool is_native(const py::dtype& d) {
  const py::dtype want = py::dtype::of<T>();
  return d.is(want) || d.equal(want);  // NumPy's ==: '>f4' is not float32 on a little-endian CPU
}

// 0 for float32, 1 for float64; anything else is a TypeError naming the argument.
inline int float_kind(const py::array& a, const char* name) {
  if (is_native<float>(a.dtype())) return 0;
  if (is_native<double>(a.dtype())) return 1;
  throw type_error(std::string(name) + " must be float32 or float64, got " +
                   std::string(py::str(a.dtype())));
}

// All operands share the first one's dtype; mixing is a TypeError (no silent upcast).
inline int same_kind(std::initializer_list<std::pair<const py::array*, const char*>> arrays) {
  int kind = -1;
  const char* first = nullptr;
  for (auto [a, name] : arrays) {
    if (!a) continue;
    int k = float_kind(*a, name);
    if (kind < 0) {
      kind = k, first = name;
    } else if (k != kind) {
      throw type_error(std::string(name) + " is " + std::string(py::str(a->dtype())) + " but " +
                       first + " is " + (kind ? "float64" : "float32") + "; cast explicitly");
    }
  }
  return kind;
}

// Calls f(type_tag<float>{}) for kind 0 and f(type_tag<double>{}) otherwise: the one place a
// float kind (from float_kind/same_kind) turns into a C++ type. In f: using T = typename
// decltype(tag)::type. Both instantiations must return the same type.
template <class T>
struct type_tag {
  using type = T;
};

template <class F>
decltype(auto) dispatch_float(int kind, F&& f) {
  if (kind == 0) return f(type_tag<float>{});
  return f(type_tag<double>{});
}

inline void require_ndim(const py::array& a, const char* name, py::ssize_t nd) {
  if (a.ndim() != nd)
    throw std::invalid_argument(std::string(name) + " must be " + std::to_string(nd) +
                                "-D, got shape " + shape_str(a));
}

// The core reads whole elements: data at an address that is not a multiple of the element's
// alignment (np.frombuffer at an odd byte offset) would be undefined behaviour there, so it is
// refused here (the Python layer hands over aligned copies).
template <class T>
void require_aligned(const py::array& a, const char* name) {
  if (reinterpret_cast<std::uintptr_t>(a.data()) % alignof(T) != 0)
    throw std::invalid_argument(std::string(name) + " is not aligned (its data start at an odd "
                                "byte offset); pass a copy");
}

template <class T>
i64 elem_stride(const py::array& a, int axis, const char* name) {
  py::ssize_t s = a.strides(axis);
  // Negative strides are fine: the core copies what BLAS cannot read in place.
  if (s % static_cast<py::ssize_t>(sizeof(T)) != 0)
    throw std::invalid_argument(std::string(name) + " has misaligned strides; pass a copy");
  return s / static_cast<py::ssize_t>(sizeof(T));
}

// A 2-D array as a core view (no copy). Writable views are asked for with T non-const.
template <class T>
Mat<T> mat(py::array& a, const char* name) {
  require_ndim(a, name, 2);
  using U = std::remove_const_t<T>;
  require_aligned<U>(a, name);
  T* p;
  if constexpr (std::is_const_v<T>) {
    p = static_cast<T*>(a.data());
  } else {
    if (!a.writeable()) throw std::invalid_argument(std::string(name) + " is read-only");
    p = static_cast<T*>(a.mutable_data());
  }
  return {p, a.shape(0), a.shape(1), elem_stride<U>(a, 0, name), elem_stride<U>(a, 1, name)};
}

template <class T>
Vec<T> vec(py::array& a, const char* name) {
  require_ndim(a, name, 1);
  using U = std::remove_const_t<T>;
  require_aligned<U>(a, name);
  return {static_cast<T*>(const_cast<void*>(a.data())), a.shape(0), elem_stride<U>(a, 0, name)};
}

[[noreturn]] inline void shape_error(const std::string& msg) { throw std::invalid_argument(msg); }

}  // namespace rslora::bind
