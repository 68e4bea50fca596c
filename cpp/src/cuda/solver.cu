// cuSOLVER, opened at run time the first time rsvd runs: importing rslora._cuda then needs
// cuBLAS only (cuSOLVER also pulls cuSPARSE and nvJitLink). Prototypes come from cusolverDn.h,
// so a changed signature is a compile error, not a crash. rslora.cuda preloads the library from
// the nvidia-cusolver wheel when the loader cannot find it by name.
#include <dlfcn.h>

#include <vector>

#include "solver.cuh"

namespace rslora::cuda {
namespace {

template <class F>
void resolve(void* lib, const char* name, F& fn) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn) throw cuda_error(std::string("cuSOLVER library lacks ") + name);
}

Solver load() {
  void* lib = nullptr;
  std::string tried;
  for (const char* name : {"libcusolver.so.12", "libcusolver.so.11", "libcusolver.so"}) {
    lib = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
    if (lib) break;
    const char* err = dlerror();
    tried += std::string("\n  ") + (err ? err : name);
  }
  if (!lib)
    throw cuda_error("cuSOLVER could not be loaded (rsvd needs it; pip install nvidia-cusolver "
                     "or put the CUDA toolkit's lib64 on LD_LIBRARY_PATH):" + tried);
  Solver s;
  resolve(lib, "cusolverDnCreate", s.create);
  resolve(lib, "cusolverDnSetStream", s.set_stream);
  resolve(lib, "cusolverDnSgeqrf_bufferSize", s.geqrf_size);
  resolve(lib, "cusolverDnSgeqrf", s.geqrf);
  resolve(lib, "cusolverDnSorgqr_bufferSize", s.orgqr_size);
  resolve(lib, "cusolverDnSorgqr", s.orgqr);
  resolve(lib, "cusolverDnCreateGesvdjInfo", s.create_gesvdj_info);
  resolve(lib, "cusolverDnDestroyGesvdjInfo", s.destroy_gesvdj_info);
  resolve(lib, "cusolverDnSgesvdj_bufferSize", s.gesvdj_size);
  resolve(lib, "cusolverDnSgesvdj", s.gesvdj);
  return s;
}

}  // namespace

const Solver& solver() {
  static const Solver s = load();  // a throwing initializer is retried on the next call
  return s;
}

cusolverDnHandle_t solver_handle(const Ctx& ctx) {
  thread_local std::vector<cusolverDnHandle_t> handles;  // per (thread, device), like cuBLAS
  const Solver& s = solver();
  if (handles.size() <= static_cast<size_t>(ctx.device)) handles.resize(ctx.device + 1, nullptr);
  cusolverDnHandle_t& h = handles[ctx.device];
  if (!h) RSLORA_CUSOLVER_CHECK(s.create(&h));
  RSLORA_CUSOLVER_CHECK(s.set_stream(h, stream_of(ctx)));
  return h;
}

}  // namespace rslora::cuda
