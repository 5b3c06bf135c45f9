// The streaming CUDA kernels of csrc/cuda/peg_stream.cuh run on the CPU: their per-thread
// bodies are __host__ __device__, and this test calls them block by block and thread by thread
// as a launch would (the staged taps first, then every thread; the backward's reduction rounds
// after all its threads), with the launcher's geometry. It checks their index arithmetic, strip
// and border handling, prefix copy and partial sums against float64 libtorch and, for Inf and
// NaN, against the cpu backend through the dispatcher. It cannot check what only a GPU shows
// (races, the read-only cache, registers, speed): tests/test_cuda.py does that on a GPU.
#include <ATen/core/dispatch/Dispatcher.h>

#include "cuda/peg_stream.cuh"
#include "emulated.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <string>
#include <vector>

using namespace cpvt::peg_cuda;
using namespace emulated;

namespace {

// `slots` > 0: that many row slots (each block then loops over several rows).
template <typename T, int VEC, int K, int RH>
StreamGeometry geometry(const at::Tensor& x, int64_t H, int64_t W, int64_t P, int64_t slots) {
  StreamGeometry g = plan_stream(x.size(0), x.size(1), x.size(2), H, W, P, VEC, RH);
  if (slots > 0) set_row_slots(g, slots);
  return g;
}

// The forward (fwd) or the input gradient alone, as one launch of peg_stream_forward_kernel
// with its loads PF rows ahead.
template <typename T, int VEC, int K, int RH, int PF = 1>
at::Tensor emulate_forward(const at::Tensor& src, const at::Tensor& w, const at::Tensor* bias,
                           bool fwd, int64_t H, int64_t W, int64_t P, int64_t slots) {
  using A = acc_t<T>;
  at::Tensor out = at::full(src.sizes(), NAN, src.options());
  const StreamGeometry g = geometry<T, VEC, K, RH>(src, H, W, P, slots);
  StreamForwardArgs<T> a{};
  a.src = src.const_data_ptr<T>();
  a.sb = src.stride(0);
  a.st = src.stride(1);
  a.p = params_of<T>(w, fwd ? bias : nullptr);
  a.out = out.mutable_data_ptr<T>();
  a.g = g;
  const int nthreads = g.cv * g.wb;
  std::vector<A> ws(stream_taps_bytes<T>(g, VEC, K) / sizeof(A));
  for (int64_t blk = 0; blk < g.conv_blocks; ++blk) {
    std::fill(ws.begin(), ws.end(), A(NAN));
    for (int tid = 0; tid < nthreads; ++tid) {
      stream_stage_taps<T, VEC, K>(ws.data(), a.p, g, blk, /*flip=*/!fwd, tid, nthreads);
    }
    for (int ty = 0; ty < g.wb; ++ty) {
      for (int tx = 0; tx < g.cv; ++tx) {
        if (fwd) {
          stream_forward_thread<T, VEC, K, RH, true, PF>(a, ws.data(), blk, tx, ty);
        } else {
          stream_forward_thread<T, VEC, K, RH, false, PF>(a, ws.data(), blk, tx, ty);
        }
      }
    }
  }
  const int64_t nprefix = stream_prefix_blocks(g);
  for (int64_t r = 0; r < nprefix; ++r) {
    for (int tid = 0; tid < nthreads; ++tid) {
      stream_copy_prefix<T, VEC>(a.src, a.sb, a.st, a.out, g, r, nprefix, tid, nthreads);
    }
  }
  return out;
}

// The fused backward (grad_x when want_x), then the slot sums of reduce_partials_kernel; the
// loads PF rows ahead.
template <typename T, int VEC, int K, int RH, int PF = 1>
std::vector<at::Tensor> emulate_backward(const at::Tensor& grad, const at::Tensor& x,
                                         const at::Tensor& w, bool want_x, int64_t H, int64_t W,
                                         int64_t P, int64_t slots) {
  using A = acc_t<T>;
  constexpr int KK = K * K;
  const StreamGeometry g = geometry<T, VEC, K, RH>(x, H, W, P, slots);
  const int64_t C = x.size(2);
  const int64_t nslots = int64_t(g.wblocks) * g.row_slots;
  at::Tensor grad_x = at::full(x.sizes(), NAN, x.options());
  at::Tensor partials = at::full({nslots, KK + 1, C}, NAN, x.options().dtype(scalar_type<A>()));
  StreamBackwardArgs<T> a{};
  a.grad = grad.const_data_ptr<T>();
  a.g_sb = grad.stride(0);
  a.g_st = grad.stride(1);
  a.x = x.const_data_ptr<T>();
  a.x_sb = x.stride(0);
  a.x_st = x.stride(1);
  a.p = params_of<T>(w, nullptr);
  a.grad_x = want_x ? grad_x.mutable_data_ptr<T>() : nullptr;
  a.partials = partials.mutable_data_ptr<A>();
  a.g = g;
  const int nthreads = g.cv * g.wb;
  std::vector<A> ws(stream_taps_bytes<T>(g, VEC, K) / sizeof(A));
  std::vector<A> sums(size_t(nthreads) * (KK + 1) * VEC), red(size_t(nthreads) * VEC);
  for (int64_t blk = 0; blk < g.conv_blocks; ++blk) {
    std::fill(ws.begin(), ws.end(), A(NAN));
    if (want_x) {
      for (int tid = 0; tid < nthreads; ++tid) {
        stream_stage_taps<T, VEC, K>(ws.data(), a.p, g, blk, /*flip=*/true, tid, nthreads);
      }
    }
    for (int ty = 0; ty < g.wb; ++ty) {
      for (int tx = 0; tx < g.cv; ++tx) {
        A dw[KK][VEC], db[VEC];
        stream_backward_thread<T, VEC, K, RH, PF>(a, ws.data(), blk, tx, ty, dw, db);
        A* s = sums.data() + size_t(ty * g.cv + tx) * (KK + 1) * VEC;
        for (int t = 0; t <= KK; ++t) {
          for (int e = 0; e < VEC; ++e) s[t * VEC + e] = t < KK ? dw[t][e] : db[e];
        }
      }
    }
    for (int t = 0; t <= KK; ++t) {
      for (int tid = 0; tid < nthreads; ++tid) {
        for (int e = 0; e < VEC; ++e) red[tid * VEC + e] = sums[(size_t(tid) * (KK + 1) + t) * VEC + e];
      }
      for (int tid = 0; tid < nthreads; ++tid) {
        stream_reduce_round<T, VEC, K>(a, red.data(), blk, t, tid, nthreads);
      }
    }
  }
  if (want_x) {
    const int64_t nprefix = stream_prefix_blocks(g);
    for (int64_t r = 0; r < nprefix; ++r) {
      for (int tid = 0; tid < nthreads; ++tid) {
        stream_copy_prefix<T, VEC>(a.grad, a.g_sb, a.g_st, a.grad_x, g, r, nprefix, tid, nthreads);
      }
    }
  }
  // reduce_partials_kernel: the slots in order.
  const at::Tensor total = partials.sum(0, /*keepdim=*/false);  // (KK + 1, C), every slot written
  const at::Tensor gw = total.narrow(0, 0, KK).t().reshape({C, 1, K, K}).to(scalar_type<T>());
  const at::Tensor gb = total.select(0, KK).to(scalar_type<T>());
  return {grad_x, gw, gb, partials};
}

at::Tensor cpu_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t H,
                       int64_t W, int64_t P) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cpvt::peg_forward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, c10::SymInt,
                                         c10::SymInt, int64_t)>();
  return op.call(x, w, b, H, W, P);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_backward(const at::Tensor& g,
                                                            const at::Tensor& x,
                                                            const at::Tensor& w, int64_t H,
                                                            int64_t W, int64_t P) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cpvt::peg_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt,
                           c10::SymInt, int64_t, std::array<bool, 3>)>();
  return op.call(g, x, w, H, W, P, {true, true, true});
}

// Float64 forward and gradients of the PEG (its definition) by libtorch's autograd.
std::vector<at::Tensor> reference(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                  const at::Tensor& g, int64_t H, int64_t W, int64_t P) {
  auto x64 = x.to(at::kDouble).requires_grad_();
  auto w64 = w.to(at::kDouble).requires_grad_();
  auto b64 = b.to(at::kDouble).requires_grad_();
  const int64_t B = x.size(0), C = x.size(2);
  auto grid = x64.narrow(1, P, H * W).transpose(1, 2).reshape({B, C, H, W});
  auto y = at::conv2d(grid, w64, b64, {1, 1}, {w.size(2) / 2, w.size(3) / 2}, {1, 1}, C) + grid;
  auto out = at::cat({x64.narrow(1, 0, P), y.flatten(2).transpose(1, 2)}, 1);
  out.backward(g.to(at::kDouble));
  return {out.detach(), x64.grad(), w64.grad(), b64.grad()};
}

// x with token stride C + pad and batch stride N * (C + pad) + pad2: the strides the kernels
// take, still vector-aligned.
at::Tensor strided(const at::Tensor& t, int64_t pad) {
  if (pad == 0) return t.contiguous();
  const int64_t B = t.size(0), N = t.size(1), C = t.size(2);
  at::Tensor big = at::full({B, N * (C + pad) + pad}, NAN, t.options());
  at::Tensor v = big.as_strided({B, N, C}, {N * (C + pad) + pad, C + pad, 1});
  v.copy_(t);
  return v;
}

struct Case {
  int64_t B, P, H, W, C;
  int64_t pad;    // extra channels of the token stride (0: contiguous)
  int64_t slots;  // row slots (0: one row each)
};

template <typename T, int K>
void run_case(const Case& c) {
  constexpr int VF = StreamVec<T>::kForward, VB = StreamVec<T>::kBackward;
  constexpr int RH = kStreamMaxRows;
  const auto opts = at::TensorOptions().dtype(scalar_type<T>());
  const int64_t N = c.P + c.H * c.W;
  const at::Tensor x = strided(at::randn({c.B, N, c.C}, opts), c.pad);
  const at::Tensor g = strided(at::randn({c.B, N, c.C}, opts), c.pad);
  const at::Tensor w = (at::randn({c.C, 1, K, K}, opts.dtype(at::kDouble)) / K).to(opts.dtype());
  const at::Tensor b = at::randn({c.C}, opts);
  const auto ref = reference(x, w, b, g, c.H, c.W, c.P);
  char name[200];
  std::snprintf(name, sizeof(name), "%s k=%d B=%ld P=%ld %ldx%ld C=%ld pad=%ld slots=%ld",
                c10::toString(scalar_type<T>()), K, long(c.B), long(c.P), long(c.H), long(c.W),
                long(c.C), long(c.pad), long(c.slots));
  const double tol = tolerance<T>();
  auto check = [&](const at::Tensor& got, const at::Tensor& want, const char* what) {
    const double err = rel_err(got, want);
    expect(err < tol, std::string(name) + " " + what + ": error " + std::to_string(err));
  };
  check(emulate_forward<T, VF, K, RH>(x, w, &b, true, c.H, c.W, c.P, c.slots), ref[0], "forward");
  check(emulate_forward<T, VF, K, RH>(g, w, nullptr, false, c.H, c.W, c.P, c.slots), ref[1],
        "grad_x alone");
  // The deeper prefetch that bench/cuda_micro times: the same rows through a ring of buffers.
  check(emulate_forward<T, VF, K, RH, 3>(x, w, &b, true, c.H, c.W, c.P, c.slots), ref[0],
        "forward, loads 3 rows ahead");
  check(emulate_forward<T, VF, K, RH, 2>(g, w, nullptr, false, c.H, c.W, c.P, c.slots), ref[1],
        "grad_x alone, loads 2 rows ahead");
  {  // loads 3 rows ahead
    const auto r = emulate_backward<T, VB, K, RH, 3>(g, x, w, true, c.H, c.W, c.P, c.slots);
    check(r[0], ref[1], "backward grad_x, loads 3 rows ahead");
    check(r[1], ref[2], "backward grad_weight, loads 3 rows ahead");
    check(r[2], ref[3], "backward grad_bias, loads 3 rows ahead");
  }
  for (bool want_x : {true, false}) {
    const auto r = emulate_backward<T, VB, K, RH>(g, x, w, want_x, c.H, c.W, c.P, c.slots);
    if (want_x) check(r[0], ref[1], "backward grad_x");
    check(r[1], ref[2], want_x ? "backward grad_weight" : "backward (no grad_x) grad_weight");
    check(r[2], ref[3], want_x ? "backward grad_bias" : "backward (no grad_x) grad_bias");
    expect(!r[3].isnan().any().template item<bool>(), std::string(name) + ": every partial written");
  }
}

// Inf and NaN in the weight, x and grad_out: the same NaN and Inf positions as the cpu backend.
template <typename T, int K>
void run_nonfinite(const Case& c) {
  constexpr int VF = StreamVec<T>::kForward, VB = StreamVec<T>::kBackward;
  constexpr int RH = kStreamMaxRows;
  const auto opts = at::TensorOptions().dtype(scalar_type<T>());
  const int64_t N = c.P + c.H * c.W;
  for (int which = 0; which < 3; ++which) {
    at::Tensor x = at::randn({c.B, N, c.C}, opts), g = at::randn({c.B, N, c.C}, opts);
    at::Tensor w = at::randn({c.C, 1, K, K}, opts), b = at::randn({c.C}, opts);
    const char* what = which == 0 ? "Inf weight" : which == 1 ? "Inf/NaN in x" : "Inf/NaN in grad_out";
    if (which == 0) {
      w.index_put_({1, 0, 0, 0}, INFINITY);
      w.index_put_({2, 0, K - 1, K / 2}, NAN);
    } else {
      at::Tensor t = which == 1 ? x : g;
      t.index_put_({0, c.P + 1, 2}, INFINITY);
      t.index_put_({c.B - 1, N - 1, 0}, NAN);
    }
    const at::Tensor out = cpu_forward(x, w, b, c.H, c.W, c.P);
    const auto [gx, gw, gb] = cpu_backward(g, x, w, c.H, c.W, c.P);
    char name[200];
    std::snprintf(name, sizeof(name), "%s k=%d %s", c10::toString(scalar_type<T>()), K, what);
    const double tol = tolerance<T>() * 4;  // the cpu backend's rounding differs a little
    auto check = [&](const at::Tensor& got, const at::Tensor& want, const char* part) {
      const double err = rel_err(got, want);
      expect(err < tol, std::string(name) + " " + part + ": error " + std::to_string(err) +
                            " (NaN: the non-finite positions differ)");
    };
    check(emulate_forward<T, VF, K, RH>(x, w, &b, true, c.H, c.W, c.P, c.slots), out, "forward");
    check(emulate_forward<T, VF, K, RH>(g, w, nullptr, false, c.H, c.W, c.P, c.slots), gx,
          "grad_x alone");
    const auto r = emulate_backward<T, VB, K, RH>(g, x, w, true, c.H, c.W, c.P, c.slots);
    check(r[0], gx, "backward grad_x");
    check(r[1], gw, "backward grad_weight");
    check(r[2], gb, "backward grad_bias");
  }
}

template <typename T>
void run_dtype() {
  constexpr int VF = StreamVec<T>::kForward;
  const Case cases[] = {
      {2, 1, 14, 14, 12 * VF, 0, 0},   // two strips of 7 rows, one chunk
      {2, 0, 17, 5, 40 * VF, 0, 0},    // three strips (6, 6, 5), two channel chunks
      {3, 2, 9, 6, 8 * VF, VF, 2},     // strided tokens, P=2, 2 row slots for 6 rows
      {1, 1, 1, 1, 2 * VF, 0, 0},      // a 1x1 grid
      {1, 1, 2, 300, VF, 0, 1},        // one or two vectors per token: pixel blocks across a row
      {2, 1, 24, 3, 4 * VF, 0, 5},     // three strips of 8, rows dealt to 5 slots
  };
  for (const Case& c : cases) {
    run_case<T, 3>(c);
    run_case<T, 1>(c);
  }
  run_nonfinite<T, 3>({2, 1, 6, 5, 4 * VF, 0, 0});
}

}  // namespace

int main() {
  at::manual_seed(0);
  run_dtype<float>();
  run_dtype<double>();
  run_dtype<c10::BFloat16>();
  run_dtype<c10::Half>();
  std::printf("streaming CUDA kernels, emulated on the CPU: %d passed, %d failed\n",
              checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
