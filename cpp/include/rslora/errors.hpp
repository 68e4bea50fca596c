// Exceptions thrown by the core. The bindings map them to Python exception types:
//   std::invalid_argument -> ValueError, std::out_of_range -> IndexError,
//   rslora::type_error -> TypeError, rslora::interrupted -> KeyboardInterrupt.
#pragma once
#include <stdexcept>
#include <string>

namespace rslora {

struct type_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Raised from check_interrupt() when the host (Python) asked the work to stop.
struct interrupted : std::runtime_error {
  interrupted() : std::runtime_error("interrupted") {}
};

// The core knows nothing of Python: the bindings install a checker that looks at pending
// signals. Long loops call check_interrupt() between passes (never inside a BLAS call).
using interrupt_checker = bool (*)();
void set_interrupt_checker(interrupt_checker fn);
void check_interrupt();  // throws rslora::interrupted when the checker says so

}  // namespace rslora
