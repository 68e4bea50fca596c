// Finds CBLAS/LAPACK symbols in the library the Python layer chose (see blas.hpp).
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <stdexcept>
#include <unordered_map>

#include "rslora/blas.hpp"

namespace rslora::blas {
namespace {

struct State {
  void* handle = nullptr;
  Info info;
  std::mutex mu;
  std::unordered_map<std::string, void*> cache;
  using set_local_fn = int (*)(int);
  set_local_fn set_local = nullptr;  // openblas_set_num_threads_local, when exported
  std::mutex scope_mu;               // guards scope_depth and saved_threads
  int scope_depth = 0;
  int saved_threads = 0;
  std::atomic<bool> scopes_enabled{true};
};

State& state() {
  static State s;
  return s;
}

// Naming flavours seen in the wild: (prefix, cblas suffix, fortran suffix, ILP64?).
struct Flavour {
  const char* prefix;
  const char* cblas_suffix;
  const char* fortran_suffix;
  int int64;  // 1 yes, 0 no, -1 ask openblas_get_config
};
constexpr Flavour kFlavours[] = {
    {"scipy_", "64_", "_64_", 1},  // NumPy's scipy-openblas64
    {"scipy_", "", "_", 0},        // scipy-openblas32
    {"", "64_", "_64_", 1},        // openblas64_ builds with symbol suffix
    {"", "", "_", -1},             // MKL, reference, distribution OpenBLAS (32 or 64 bit ints)
};

std::string fortran_suffix(const Info& in) { return in.cblas_suffix == "64_" ? "_64_" : "_"; }

}  // namespace

void load(const std::string& path) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.handle) {
    if (path == s.info.path) return;
    throw std::runtime_error("BLAS already bound to " + s.info.path + "; cannot switch to " + path);
  }
  // RTLD_NOLOAD first: NumPy has the library open already, and we want that very copy.
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  if (!h) h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) throw std::runtime_error(std::string("cannot open BLAS library: ") + dlerror());

  for (const Flavour& f : kFlavours) {
    std::string gemm = std::string(f.prefix) + "cblas_sgemm" + f.cblas_suffix;
    std::string qr = std::string(f.prefix) + "sgeqrf" + f.fortran_suffix;
    if (!dlsym(h, gemm.c_str())) continue;
    if (!dlsym(h, qr.c_str()))
      throw std::runtime_error(path + " has " + gemm + " but no LAPACK (" + qr + ")");
    Info in;
    in.path = path;
    in.prefix = f.prefix;
    in.cblas_suffix = f.cblas_suffix;
    using cfg_fn = char* (*)();
    auto cfg = reinterpret_cast<cfg_fn>(
        dlsym(h, (std::string(f.prefix) + "openblas_get_config" + f.cblas_suffix).c_str()));
    if (cfg) in.config = cfg();
    in.int64 = f.int64 == 1 || (f.int64 == -1 && in.config.find("USE64BITINT") != std::string::npos);
    // scipy-openblas64 exports it bare (no scipy_ prefix, no 64_ suffix); try the flavour's
    // names first in case other builds decorate it.
    for (const std::string& name :
         {std::string(f.prefix) + "openblas_set_num_threads_local" + f.cblas_suffix,
          std::string(f.prefix) + "openblas_set_num_threads_local",
          std::string("openblas_set_num_threads_local")}) {
      if (void* p = dlsym(h, name.c_str())) {
        s.set_local = reinterpret_cast<State::set_local_fn>(p);
        break;
      }
    }
    s.handle = h;
    s.info = in;
    return;
  }
  dlclose(h);
  throw std::runtime_error(path + " exports no CBLAS sgemm under any known name");
}

bool loaded() { return state().handle != nullptr; }

const Info& info() {
  if (!loaded()) throw std::runtime_error("rslora: BLAS is not bound (rslora._core.blas_load)");
  return state().info;
}

void* symbol(const std::string& plain, bool cblas) {
  State& s = state();
  if (!s.handle) throw std::runtime_error("rslora: BLAS is not bound (rslora._core.blas_load)");
  const std::string key = (cblas ? "c:" : "f:") + plain;
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.cache.find(key);
  if (it != s.cache.end()) return it->second;
  std::string name = s.info.prefix + plain + (cblas ? s.info.cblas_suffix : fortran_suffix(s.info));
  void* p = dlsym(s.handle, name.c_str());
  s.cache.emplace(key, p);
  return p;
}

bool has_local_thread_setter() { return state().set_local != nullptr; }

bool set_single_thread_scopes(bool enabled) { return state().scopes_enabled.exchange(enabled); }

SingleThreadScope::SingleThreadScope(double work) {
  State& s = state();
  if (!(work <= kSmallWork) || !s.set_local || !s.scopes_enabled.load()) return;
  std::lock_guard<std::mutex> lock(s.scope_mu);
  if (s.scope_depth++ == 0) s.saved_threads = s.set_local(1);
  active_ = true;
}

SingleThreadScope::~SingleThreadScope() {
  if (!active_) return;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.scope_mu);
  if (--s.scope_depth == 0) s.set_local(s.saved_threads);
}

PassThreads::PassThreads() {
  State& s = state();
  if (!s.set_local) return;
  std::lock_guard<std::mutex> lock(s.scope_mu);
  if (s.scope_depth++ == 0) s.saved_threads = s.set_local(1);
  threads_ = std::max(1, s.saved_threads);
}

PassThreads::~PassThreads() {
  if (threads_ == 0) return;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.scope_mu);
  if (--s.scope_depth == 0) s.set_local(s.saved_threads);
}

void one_thread_on_this_thread() {
  State& s = state();
  if (s.set_local && num_threads() != 1) s.set_local(1);
}

int num_threads() {
  if (!loaded()) return -1;
  using fn = int (*)();
  if (auto f = reinterpret_cast<fn>(symbol("openblas_get_num_threads", true))) return f();
  if (auto f = reinterpret_cast<fn>(dlsym(state().handle, "MKL_Get_Max_Threads"))) return f();
  return -1;
}

}  // namespace rslora::blas
