// CUDA backend of the fused PEG: the ops, their checks, dtype dispatch and registration. The
// launches live in peg_launch.cuh, compiled once per dtype (peg_<dtype>.cu, in parallel); the
// kernels and their tiling in peg_kernel.cuh.
//
// Only light headers here (no <torch/extension.h>, no ATen/cuda/CUDAContext.h) to keep nvcc
// fast; the op schemas are declared in peg.cpp.
#include "../peg.h"
#include "peg_typed.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

namespace cpvt {
namespace peg_cuda {
namespace {

DeviceInfo device_info(int index) {
  static std::mutex mu;
  static std::unordered_map<int, DeviceInfo> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(index);
  if (it != cache.end()) return it->second;
  int sms = 0, optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, index));
  return cache.emplace(index, DeviceInfo{index, sms, optin}).first->second;
}

// Kernels read channels contiguously; any batch and token strides are fine.
at::Tensor channels_contiguous(const at::Tensor& t) {
  return (t.size(2) <= 1 || t.stride(2) == 1) ? t : t.contiguous();
}

// 16-byte vectors need C, the strides that are used and the first element to be aligned.
bool vector_ok(const at::Tensor& t, int vec) {
  return t.size(2) % vec == 0 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 &&
         (t.size(0) <= 1 || t.stride(0) % vec == 0) && (t.size(1) <= 1 || t.stride(1) % vec == 0);
}

// CPVT_CUDA_KERNELS: "tile" or "stream" forces one kernel family (the streaming kernels only
// where they apply: kernel size 1 or 3 on the 16-byte vector path); "pipe" is "stream" with the
// experimental cp.async kernels where they apply (Kernels::kPipe); "auto" or unset takes the
// faster one (Kernels::kAuto). Read at each call.
Kernels kernels_from_env() {
  const char* env = std::getenv("CPVT_CUDA_KERNELS");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return Kernels::kAuto;
  if (std::strcmp(env, "tile") == 0) return Kernels::kTile;
  if (std::strcmp(env, "pipe") == 0) return Kernels::kPipe;
  TORCH_CHECK(std::strcmp(env, "stream") == 0,
              "fused_peg (cuda): CPVT_CUDA_KERNELS must be 'auto', 'tile', 'stream' or 'pipe', "
              "got '", env, "'");
  return Kernels::kStream;
}

void check_grid(int64_t H, int64_t W) {
  constexpr int64_t kMax = int64_t(1) << 30;
  TORCH_CHECK(H < kMax && W < kMax, "fused_peg (cuda): size (H, W) must be below 2^30 each, got (",
              H, ", ", W, ")");
}

// ---------------------------------------------------------------------------------------------
// The ops.

at::Tensor peg_forward_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t H, int64_t W,
                            int64_t P) {
  check_forward_inputs(x_in, weight, bias, H, W, P);
  TORCH_CHECK(x_in.is_cuda(), "fused_peg (cuda): x must be a CUDA tensor, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = channels_contiguous(x_in);
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  if (out.numel() == 0) return out;
  check_grid(H, W);
  const bool has_bias = bias.has_value() && bias->defined();
  const DeviceInfo dev = device_info(x.get_device());
  const Kernels kernels = kernels_from_env();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peg_forward_cuda", [&] {
    constexpr int V = static_cast<int>(16 / sizeof(scalar_t));
    const bool vec = vector_ok(x, V) && vector_ok(out, V);
    forward_typed<scalar_t>(x, weight, has_bias ? &*bias : nullptr, /*flip=*/false, out, H, W, P,
                            vec, kernels, dev, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> peg_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, int64_t H,
    int64_t W, int64_t P, std::array<bool, 3> output_mask) {
  check_backward_inputs(grad_out_in, x_in, weight, H, W, P);
  TORCH_CHECK(x_in.is_cuda(), "fused_peg (cuda): x must be a CUDA tensor, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor grad_out = channels_contiguous(grad_out_in);
  const at::Tensor x = channels_contiguous(x_in);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const int kh = static_cast<int>(weight.size(2)), kw = static_cast<int>(weight.size(3));
  const bool want_x = output_mask[0], want_w = output_mask[1], want_b = output_mask[2];
  // Masked-out outputs are distinct empty tensors (outputs must not alias one another).
  at::Tensor grad_x = want_x ? at::empty({B, N, C}, x.options()) : at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, x.options()), grad_b = at::empty({0}, x.options());
  if (B == 0 || C == 0) {  // nothing to launch; the sums over no pixels are zero
    if (want_w) grad_w = at::zeros({C, 1, kh, kw}, weight.options());
    if (want_b) grad_b = at::zeros({C}, x.options());
    return {grad_x, grad_w, grad_b};
  }
  if (want_w) grad_w = at::empty({C, 1, kh, kw}, weight.options());
  if (want_b) grad_b = at::empty({C}, x.options());
  if (!want_x && !want_w && !want_b) return {grad_x, grad_w, grad_b};
  check_grid(H, W);
  const int device = x.get_device();
  const DeviceInfo dev = device_info(device);
  const Kernels kernels = kernels_from_env();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peg_backward_cuda", [&] {
    constexpr int V = static_cast<int>(16 / sizeof(scalar_t));
    const bool g_vec = vector_ok(grad_out, V) && (!want_x || vector_ok(grad_x, V));
    if (!want_w && !want_b) {  // grad_x alone: the forward kernel with flipped taps
      forward_typed<scalar_t>(grad_out, weight, nullptr, /*flip=*/true, grad_x, H, W, P, g_vec,
                              kernels, dev, stream);
      return;
    }
    backward_typed<scalar_t>(grad_out, x, weight, want_x ? &grad_x : nullptr,
                             want_w ? &grad_w : nullptr, want_b ? &grad_b : nullptr, H, W, P,
                             g_vec && vector_ok(x, V), kernels, device, dev, stream);
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace peg_cuda
}  // namespace cpvt

TORCH_LIBRARY_IMPL(cpvt, CUDA, m) {
  m.impl("peg_forward", &cpvt::peg_cuda::peg_forward_cuda);
  m.impl("peg_backward", &cpvt::peg_cuda::peg_backward_cuda);
}
