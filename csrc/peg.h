// Shared declarations of the fused PEG op: the input checks every C++ backend runs
// before launching a kernel, and the small helpers the kernels share.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>

namespace cpvt {

constexpr int64_t kMaxKernelSize = 31;

// Validates the arguments of peg_forward (README, "Using it"). Throws c10::ValueError,
// c10::TypeError or c10::Error with a message that names the argument.
void check_forward_inputs(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, int64_t H,
                          int64_t W, int64_t num_prefix_tokens);

// Validates the arguments of peg_backward.
void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& weight, int64_t H, int64_t W,
                           int64_t num_prefix_tokens);

}  // namespace cpvt
