// Autograd of cpvt::peg_forward, for every device: the backward is the registered op
// cpvt::peg_backward, called with an output mask so that each gradient is computed only when
// required. Registered here, at the Autograd key, rather than with torch.library's Python
// register_autograd: the Python wrapper costs about 50 us per forward and backward (argument
// normalization, a redispatch, a Python backward), as much as the whole op on a small input.
// Graphs that torch.compile or torch.export trace still contain only the two ops.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "forward_op.h"

#include <array>

namespace cpvt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class PegFunction : public torch::autograd::Function<PegFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, c10::SymInt H, c10::SymInt W,
                            int64_t num_prefix_tokens) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["H"] = H;
    ctx->saved_data["W"] = W;
    ctx->saved_data["P"] = num_prefix_tokens;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(x, weight, bias, std::move(H), std::move(W), num_prefix_tokens);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("cpvt::peg_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt,
                c10::SymInt, int64_t, std::array<bool, 3>)>();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->saved_data["has_bias"].toBool() &&
                                          ctx->needs_input_grad(2)};
    variable_list out(6);  // x, weight, bias, H, W, num_prefix_tokens
    if (!mask[0] && !mask[1] && !mask[2]) return out;
    const auto saved = ctx->get_saved_variables();
    auto [gx, gw, gb] =
        op.call(grads[0], saved[0], saved[1], ctx->saved_data["H"].toSymInt(),
                ctx->saved_data["W"].toSymInt(), ctx->saved_data["P"].toInt(), mask);
    if (mask[0]) out[0] = std::move(gx);
    if (mask[1]) out[1] = std::move(gw);
    if (mask[2]) out[2] = std::move(gb);
    return out;
  }
};

// Without a gradient to record (grad mode off, or no input that requires one) the op runs
// directly: Function::apply would still build a graph node and its saved data (a node, a
// context and four map entries per call), about 1 us with warm caches and several with cold
// ones, on an op whose whole forward is 0.2 ms at the CPVT-Ti shape on a CPU.
at::Tensor peg_forward_autograd(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, c10::SymInt H,
                                c10::SymInt W, int64_t num_prefix_tokens) {
  // No forward-mode derivative (torch.func.jvp, torch.autograd.forward_ad): the op would
  // return its output without a tangent, as if the derivative were zero.
  TORCH_CHECK(!x._fw_grad(0).defined() && !weight._fw_grad(0).defined() &&
                  !(bias.has_value() && bias->defined() && bias->_fw_grad(0).defined()),
              "fused_peg: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not "
              "supported by the fused backends; use backend=\"reference\"");
  const bool record = at::GradMode::is_enabled() &&
                      (x.requires_grad() || weight.requires_grad() ||
                       (bias.has_value() && bias->defined() && bias->requires_grad()));
  if (!record) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(x, weight, bias, std::move(H), std::move(W), num_prefix_tokens);
  }
  return PegFunction::apply(x, weight, bias, std::move(H), std::move(W), num_prefix_tokens);
}

}  // namespace
}  // namespace cpvt

// The backward op has no derivative of its own. Registered as not implemented, a double
// backward through it (create_graph=True, then a gradient of a gradient) raises "derivative for
// cpvt::peg_backward is not implemented"; without a kernel here torch's fallback would only warn
// and treat the second-order gradients as zero.
TORCH_LIBRARY_IMPL(cpvt, Autograd, m) {
  m.impl("peg_forward", &cpvt::peg_forward_autograd);
  m.impl("peg_backward", torch::autograd::autogradNotImplementedFallback());
}
