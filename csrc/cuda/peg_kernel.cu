// CUDA backend of the fused PEG: dtype, alignment and kernel-size dispatch, launches and
// registration. The kernels and their tiling live in peg_kernel.cuh.
//
// Only light headers here (no <torch/extension.h>, no ATen/cuda/CUDAContext.h) to keep nvcc
// fast; the op schemas are declared in peg.cpp.
#include "../peg.h"
#include "peg_kernel.cuh"

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
#include <limits>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>

namespace cpvt {
namespace peg_cuda {
namespace {

struct DeviceInfo {
  int sms;
  int64_t smem_optin;  // largest dynamic shared memory a block may opt in to
};

DeviceInfo device_info(int index) {
  static std::mutex mu;
  static std::unordered_map<int, DeviceInfo> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(index);
  if (it != cache.end()) return it->second;
  int sms = 0, optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, index));
  return cache.emplace(index, DeviceInfo{sms, optin}).first->second;
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

void check_grid(int64_t H, int64_t W) {
  constexpr int64_t kMax = int64_t(1) << 30;
  TORCH_CHECK(H < kMax && W < kMax, "fused_peg (cuda): size (H, W) must be below 2^30 each, got (",
              H, ", ", W, ")");
}

template <typename T>
Params<T> params_of(const at::Tensor& weight, const at::Tensor* bias) {
  Params<T> p{};
  p.weight = weight.const_data_ptr<T>();
  p.w_sc = weight.stride(0);
  p.w_si = weight.stride(2);
  p.w_sj = weight.stride(3);
  p.bias = bias != nullptr ? bias->const_data_ptr<T>() : nullptr;
  p.b_s = bias != nullptr ? bias->stride(0) : 0;
  return p;
}

int64_t checked_grid(const LaunchPlan& plan) {
  const int64_t grid = plan.conv_blocks + plan.prefix_blocks;
  TORCH_CHECK(grid >= 1 && grid <= std::numeric_limits<int32_t>::max(),
              "fused_peg (cuda): the input needs ", grid,
              " thread blocks, more than one launch allows");
  return grid;
}

template <int N>
using Int = std::integral_constant<int, N>;

// Calls f(Int<K>) with K = kh for the unrolled kernels (square 1, 3, 5 and 7 on the vector
// path) and K = 0, the general kernel with a runtime size up to 31, otherwise.
template <int VEC, typename F>
void with_kernel_size(int kh, int kw, F&& f) {
  if constexpr (VEC > 1) {
    if (kh == kw) {
      switch (kh) {
        case 1: return f(Int<1>{});
        case 3: return f(Int<3>{});
        case 5: return f(Int<5>{});
        case 7: return f(Int<7>{});
        default: break;
      }
    }
  }
  f(Int<0>{});
}

// ---------------------------------------------------------------------------------------------
// Forward, and grad_x alone (flipped taps over grad_out, no bias).

template <typename T, int VEC, int KH, int KW, int RW>
void launch_forward(const at::Tensor& src, const Params<T>& p, bool flip, at::Tensor& out,
                    int64_t H, int64_t W, int64_t P, int kh, int kw, const DeviceInfo& dev,
                    cudaStream_t stream) {
  LaunchPlan plan;
  TORCH_CHECK(plan_forward(plan, src.size(0), src.size(1), src.size(2), H, W, P, kh, kw, VEC,
                           sizeof(T), sizeof(acc_t<T>), RW, dev.sms),
              "fused_peg (cuda): no tiling fits in shared memory for kernel size (", kh, ", ", kw,
              ")");
  ForwardArgs<T> a{};
  a.src = src.const_data_ptr<T>();
  a.sb = src.stride(0);
  a.st = src.stride(1);
  a.p = p;
  a.flip = flip;
  a.out = out.mutable_data_ptr<T>();
  a.g = plan.g;
  a.conv_blocks = plan.conv_blocks;
  a.ws_bytes = plan.ws_bytes;
  const int64_t grid = checked_grid(plan);
  peg_forward_kernel<T, VEC, KH, KW, RW>
      <<<static_cast<unsigned>(grid), plan.threads, plan.smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_forward(const at::Tensor& src, const Params<T>& p, bool flip, at::Tensor& out,
                 int64_t H, int64_t W, int64_t P, int kh, int kw, bool vec,
                 const DeviceInfo& dev, cudaStream_t stream) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  auto launch = [&](auto vec_c, auto k_c) {
    constexpr int VEC = decltype(vec_c)::value, K = decltype(k_c)::value;
    constexpr int RW = K == 1 ? 1 : K == 3 ? 2 : 4;  // output pixels per thread
    launch_forward<T, VEC, K, K, RW>(src, p, flip, out, H, W, P, kh, kw, dev, stream);
  };
  if (vec) {
    with_kernel_size<V>(kh, kw, [&](auto k) { launch(Int<V>{}, k); });
  } else {
    with_kernel_size<1>(kh, kw, [&](auto k) { launch(Int<1>{}, k); });
  }
}

// ---------------------------------------------------------------------------------------------
// Backward with the weight and bias gradients (grad_x fused in when wanted).

template <typename T, int VEC, int KH, int KW, int RW>
void launch_backward(const at::Tensor& grad, const at::Tensor& x, const Params<T>& p,
                     T* grad_x, T* grad_w, T* grad_b, int64_t H, int64_t W, int64_t P, int kh,
                     int kw, int device, const DeviceInfo& dev, cudaStream_t stream) {
  using A = acc_t<T>;
  // Tap columns per weight-gradient lane: the sums and the x window take 2 * JW * VEC registers.
  constexpr int JW = KW > 0 ? (KW * VEC <= 28 ? KW : 3) : 4;
  auto kernel = peg_backward_kernel<T, VEC, KH, KW, RW, JW>;
  const int64_t C = x.size(2);
  const int64_t budget = std::min<int64_t>(kBackwardSmemBudget, dev.smem_optin - 64);
  LaunchPlan plan;
  TORCH_CHECK(plan_backward(plan, x.size(0), x.size(1), C, H, W, P, kh, kw, VEC, sizeof(T),
                            sizeof(A), JW, budget),
              "fused_peg (cuda): no tiling fits in shared memory for kernel size (", kh, ", ", kw,
              ")");
  // Once per device: allow any plan's shared memory (plans never exceed `budget`). Then the
  // resident blocks per multiprocessor for this plan's shared memory, cached by size.
  int per_sm = 0;
  {
    static std::mutex mu;
    static std::unordered_set<int> opted_in;           // devices
    static std::unordered_map<int64_t, int> resident;  // (device, smem) -> blocks per SM
    const std::lock_guard<std::mutex> lock(mu);
    if (budget > 48 * 1024 && opted_in.count(device) == 0) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(budget)));
      opted_in.insert(device);
    }
    const int64_t key = (int64_t(device) << 32) | plan.smem;
    const auto it = resident.find(key);
    if (it != resident.end()) {
      per_sm = it->second;
    } else {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &per_sm, kernel, plan.threads, static_cast<size_t>(plan.smem)));
      resident.emplace(key, per_sm);
    }
  }
  finish_backward(plan, per_sm, dev.sms, grad_x != nullptr);
  const int kk = kh * kw;
  const at::Tensor partials = at::empty({plan.slots, kk + 1, C},
                                        x.options().dtype(c10::CppTypeToScalarType<A>::value));
  BackwardArgs<T> a{};
  a.grad = grad.const_data_ptr<T>();
  a.g_sb = grad.stride(0);
  a.g_st = grad.stride(1);
  a.x = x.const_data_ptr<T>();
  a.x_sb = x.stride(0);
  a.x_st = x.stride(1);
  a.p = p;  // no bias: grad_x has none
  a.grad_x = grad_x;
  a.partials = partials.mutable_data_ptr<A>();
  a.g = plan.g;
  a.conv_blocks = plan.conv_blocks;
  a.slots = plan.slots;
  a.tiles_total = plan.tiles_total;
  a.ws_bytes = plan.ws_bytes;
  a.tile_bytes = plan.tile_bytes;
  a.lanes = plan.lanes;
  a.groups = plan.groups;
  a.seg_w = plan.seg_w;
  const int64_t grid = checked_grid(plan);
  kernel<<<static_cast<unsigned>(grid), plan.threads, plan.smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t cblocks = (C + 31) / 32;
  const int64_t rgrid = (kk + 1) * cblocks;
  TORCH_CHECK(rgrid <= std::numeric_limits<int32_t>::max(),
              "fused_peg (cuda): too many channels for the weight-gradient reduction: ", C);
  reduce_partials_kernel<T><<<static_cast<unsigned>(rgrid), 256, 0, stream>>>(
      partials.const_data_ptr<A>(), plan.slots, kk, C, cblocks, grad_w, grad_b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const int kh = static_cast<int>(weight.size(2)), kw = static_cast<int>(weight.size(3));
  const DeviceInfo dev = device_info(x.get_device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peg_forward_cuda", [&] {
    constexpr int V = static_cast<int>(16 / sizeof(scalar_t));
    const Params<scalar_t> p = params_of<scalar_t>(weight, has_bias ? &*bias : nullptr);
    const bool vec = vector_ok(x, V) && vector_ok(out, V);
    run_forward<scalar_t>(x, p, /*flip=*/false, out, H, W, P, kh, kw, vec, dev, stream);
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
  const at::Tensor empty = at::empty({0}, x.options());
  at::Tensor grad_x = want_x ? at::empty({B, N, C}, x.options()) : empty;
  at::Tensor grad_w = empty, grad_b = empty;
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
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peg_backward_cuda", [&] {
    using T = scalar_t;
    constexpr int V = static_cast<int>(16 / sizeof(T));
    const Params<T> p = params_of<T>(weight, nullptr);
    const bool g_vec = vector_ok(grad_out, V) && (!want_x || vector_ok(grad_x, V));
    if (!want_w && !want_b) {  // grad_x alone: the forward kernel with flipped taps
      run_forward<T>(grad_out, p, /*flip=*/true, grad_x, H, W, P, kh, kw, g_vec, dev, stream);
      return;
    }
    const bool vec = g_vec && vector_ok(x, V);
    T* gx = want_x ? grad_x.mutable_data_ptr<T>() : nullptr;
    T* gw = want_w ? grad_w.mutable_data_ptr<T>() : nullptr;
    T* gb = want_b ? grad_b.mutable_data_ptr<T>() : nullptr;
    auto launch = [&](auto vec_c, auto k_c) {
      constexpr int VEC = decltype(vec_c)::value, K = decltype(k_c)::value;
      constexpr int RW = K == 1 ? 1 : 2;  // fewer registers: the weight sums stay live
      launch_backward<T, VEC, K, K, RW>(grad_out, x, p, gx, gw, gb, H, W, P, kh, kw, device, dev,
                                        stream);
    };
    if (vec) {
      with_kernel_size<V>(kh, kw, [&](auto k) { launch(Int<V>{}, k); });
    } else {
      with_kernel_size<1>(kh, kw, [&](auto k) { launch(Int<1>{}, k); });
    }
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
