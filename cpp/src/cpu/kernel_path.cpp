// Run-time choice of the SIMD kernel path (rslora/kernel_path.hpp). One process-wide atomic read
// by the kernels' dispatch; set at load time to the best path the CPU supports.
#include "rslora/kernel_path.hpp"

#include <atomic>
#include <stdexcept>

#include "multi_kernels.hpp"

namespace rslora {
namespace {

KernelPath best_path() {
  auto all = supported_kernel_paths();
  return all.back();
}

std::atomic<int>& current() {
  static std::atomic<int> p{static_cast<int>(best_path())};
  return p;
}

}  // namespace

const char* kernel_path_name(KernelPath p) {
  switch (p) {
    case KernelPath::baseline: return "baseline";
    case KernelPath::avx2: return "avx2";
    case KernelPath::avx512: return "avx512";
  }
  return "unknown";
}

std::string kernel_path_unsupported_reason(KernelPath p) {
  switch (p) {
    case KernelPath::baseline:
      return "";
    case KernelPath::avx2:
#if RSLORA_HAVE_X86_KERNELS
      return detail::have_avx2_fma() ? "" : "this CPU lacks AVX2 or FMA";
#else
      return "this build has no x86 SIMD kernels";
#endif
    case KernelPath::avx512:
#if RSLORA_HAVE_X86_KERNELS
      return detail::have_avx512() ? "" : "this CPU lacks AVX-512F";
#else
      return "this build has no x86 SIMD kernels";
#endif
  }
  return "unknown kernel path";
}

bool kernel_path_supported(KernelPath p) { return kernel_path_unsupported_reason(p).empty(); }

std::vector<KernelPath> supported_kernel_paths() {
  std::vector<KernelPath> out;
  for (KernelPath p : {KernelPath::baseline, KernelPath::avx2, KernelPath::avx512})
    if (kernel_path_supported(p)) out.push_back(p);
  return out;
}

KernelPath kernel_path() { return static_cast<KernelPath>(current().load(std::memory_order_relaxed)); }

void set_kernel_path(KernelPath p) {
  const std::string why = kernel_path_unsupported_reason(p);
  if (!why.empty())
    throw std::invalid_argument(std::string("kernel path '") + kernel_path_name(p) +
                                "' cannot run here: " + why);
  current().store(static_cast<int>(p), std::memory_order_relaxed);
}

void set_kernel_path(const std::string& name) {
  for (KernelPath p : {KernelPath::baseline, KernelPath::avx2, KernelPath::avx512})
    if (name == kernel_path_name(p)) return set_kernel_path(p);
  throw std::invalid_argument("unknown kernel path '" + name +
                              "' (expected 'avx512', 'avx2' or 'baseline')");
}

}  // namespace rslora
