#include <atomic>

#include "rslora/errors.hpp"

namespace rslora {
namespace {
std::atomic<interrupt_checker> g_checker{nullptr};
}

void set_interrupt_checker(interrupt_checker fn) { g_checker.store(fn); }

void check_interrupt() {
  interrupt_checker fn = g_checker.load();
  if (fn && fn()) throw interrupted();
}

}  // namespace rslora
