// The DLPack C ABI (https://dmlc.github.io/dlpack/latest/c_api.html), the legacy unversioned
// form that `__dlpack__()` returns by default: just the structs this module reads.
#pragma once
#include <cstdint>

namespace rslora::dlpack {

enum DeviceType : std::int32_t { kCPU = 1, kCUDA = 2, kCUDAHost = 3, kCUDAManaged = 13 };
enum TypeCode : std::uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4 };

struct Device {
  std::int32_t device_type;
  std::int32_t device_id;
};

struct DataType {
  std::uint8_t code;
  std::uint8_t bits;
  std::uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  std::int32_t ndim;
  DataType dtype;
  std::int64_t* shape;
  std::int64_t* strides;  // in elements; null means C-contiguous
  std::uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};

// The capsule name of an unconsumed legacy tensor. The module only borrows the tensor for
// the duration of a call and never renames the capsule, so its destructor frees it.
inline constexpr const char* kCapsuleName = "dltensor";

}  // namespace rslora::dlpack
