// The CPU kernels' interface between the op (peg_kernel.cpp: checks, dtype dispatch,
// registration) and the kernels, which are compiled once per dtype (peg_cpu_<dtype>.cpp through
// peg_cpu_impl.h), so that the build compiles the four in parallel.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>

namespace cpvt {
namespace cpu {

// The sizes of a PEG call and the strides of its token tensor.
struct Geometry {
  int64_t B, N, C, H, W, P, kh, kw, ph, pw;
  int64_t sb, st;  // strides of the token tensor in elements (channel stride is 1)
};

// The byte count in the environment variable name, or fallback where it is unset or empty; a
// value that is not a whole number of bytes raises an error that names the variable.
int64_t env_bytes(const char* name, int64_t fallback);

// The switch in the environment variable name: true for "1", false for "0", nullopt where it
// is unset or empty; any other value raises an error that names the variable (the ops check
// every switch on entry, so inside the kernels this never throws).
std::optional<bool> env_flag(const char* name);

// out = PEG(x) for x of dtype T with unit channel stride; out is (B, N, C), contiguous, not
// empty. bias may be absent.
template <typename T>
void forward_typed(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const Geometry& g, at::Tensor& out);

// The gradients in mask of PEG at x: grad_x (B, N, C), grad_w (C, 1, kh, kw) and grad_b (C,),
// each allocated (contiguous) where mask asks for it; grad_out and x with unit channel stride,
// described by gg and gx.
template <typename T>
void backward_typed(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                    const Geometry& gg, const Geometry& gx, std::array<bool, 3> mask,
                    at::Tensor& grad_x, at::Tensor& grad_w, at::Tensor& grad_b);

#define CPVT_CPU_DECLARE(T)                                                                   \
  extern template void forward_typed<T>(const at::Tensor&, const at::Tensor&,                 \
                                        const std::optional<at::Tensor>&, const Geometry&,    \
                                        at::Tensor&);                                         \
  extern template void backward_typed<T>(const at::Tensor&, const at::Tensor&,                \
                                         const at::Tensor&, const Geometry&, const Geometry&, \
                                         std::array<bool, 3>, at::Tensor&, at::Tensor&,       \
                                         at::Tensor&);
CPVT_CPU_DECLARE(float)
CPVT_CPU_DECLARE(double)
CPVT_CPU_DECLARE(c10::Half)
CPVT_CPU_DECLARE(c10::BFloat16)
#undef CPVT_CPU_DECLARE

}  // namespace cpu
}  // namespace cpvt
