// rslora._cuda: the CUDA ops on DLPack capsules. The Python layer (rslora.cuda) validates the
// arrays with messages in the user's terms, allocates outputs with the caller's framework and
// hands down capsules made on the stream the work runs on; this file reads the capsules,
// re-checks devices, dtypes and shapes, and calls the core with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "dlpack.hpp"
#include "rslora/cuda/ops.hpp"
#include "rslora/errors.hpp"

namespace py = pybind11;
using namespace rslora::cuda;
namespace dlpack = rslora::dlpack;

namespace {

struct Arr {
  const dlpack::Tensor* t;
  const char* name;
  std::int64_t dim(int i) const { return t->shape[i]; }
  std::string shape() const {
    std::string s = "(";
    for (int i = 0; i < t->ndim; ++i) s += (i ? ", " : "") + std::to_string(t->shape[i]);
    return s + (t->ndim == 1 ? ",)" : ")");
  }
  std::int64_t stride(int i) const {
    if (t->strides) return t->strides[i];
    std::int64_t s = 1;
    for (int j = t->ndim - 1; j > i; --j) s *= t->shape[j];
    return s;
  }
  void* data() const { return static_cast<char*>(t->data) + t->byte_offset; }
};

Arr arr(const py::object& cap, const char* name, int device, int ndim) {
  if (!PyCapsule_IsValid(cap.ptr(), dlpack::kCapsuleName))
    throw rslora::type_error(std::string(name) + " must be an unconsumed DLPack capsule");
  auto* mt = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), dlpack::kCapsuleName));
  Arr a{&mt->dl_tensor, name};
  const auto dt = a.t->device.device_type;
  if (dt != dlpack::kCUDA && dt != dlpack::kCUDAManaged)
    throw std::invalid_argument(std::string(name) + " is not in CUDA device memory (DLPack device type " +
                                std::to_string(dt) + ")");
  if (a.t->device.device_id != device)
    throw std::invalid_argument(std::string(name) + " is on cuda:" +
                                std::to_string(a.t->device.device_id) + " but the work runs on cuda:" +
                                std::to_string(device));
  if (a.t->ndim != ndim)
    throw std::invalid_argument(std::string(name) + " must be " + std::to_string(ndim) +
                                "-D, got shape " + a.shape());
  if (a.t->dtype.lanes != 1) throw rslora::type_error(std::string(name) + " has vector lanes");
  return a;
}

DType float_type(const Arr& a) {
  const auto c = a.t->dtype.code, b = a.t->dtype.bits;
  if (c == dlpack::kFloat && b == 32) return DType::f32;
  if (c == dlpack::kFloat && b == 16) return DType::f16;
  if (c == dlpack::kBfloat && b == 16) return DType::bf16;
  throw rslora::type_error(std::string(a.name) + " must be float16, bfloat16 or float32 (DLPack code " +
                           std::to_string(c) + ", " + std::to_string(b) + " bits)");
}

// All arrays share the first one's dtype.
DType same_type(std::initializer_list<const Arr*> arrays) {
  std::optional<DType> t;
  const char* first = nullptr;
  for (const Arr* a : arrays) {
    if (!a) continue;
    DType u = float_type(*a);
    if (!t) {
      t = u, first = a->name;
    } else if (u != *t) {
      throw rslora::type_error(std::string(a->name) + " is " + dtype_name(u) + " but " + first +
                               " is " + dtype_name(*t) + "; cast explicitly");
    }
  }
  return *t;
}

DMat mat(const Arr& a) { return {a.data(), a.dim(0), a.dim(1), a.stride(0), a.stride(1)}; }
DVec vec(const Arr& a) { return {a.data(), a.dim(0), a.stride(0)}; }

void expect(const Arr& a, std::int64_t r, std::int64_t c, const std::string& why) {
  if (a.dim(0) != r || a.dim(1) != c)
    throw std::invalid_argument(std::string(a.name) + " has shape " + a.shape() + " but " + why +
                                " needs (" + std::to_string(r) + ", " + std::to_string(c) + ")");
}

Ctx ctx_of(int device, std::uintptr_t stream) {
  return {device, reinterpret_cast<void*>(stream)};
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "rslora's CUDA kernels on DLPack capsules. Use rslora.cuda instead.";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const rslora::type_error& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  m.def("device_count", &device_count, "Number of CUDA devices (RuntimeError without a driver).");
  m.def("device_name", &device_name, py::arg("device"));
  m.def("compute_capability", &compute_capability, py::arg("device"));
  m.def(
      "synchronize",
      [](int device, std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        synchronize(ctx_of(device, stream));
      },
      py::arg("device"), py::arg("stream"));

  m.def(
      "lora_linear",
      [](int device, std::uintptr_t stream, py::object x, py::object W, py::object A,
         py::object B, double s, py::object bias, py::object y, py::object xa) {
        Arr ax = arr(x, "x", device, 2), aW = arr(W, "W", device, 2), aA = arr(A, "A", device, 2),
            aB = arr(B, "B", device, 2), ay = arr(y, "out", device, 2),
            axa = arr(xa, "xa", device, 2);
        std::optional<Arr> ab;
        if (!bias.is_none()) ab = arr(bias, "bias", device, 1);
        DType t = same_type({&ax, &aW, &aA, &aB, ab ? &*ab : nullptr, &ay, &axa});
        const auto n = ax.dim(0), d_in = ax.dim(1), d_out = aW.dim(0), r = aA.dim(0);
        expect(aW, d_out, d_in, "x");
        expect(aA, r, d_in, "x");
        expect(aB, d_out, r, "W and A");
        expect(ay, n, d_out, "the result");
        expect(axa, n, r, "x A^T");
        if (ab && ab->dim(0) != d_out)
          throw std::invalid_argument("bias has shape " + ab->shape() + " but W has d_out=" +
                                      std::to_string(d_out));
        std::optional<DVec> bv;
        if (ab) bv = vec(*ab);
        py::gil_scoped_release nogil;
        lora_linear(ctx_of(device, stream), t, mat(ax), mat(aW), mat(aA), mat(aB),
                    bv ? &*bv : nullptr, s, mat(ay), mat(axa));
      },
      py::arg("device"), py::arg("stream"), py::arg("x"), py::arg("W"), py::arg("A"),
      py::arg("B"), py::arg("scale"), py::arg("bias"), py::arg("out"), py::arg("xa"));

  m.def(
      "merge",
      [](int device, std::uintptr_t stream, py::object W, py::object A, py::object B, double s) {
        Arr aW = arr(W, "W", device, 2), aA = arr(A, "A", device, 2), aB = arr(B, "B", device, 2);
        DType t = same_type({&aW, &aA, &aB});
        expect(aA, aA.dim(0), aW.dim(1), "W");
        expect(aB, aW.dim(0), aA.dim(0), "W and A");
        py::gil_scoped_release nogil;
        merge(ctx_of(device, stream), t, mat(aW), mat(aA), mat(aB), s);
      },
      py::arg("device"), py::arg("stream"), py::arg("W"), py::arg("A"), py::arg("B"),
      py::arg("scale"));

  m.def(
      "lora_linear_multi",
      [](int device, std::uintptr_t stream, py::object x, py::object W, py::object A_all,
         py::object B_all, py::object ids, py::object scales, py::object bias, py::object y) {
        const bool base = !W.is_none();
        Arr ax = arr(x, "x", device, 2), aA = arr(A_all, "A_all", device, 3),
            aB = arr(B_all, "B_all", device, 3), ai = arr(ids, "adapter_ids", device, 1),
            as = arr(scales, "scales", device, 1), ay = arr(y, base ? "out" : "y", device, 2);
        std::optional<Arr> aW, ab;
        if (base) aW = arr(W, "W", device, 2);
        if (!bias.is_none()) ab = arr(bias, "bias", device, 1);
        DType t = same_type({&ax, aW ? &*aW : nullptr, &aA, &aB, ab ? &*ab : nullptr, &ay});
        const auto n = ax.dim(0), d_in = ax.dim(1), na = aA.dim(0), r = aA.dim(1),
                   d_out = ay.dim(1);
        if (aW) expect(*aW, d_out, d_in, "x and the result");
        if (aA.dim(2) != d_in)
          throw std::invalid_argument("A_all has shape " + aA.shape() + " but x has d_in=" +
                                      std::to_string(d_in));
        if (aB.dim(0) != na || aB.dim(1) != d_out || aB.dim(2) != r)
          throw std::invalid_argument("B_all has shape " + aB.shape() + " but A_all and the result need (" +
                                      std::to_string(na) + ", " + std::to_string(d_out) + ", " +
                                      std::to_string(r) + ")");
        // The stacks are read with fixed strides by the kernels: C-contiguous only.
        for (const Arr* a : {&aA, &aB}) {
          std::int64_t want = 1;  // strides of size-1 dimensions do not matter
          for (int d = 2; d >= 0; want *= a->dim(d), --d)
            if (a->dim(d) > 1 && a->stride(d) != want)
              throw std::invalid_argument(std::string(a->name) + " must be C-contiguous on the GPU");
        }
        if (ay.dim(0) != n) expect(ay, n, d_out, "x");
        if (ai.dim(0) != n)
          throw std::invalid_argument("adapter_ids has shape " + ai.shape() + " but x has " +
                                      std::to_string(n) + " rows");
        if (ai.t->dtype.code != dlpack::kInt || ai.t->dtype.bits != 64)
          throw rslora::type_error("adapter_ids must be int64 here (rslora.cuda converts)");
        if (as.dim(0) != na || as.t->dtype.code != dlpack::kFloat || as.t->dtype.bits != 32 ||
            as.stride(0) != 1)
          throw std::invalid_argument("scales must be a contiguous float32 vector of n_adapters");
        if (ab && ab->dim(0) != d_out)
          throw std::invalid_argument("bias has shape " + ab->shape() + " but the result has d_out=" +
                                      std::to_string(d_out));
        std::optional<DVec> bv;
        if (ab) bv = vec(*ab);
        MultiArgs a;
        a.x = mat(ax);
        if (aW) a.W = mat(*aW);
        a.y = mat(ay);
        a.bias = bv ? &*bv : nullptr;
        a.A_all = aA.data();
        a.B_all = aB.data();
        a.n_adapters = na;
        a.r = r;
        a.ids = static_cast<const std::int64_t*>(ai.data());
        a.ids_stride = ai.stride(0);
        a.scales = static_cast<const float*>(as.data());
        a.base = base;
        py::gil_scoped_release nogil;
        lora_linear_multi(ctx_of(device, stream), t, a);
      },
      py::arg("device"), py::arg("stream"), py::arg("x"), py::arg("W"), py::arg("A_all"),
      py::arg("B_all"), py::arg("adapter_ids"), py::arg("scales"), py::arg("bias"), py::arg("out"),
      "W=None: y += LoRA terms in place (lora_add_multi); else out = x W^T + bias + LoRA terms.");

  m.def(
      "rsvd",
      [](int device, std::uintptr_t stream, py::object M, std::int64_t k, std::int64_t oversample,
         int n_iter, std::uint64_t seed, py::object U, py::object S, py::object Vt) {
        Arr aM = arr(M, "M", device, 2), aU = arr(U, "U", device, 2), aS = arr(S, "S", device, 1),
            aV = arr(Vt, "Vt", device, 2);
        for (const Arr* a : {&aM, &aU, &aS, &aV})
          if (float_type(*a) != DType::f32)
            throw rslora::type_error(std::string(a->name) + " must be float32 here");
        const auto m_ = aM.dim(0), n_ = aM.dim(1);
        if (k < 0 || k > std::min(m_, n_))
          throw std::invalid_argument("k=" + std::to_string(k) + " must be in [0, min(m, n)] for M of shape " +
                                      aM.shape());
        expect(aU, m_, k, "M and k");
        expect(aV, k, n_, "M and k");
        if (aS.dim(0) != k) throw std::invalid_argument("S has shape " + aS.shape() + " but k=" + std::to_string(k));
        py::gil_scoped_release nogil;
        rsvd(ctx_of(device, stream), mat(aM), k, oversample, n_iter, seed, mat(aU), vec(aS), mat(aV));
      },
      py::arg("device"), py::arg("stream"), py::arg("M"), py::arg("k"), py::arg("oversample"),
      py::arg("n_iter"), py::arg("seed"), py::arg("U"), py::arg("S"), py::arg("Vt"));

  m.def(
      "philox_normal",
      [](int device, std::uintptr_t stream, py::object out, std::uint64_t seed) {
        Arr a = arr(out, "out", device, 1);
        if (float_type(a) != DType::f32 || a.stride(0) != 1)
          throw std::invalid_argument("out must be a contiguous float32 vector");
        py::gil_scoped_release nogil;
        philox_normal(ctx_of(device, stream), static_cast<float*>(a.data()), a.dim(0), seed);
      },
      py::arg("device"), py::arg("stream"), py::arg("out"), py::arg("seed"),
      "Standard normals from Philox4x32-10: value i depends only on (seed, i).");

  m.def(
      "philox4x32_10",
      [](std::array<std::uint32_t, 4> ctr, std::array<std::uint32_t, 2> key) {
        std::array<std::uint32_t, 4> out{};
        philox4x32_10_host(ctr.data(), key.data(), out.data());
        return out;
      },
      py::arg("counter"), py::arg("key"), "One Philox4x32-10 block on the host (known-answer tests).");
}
