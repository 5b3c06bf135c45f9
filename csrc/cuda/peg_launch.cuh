// Launches of the CUDA kernels for one dtype: the choice between the tiled, the streaming and
// the cp.async (CPVT_CUDA_KERNELS=pipe) kernels, kernel-size and alignment dispatch, launch
// plans, shared-memory opt-in and the weight-gradient reduction. Included by the per-dtype
// translation units (peg_<dtype>.cu) only; each instantiates forward_typed and backward_typed
// for its dtype with CPVT_PEG_CUDA_INSTANTIATE.
#pragma once

#include "peg_kernel.cuh"
#include "peg_pipe.cuh"
#include "peg_stream.cuh"
#include "peg_typed.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>
#include <utility>

namespace cpvt {
namespace peg_cuda {
namespace launch_detail {

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

inline int64_t checked_grid(const LaunchPlan& plan) {
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
// Shared by the backward launches, the persistent streaming forward and the cp.async kernels.

// Resident blocks per multiprocessor of `kernel` at `threads` and `smem`, cached per
// (kernel, device, threads, smem); after opting the kernel in, once per device, to `optin`
// bytes of dynamic shared memory when that is over the default 48 KiB.
template <typename K>
int resident_blocks(K* kernel, int device, int threads, int64_t smem, int64_t optin) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> opted_in;                 // (kernel, device)
  static std::map<std::tuple<const void*, int, int, int64_t>, int> resident;
  const void* id = reinterpret_cast<const void*>(kernel);
  const std::lock_guard<std::mutex> lock(mu);
  if (optin > 48 * 1024 && opted_in.count({id, device}) == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(optin)));
    opted_in.insert({id, device});
  }
  const auto key = std::make_tuple(id, device, threads, smem);
  const auto it = resident.find(key);
  if (it != resident.end()) return it->second;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads,
                                                               static_cast<size_t>(smem)));
  resident.emplace(key, per_sm);
  return per_sm;
}

// The fields the streaming and cp.async forwards' arguments share.
template <typename T, typename Args>
void set_forward_io(Args& a, const at::Tensor& src, const Params<T>& p, at::Tensor& out) {
  a.src = src.const_data_ptr<T>();
  a.sb = src.stride(0);
  a.st = src.stride(1);
  a.p = p;
  a.out = out.mutable_data_ptr<T>();
}

// The fields the backward kernels' arguments share.
template <typename T, typename Args>
void set_backward_io(Args& a, const at::Tensor& grad, const at::Tensor& x, const Params<T>& p,
                     T* grad_x, acc_t<T>* partials) {
  a.grad = grad.const_data_ptr<T>();
  a.g_sb = grad.stride(0);
  a.g_st = grad.stride(1);
  a.x = x.const_data_ptr<T>();
  a.x_sb = x.stride(0);
  a.x_st = x.stride(1);
  a.p = p;  // no bias: grad_x has none
  a.grad_x = grad_x;
  a.partials = partials;
}

// grad_weight and grad_bias (each may be nullptr) from `slots` rows of partials.
template <typename T>
void reduce_partials(const at::Tensor& partials, int64_t slots, int kk, int64_t C, T* grad_w,
                     T* grad_b, cudaStream_t stream) {
  const int64_t cblocks = (C + 31) / 32;
  const int64_t rgrid = (kk + 1) * cblocks;
  TORCH_CHECK(rgrid <= std::numeric_limits<int32_t>::max(),
              "fused_peg (cuda): too many channels for the weight-gradient reduction: ", C);
  reduce_partials_kernel<T><<<static_cast<unsigned>(rgrid), 256, 0, stream>>>(
      partials.const_data_ptr<acc_t<T>>(), slots, kk, C, cblocks, grad_w, grad_b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  // Any plan's shared memory allowed (plans never exceed `budget`).
  const int per_sm = resident_blocks(kernel, device, plan.threads, plan.smem, budget);
  finish_backward(plan, per_sm, dev.sms, grad_x != nullptr);
  const int kk = kh * kw;
  const at::Tensor partials = at::empty({plan.slots, kk + 1, C},
                                        x.options().dtype(c10::CppTypeToScalarType<A>::value));
  BackwardArgs<T> a{};
  set_backward_io<T>(a, grad, x, p, grad_x, partials.mutable_data_ptr<A>());
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
  reduce_partials<T>(partials, plan.slots, kk, C, grad_w, grad_b, stream);
}


// ---------------------------------------------------------------------------------------------
// The streaming kernels (peg_stream.cuh): square kernels of size 1 and 3 on the vector path.

inline bool stream_fits(int kh, int kw, bool vec) { return vec && kh == kw && (kh == 1 || kh == 3); }

// The streaming geometry, or false when its rows or grid would not fit its index types.
inline bool plan_stream_launch(StreamGeometry& g, int64_t B, int64_t N, int64_t C, int64_t H,
                               int64_t W, int64_t P, int vec) {
  g = plan_stream(B, N, C, H, W, P, vec, kStreamMaxRows);
  const int64_t strips = ceil_div(H, g.rh);
  return B * strips < (int64_t(1) << 30) && g.conv_blocks + stream_prefix_blocks(g) <
                                                   std::numeric_limits<int32_t>::max();
}

template <typename T, int K, bool FWD>
bool launch_stream_forward(const at::Tensor& src, const Params<T>& p, at::Tensor& out, int64_t H,
                           int64_t W, int64_t P, const DeviceInfo& dev, cudaStream_t stream) {
  constexpr int VEC = StreamVec<T>::kForward;
  auto kernel = peg_stream_forward_kernel<T, VEC, K, kStreamMaxRows, FWD>;
  StreamGeometry g;
  if (!plan_stream_launch(g, src.size(0), src.size(1), src.size(2), H, W, P, VEC)) return false;
  const int64_t smem = stream_forward_smem<T>(g, VEC, K);
  // Persistent: one wave of resident blocks, each looping over its share of the rows. On an H100
  // this ran 1.16-1.5x faster than a block per row (bench/results/2026-12-05_nvidia-h100).
  const int per_sm = resident_blocks(kernel, dev.index, g.cv * g.wb, smem, 0);
  set_row_slots(g, std::max<int64_t>(1, int64_t(per_sm) * dev.sms) /
                       (int64_t(g.chunks) * g.wblocks));
  StreamForwardArgs<T> a{};
  set_forward_io<T>(a, src, p, out);
  a.g = g;
  const int64_t grid = g.conv_blocks + stream_prefix_blocks(g);
  kernel<<<static_cast<unsigned>(grid), dim3(g.cv, g.wb), smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T, int K>
bool launch_stream_backward(const at::Tensor& grad, const at::Tensor& x, const Params<T>& p,
                            T* grad_x, T* grad_w, T* grad_b, int64_t H, int64_t W, int64_t P,
                            int device, const DeviceInfo& dev, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int VEC = StreamVec<T>::kBackward, KK = K * K;
  auto kernel = peg_stream_backward_kernel<T, VEC, K, kStreamMaxRows>;
  const int64_t C = x.size(2);
  StreamGeometry g;
  if (!plan_stream_launch(g, x.size(0), x.size(1), C, H, W, P, VEC)) return false;
  const int64_t smem = stream_backward_smem<T>(g, VEC, K);  // at most 20 KiB
  // One wave of resident blocks, each looping over its share of the rows: as few partial sums
  // as keep every multiprocessor busy.
  const int per_sm = resident_blocks(kernel, device, g.cv * g.wb, smem, 0);
  set_row_slots(g, std::max<int64_t>(1, int64_t(per_sm) * dev.sms) /
                       (int64_t(g.chunks) * g.wblocks));
  const int64_t slots = int64_t(g.wblocks) * g.row_slots;
  const at::Tensor partials = at::empty({slots, KK + 1, C},
                                        x.options().dtype(c10::CppTypeToScalarType<A>::value));
  StreamBackwardArgs<T> a{};
  set_backward_io<T>(a, grad, x, p, grad_x, partials.mutable_data_ptr<A>());
  a.g = g;
  const int64_t grid = g.conv_blocks + (grad_x != nullptr ? stream_prefix_blocks(g) : 0);
  kernel<<<static_cast<unsigned>(grid), dim3(g.cv, g.wb), smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reduce_partials<T>(partials, slots, KK, C, grad_w, grad_b, stream);
  return true;
}

// ---------------------------------------------------------------------------------------------
// The cp.async forward (peg_pipe.cuh), under CPVT_CUDA_KERNELS=pipe only: the 3x3 forward on the
// vector path of 16-bit and float32 tokens, 4 channels a thread, 6 row buffers (up to 5 rows in
// flight a block). False where it does not apply or fit; the caller then takes the streaming
// kernels.
constexpr int kPipeVec = 4, kPipeRows = 6;

// The shape fields both cp.async kernels' arguments share, for tokens like t.
template <typename Args>
void set_pipe_shape(Args& a, const at::Tensor& t, int64_t H, int64_t W, int64_t P, int CH) {
  a.B = t.size(0);
  a.N = t.size(1);
  a.C = t.size(2);
  a.P = P;
  a.H = static_cast<int>(H);
  a.W = static_cast<int>(W);
  a.CH = CH;
  a.chunks = static_cast<int>(t.size(2) / CH);
}

// Whether `items` dealt to `grid` blocks, `steps` positions each, fit the int counts of the
// kernels (and a launch).
inline bool pipe_counts_fit(int64_t items, int64_t grid, int64_t steps) {
  return items < (int64_t(1) << 31) && ceil_div(items, grid) * steps < (int64_t(1) << 31);
}

template <typename T>
bool launch_pipe_forward(const at::Tensor& src, const Params<T>& p, at::Tensor& out, int64_t H,
                         int64_t W, int64_t P, const DeviceInfo& dev, cudaStream_t stream) {
  if constexpr (sizeof(T) > 4) {
    return false;  // a thread's 4 channels would be more than one 16-byte piece
  } else {
    using namespace peg_pipe;
    const int64_t B = src.size(0), C = src.size(2);
    const int CH = pipe_channels(C, W, sizeof(T), kPipeVec, 1);
    if (CH == 0) return false;
    auto kernel = peg_pipe_forward_kernel<T, kPipeVec, kPipeRows>;
    const int threads = static_cast<int>(W) * (CH / kPipeVec);
    const int64_t smem = pipe_smem<T>(kPipeRows, static_cast<int>(W), CH);  // at most 36 KiB
    const int per_sm = resident_blocks(kernel, dev.index, threads, smem, 0);
    const int64_t items = B * (C / CH);
    // Persistent: one wave of resident blocks, each taking every grid-th item.
    const int64_t grid = std::min<int64_t>(items, int64_t(std::max(per_sm, 1)) * dev.sms);
    if (per_sm < 1 || !pipe_counts_fit(items, grid, H + 2)) return false;
    PipeArgs<T> a{};
    set_forward_io<T>(a, src, p, out);
    set_pipe_shape(a, src, H, W, P, CH);
    kernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
}

// The cp.async backward (peg_pipe.cuh), under CPVT_CUDA_KERNELS=pipe only: the 3x3 backward
// with the weight gradient on the vector path of 16-bit tokens, 4 channels a thread, 6 row
// buffers of grad_out and of x (up to 4 rows of each in flight a block). A block keeps one chunk
// of channels (the grid is a multiple of the chunks) and its weight and bias sums over its items
// in registers, and writes them to its slot of partials; reduce_partials adds the slots in
// order. False where it does not apply or fit; the caller then takes the streaming kernels.
template <typename T>
bool launch_pipe_backward(const at::Tensor& grad, const at::Tensor& x, const Params<T>& p,
                          T* grad_x, T* grad_w, T* grad_b, int64_t H, int64_t W, int64_t P,
                          int device, const DeviceInfo& dev, cudaStream_t stream) {
  if constexpr (sizeof(T) != 2) {
    return false;  // float32 asks for more registers than two blocks an SM allow
  } else {
    using namespace peg_pipe;
    using A = acc_t<T>;
    const int64_t B = x.size(0), C = x.size(2);
    const int CH = pipe_channels(C, W, sizeof(T), kPipeVec, 1);
    if (CH == 0) return false;
    // Two kernels: with grad_x, or the sums alone.
    auto kernel = grad_x != nullptr ? peg_pipe_backward_kernel<T, kPipeVec, kPipeRows, true>
                                    : peg_pipe_backward_kernel<T, kPipeVec, kPipeRows, false>;
    const int threads = static_cast<int>(W) * (CH / kPipeVec);
    // Both rings; the reduction at the end reuses them for W x CH sums.
    const int64_t smem = 2 * pipe_smem<T>(kPipeRows, static_cast<int>(W), CH);  // < 48 KiB
    const int per_sm = resident_blocks(kernel, device, threads, smem, 0);
    const int64_t chunks = C / CH, items = B * chunks;
    const int64_t grid = std::max<int64_t>(
        chunks, std::min<int64_t>(items, int64_t(std::max(per_sm, 1)) * dev.sms) / chunks * chunks);
    if (per_sm < 1 || !pipe_counts_fit(items, grid, H + 3)) return false;
    const int64_t slots = grid / chunks;
    const at::Tensor partials = at::empty({slots, 10, C},
                                          x.options().dtype(c10::CppTypeToScalarType<A>::value));
    PipeBackwardArgs<T> a{};
    set_backward_io<T>(a, grad, x, p, grad_x, partials.mutable_data_ptr<A>());
    set_pipe_shape(a, x, H, W, P, CH);
    kernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reduce_partials<T>(partials, slots, 9, C, grad_w, grad_b, stream);
    return true;
  }
}

}  // namespace launch_detail

template <typename T>
void forward_typed(const at::Tensor& src, const at::Tensor& weight, const at::Tensor* bias,
                   bool flip, at::Tensor& out, int64_t H, int64_t W, int64_t P, bool vec,
                   Kernels kernels, const DeviceInfo& dev, cudaStream_t stream) {
  using namespace launch_detail;
  const int kh = static_cast<int>(weight.size(2)), kw = static_cast<int>(weight.size(3));
  const Params<T> p = params_of<T>(weight, flip ? nullptr : bias);
  if (kernels == Kernels::kPipe && !flip && kh == 3 && kw == 3 && vec &&
      launch_pipe_forward<T>(src, p, out, H, W, P, dev, stream)) {
    return;
  }
  if (kernels != Kernels::kTile && stream_fits(kh, kw, vec)) {
    const bool done =
        kh == 1 ? (flip ? launch_stream_forward<T, 1, false>(src, p, out, H, W, P, dev, stream)
                        : launch_stream_forward<T, 1, true>(src, p, out, H, W, P, dev, stream))
                : (flip ? launch_stream_forward<T, 3, false>(src, p, out, H, W, P, dev, stream)
                        : launch_stream_forward<T, 3, true>(src, p, out, H, W, P, dev, stream));
    if (done) return;
  }
  run_forward<T>(src, p, flip, out, H, W, P, kh, kw, vec, dev, stream);
}

template <typename T>
void backward_typed(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                    at::Tensor* grad_x, at::Tensor* grad_w, at::Tensor* grad_b, int64_t H,
                    int64_t W, int64_t P, bool vec, Kernels kernels, int device,
                    const DeviceInfo& dev, cudaStream_t stream) {
  using launch_detail::Int;
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const int kh = static_cast<int>(weight.size(2)), kw = static_cast<int>(weight.size(3));
  const Params<T> p = launch_detail::params_of<T>(weight, nullptr);
  T* gx = grad_x != nullptr ? grad_x->mutable_data_ptr<T>() : nullptr;
  T* gw = grad_w != nullptr ? grad_w->mutable_data_ptr<T>() : nullptr;
  T* gb = grad_b != nullptr ? grad_b->mutable_data_ptr<T>() : nullptr;
  // kAuto: the streaming backward ran at 0.99-1.17x the tiled one's speed on bfloat16 and 0.77x
  // on float32 (H100, bench/results/2026-12-05_nvidia-h100).
  if (kernels == Kernels::kPipe && kh == 3 && kw == 3 && vec &&
      launch_detail::launch_pipe_backward<T>(grad, x, p, gx, gw, gb, H, W, P, device, dev,
                                             stream)) {
    return;
  }
  const bool stream_family = kernels == Kernels::kStream || kernels == Kernels::kPipe ||
                             (kernels == Kernels::kAuto && sizeof(T) == 2);
  if (stream_family && launch_detail::stream_fits(kh, kw, vec)) {
    const bool done =
        kh == 1 ? launch_detail::launch_stream_backward<T, 1>(grad, x, p, gx, gw, gb, H, W, P,
                                                              device, dev, stream)
                : launch_detail::launch_stream_backward<T, 3>(grad, x, p, gx, gw, gb, H, W, P,
                                                              device, dev, stream);
    if (done) return;
  }
  auto launch = [&](auto vec_c, auto k_c) {
    constexpr int VEC = decltype(vec_c)::value, K = decltype(k_c)::value;
    constexpr int RW = K == 1 ? 1 : 2;  // fewer registers: the weight sums stay live
    launch_detail::launch_backward<T, VEC, K, K, RW>(grad, x, p, gx, gw, gb, H, W, P, kh, kw,
                                                     device, dev, stream);
  };
  if (vec) {
    launch_detail::with_kernel_size<V>(kh, kw, [&](auto k) { launch(Int<V>{}, k); });
  } else {
    launch_detail::with_kernel_size<1>(kh, kw, [&](auto k) { launch(Int<1>{}, k); });
  }
}

#define CPVT_PEG_CUDA_INSTANTIATE(T)                                                           \
  template void forward_typed<T>(const at::Tensor&, const at::Tensor&, const at::Tensor*, bool, \
                                 at::Tensor&, int64_t, int64_t, int64_t, bool, Kernels,        \
                                 const DeviceInfo&, cudaStream_t);                             \
  template void backward_typed<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&,      \
                                  at::Tensor*, at::Tensor*, at::Tensor*, int64_t, int64_t,     \
                                  int64_t, bool, Kernels, int, const DeviceInfo&, cudaStream_t);

}  // namespace peg_cuda
}  // namespace cpvt
