// Which SIMD kernels the core runs (the multi-adapter small-group kernels today). The best path
// the CPU supports is chosen at load time; tests and benchmarks force another one, so every path
// is checked on every machine (an AVX-512 machine runs the AVX2 and baseline paths too).
#pragma once
#include <string>
#include <vector>

namespace rslora {

enum class KernelPath { baseline = 0, avx2 = 1, avx512 = 2 };

const char* kernel_path_name(KernelPath p);  // "baseline", "avx2", "avx512"
// Whether this build has the path and this CPU can run it (baseline: always).
bool kernel_path_supported(KernelPath p);
// Empty string when it is supported, else why not (one line).
std::string kernel_path_unsupported_reason(KernelPath p);
std::vector<KernelPath> supported_kernel_paths();  // baseline first, best last
KernelPath kernel_path();                          // the path in use
// Use path p from now on (process-wide); std::invalid_argument if unknown or unsupported.
void set_kernel_path(KernelPath p);
void set_kernel_path(const std::string& name);

}  // namespace rslora
