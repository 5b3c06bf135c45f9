// The dispatcher handle of cpvt::peg_forward, looked up once, for the C++ code that calls the op
// through the dispatcher (the autograd below the Autograd key, the Python binding _C.peg_forward).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

namespace cpvt {

using PegForwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&,
                                       const std::optional<at::Tensor>&, c10::SymInt,
                                       c10::SymInt, int64_t);

inline const c10::TypedOperatorHandle<PegForwardSignature>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("cpvt::peg_forward", "")
                             .typed<PegForwardSignature>();
  return op;
}

}  // namespace cpvt
