// The experimental cp.async kernels of csrc/cuda/peg_pipe.cuh run on the CPU: their
// per-thread code (PipeForwardThread, PipeBackwardThread) is __host__ __device__, and this test
// drives it block by block as the kernels do, every thread in turn at each stage (the copies
// land at once, so a refill of a buffer still to be read shows). It checks the stream of items
// and rows, the zero rows and columns, the prefix tokens, the output mapping and the backward's
// sums against float64 libtorch, over strided inputs and several grids, with Inf and NaN too.
// What only a GPU shows (the copies landing late, barriers, speed) is bench/cuda_micro's to
// measure.
#include "cuda/peg_pipe.cuh"
#include "emulated.h"

#include <c10/util/BFloat16.h>

#include <cstdio>
#include <string>
#include <vector>

using namespace cpvt::peg_pipe;
using cpvt::peg_cuda::acc_t;
using namespace emulated;

namespace {

// (B, P + H*W, C) tokens whose token stride is C + 8: a slice of a wider tensor.
at::Tensor strided_tokens(int64_t B, int64_t N, int64_t C, at::ScalarType dt) {
  return at::randn({B, N, C + 8}, at::kDouble).to(dt).narrow(2, 0, C);
}

// The fused PEG in float64 with autograd: out, and (grad_x, grad_w, grad_b) of out * g.
std::vector<at::Tensor> reference(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                  const at::Tensor& g, int64_t H, int64_t W, int64_t P) {
  const int64_t B = x.size(0), C = x.size(2);
  auto x64 = x.to(at::kDouble).detach().requires_grad_(true);
  auto w64 = w.to(at::kDouble).detach().requires_grad_(true);
  auto b64 = b.to(at::kDouble).detach().requires_grad_(true);
  const auto grid = x64.narrow(1, P, H * W).reshape({B, H, W, C}).permute({0, 3, 1, 2});
  const auto y = at::conv2d(grid, w64, b64, 1, 1, 1, C) + grid;
  const auto out = at::cat({x64.narrow(1, 0, P), y.permute({0, 2, 3, 1}).reshape({B, H * W, C})},
                           1);
  (out * g.to(at::kDouble)).sum().backward();
  return {out.detach(), x64.grad(), w64.grad(), b64.grad()};
}

// One block's stream, as the kernels run it: every thread in turn at each stage (zero tokens,
// the prologue of `ahead` positions, then each position: begin at a new item, issue, step).
template <typename Thread, typename Args>
void run_block(std::vector<Thread>& th, const Args& a, int ahead) {
  for (auto& t : th) t.zero_pads(a);
  for (int k = 0; k < ahead; ++k) {
    for (auto& t : th) t.issue(a);
  }
  while (th[0].q < th[0].positions) {
    for (auto& t : th) {
      if (t.ri == -1) t.begin(a);
    }
    for (auto& t : th) t.issue(a);
    for (auto& t : th) t.step(a);
  }
}

template <typename T, int CV, int NS, int CW>
at::Tensor emulate_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                           int64_t H, int64_t W, int64_t P, int CH, int grid) {
  at::Tensor out = at::full({x.size(0), x.size(1), x.size(2)}, NAN, x.options());
  PipeArgs<T> a{};
  a.src = x.const_data_ptr<T>();
  a.sb = x.stride(0);
  a.st = x.stride(1);
  a.p = params_of<T>(w, &b);
  a.out = out.mutable_data_ptr<T>();
  a.B = x.size(0); a.N = x.size(1); a.C = x.size(2); a.P = P;
  a.H = static_cast<int>(H); a.W = static_cast<int>(W);
  a.CH = CH; a.chunks = static_cast<int>(a.C / CH);
  const int nthreads = (a.W + CW - 1) / CW * (CH / CV);
  for (int block = 0; block < grid; ++block) {
    // NaN where the kernel leaves shared memory unwritten: the zero tokens must be zeroed.
    std::vector<T> buf(pipe_smem<T>(NS, a.W, CH, CW) / sizeof(T), T(NAN));
    std::vector<PipeForwardThread<T, CV, NS, CW>> th(nthreads);
    for (int t = 0; t < nthreads; ++t) th[t].init(a, t, nthreads, block, grid, buf.data());
    if (th[0].positions > 0) run_block(th, a, NS - 1);
  }
  return out;
}

// grad_x (NaN where not wanted: the kernel then writes none), grad_w, grad_b; grid a multiple
// of the chunks.
template <typename T, int CV, int NS, bool GX = true>
std::vector<at::Tensor> emulate_backward(const at::Tensor& g, const at::Tensor& x,
                                         const at::Tensor& w, int64_t H, int64_t W, int64_t P,
                                         int CH, int grid) {
  using A = acc_t<T>;
  const int64_t C = x.size(2);
  const int chunks = static_cast<int>(C / CH);
  at::Tensor grad_x = at::full({x.size(0), x.size(1), C}, NAN, x.options());
  at::Tensor partials = at::full({grid / chunks, 10, C}, NAN, x.options().dtype(scalar_type<A>()));
  PipeBackwardArgs<T> a{};
  a.grad = g.const_data_ptr<T>();
  a.g_sb = g.stride(0);
  a.g_st = g.stride(1);
  a.x = x.const_data_ptr<T>();
  a.x_sb = x.stride(0);
  a.x_st = x.stride(1);
  a.p = params_of<T>(w, nullptr);
  a.grad_x = GX ? grad_x.mutable_data_ptr<T>() : nullptr;
  a.partials = partials.mutable_data_ptr<A>();
  a.B = x.size(0); a.N = x.size(1); a.C = C; a.P = P;
  a.H = static_cast<int>(H); a.W = static_cast<int>(W);
  a.CH = CH; a.chunks = chunks;
  const int nthreads = a.W * CH / CV;
  for (int block = 0; block < grid; ++block) {
    std::vector<T> buf(2 * pipe_smem<T>(NS, a.W, CH) / sizeof(T), T(NAN));
    std::vector<PipeBackwardThread<T, CV, NS, GX>> th(nthreads);
    for (int t = 0; t < nthreads; ++t) th[t].init(a, t, nthreads, block, grid, buf.data());
    run_block(th, a, NS - 2);
    std::vector<A> red(size_t(a.W) * CH, A(NAN));
    for (int tap = 0; tap <= 9; ++tap) {
      for (auto& t : th) t.put(a, red.data(), tap);
      for (auto& t : th) t.sum(a, red.data(), tap, block);
    }
  }
  const at::Tensor total = partials.sum(0);  // (10, C): the package's reduction, in order
  return {grad_x, total.narrow(0, 0, 9).t().reshape({C, 1, 3, 3}), total.select(0, 9)};
}

// The forward with CW columns a thread; the backward too where NS >= 4 and CW == 1. H x W
// pixels; CH channels an item (0: as the package's launcher picks them, pipe_channels).
template <typename T, int CV, int NS, int CW>
void check_case(int64_t B, int64_t C, int64_t H, int64_t W, int64_t P, int CH) {
  if (CH == 0) CH = pipe_channels(C, W, sizeof(T), CV, CW);
  expect(CH > 0 && C % CH == 0, "a chunk of channels for C " + std::to_string(C));
  if (CH <= 0 || C % CH != 0) return;
  const int64_t N = P + H * W;
  const at::ScalarType dt = scalar_type<T>();
  const at::Tensor x = strided_tokens(B, N, C, dt), g = strided_tokens(B, N, C, dt);
  const at::Tensor w = (at::randn({C, 1, 3, 3}, at::kDouble) * 0.3).to(dt);
  const at::Tensor b = at::randn({C}, at::kDouble).to(dt);
  const auto ref = reference(x, w, b, g, H, W, P);
  const int chunks = static_cast<int>(C / CH), items = static_cast<int>(B) * chunks;
  const std::string what = std::string(c10::toString(dt)) + " CV" + std::to_string(CV) + " NS" +
                           std::to_string(NS) + " CW" + std::to_string(CW) + " B" +
                           std::to_string(B) + " C" + std::to_string(C) + " " +
                           std::to_string(H) + "x" + std::to_string(W) + " P" +
                           std::to_string(P) + " CH" + std::to_string(CH);
  for (int grid : {1, 2, items, items + 3}) {
    const at::Tensor out = emulate_forward<T, CV, NS, CW>(x, w, b, H, W, P, CH, grid);
    const double e = rel_err(out, ref[0]);
    expect(e < tolerance<T>(), "forward " + what + " grid " + std::to_string(grid) +
                                   ": rel err " + std::to_string(e));
  }
  if constexpr (NS >= 4 && CW == 1) {
    for (int grid : {chunks, 2 * chunks, items}) {
      const auto got = emulate_backward<T, CV, NS>(g, x, w, H, W, P, CH, grid);
      const char* names[3] = {"grad_x ", "grad_w ", "grad_b "};
      for (int k = 0; k < 3; ++k) {
        const double e = rel_err(got[k], ref[1 + k]);
        expect(e < tolerance<T>(), names[k] + what + " grid " + std::to_string(grid) +
                                       ": rel err " + std::to_string(e));
      }
    }
    // Without grad_x: the same weight and bias sums, and not a value of grad_x written.
    const auto got = emulate_backward<T, CV, NS, false>(g, x, w, H, W, P, CH, chunks);
    expect(got[0].isnan().all().template item<bool>(), "no grad_x wanted, some written: " + what);
    for (int k = 1; k < 3; ++k) {
      const double e = rel_err(got[k], ref[1 + k]);
      expect(e < tolerance<T>(), std::string(k == 1 ? "grad_w " : "grad_b ") + what +
                                     " without grad_x: rel err " + std::to_string(e));
    }
  }
}

// Inf and NaN in the weight, x and grad_out, next to the borders: NaN and Inf where the float64
// reference has them (the forward multiplies the zero padding by every tap; the input gradient
// skips the taps on padding; the weight gradient multiplies the zero padding).
template <typename T, int CV, int NS>
void check_nonfinite(int64_t B, int64_t C, int64_t H, int64_t W, int64_t P) {
  const int CH = pipe_channels(C, W, sizeof(T), CV, 1);
  const int64_t N = P + H * W;
  const at::ScalarType dt = scalar_type<T>();
  for (int which = 0; which < 3; ++which) {
    at::Tensor x = strided_tokens(B, N, C, dt), g = strided_tokens(B, N, C, dt);
    at::Tensor w = (at::randn({C, 1, 3, 3}, at::kDouble) * 0.3).to(dt);
    const at::Tensor b = at::randn({C}, at::kDouble).to(dt);
    const char* what = which == 0   ? "Inf/NaN taps"
                       : which == 1 ? "Inf/NaN in x"
                                    : "Inf/NaN in grad_out";
    if (which == 0) {
      w.index_put_({1, 0, 0, 0}, INFINITY);
      w.index_put_({2, 0, 2, 1}, NAN);
      w.index_put_({C - 1, 0, 1, 2}, -INFINITY);
    } else {
      at::Tensor& t = which == 1 ? x : g;
      t.index_put_({0, P + 1, 2}, INFINITY);           // top row
      t.index_put_({B - 1, N - 1, 0}, NAN);            // bottom right corner
      t.index_put_({0, P + (H - 1) * W, C - 1}, -INFINITY);  // bottom left corner
    }
    const auto ref = reference(x, w, b, g, H, W, P);
    const std::string name = std::string(c10::toString(dt)) + " CV" + std::to_string(CV) + " " +
                             std::to_string(H) + "x" + std::to_string(W) + " " + what;
    auto check = [&](const at::Tensor& got, const at::Tensor& want, const char* part) {
      const double e = rel_err(got, want);
      expect(e < tolerance<T>(), name + " " + part + ": rel err " + std::to_string(e) +
                                     " (NaN: the non-finite positions differ)");
    };
    check(emulate_forward<T, CV, NS, 1>(x, w, b, H, W, P, CH, 2), ref[0], "forward");
    const auto r = emulate_backward<T, CV, NS>(g, x, w, H, W, P, CH, static_cast<int>(C / CH));
    check(r[0], ref[1], "grad_x");
    check(r[1], ref[2], "grad_weight");
    check(r[2], ref[3], "grad_bias");
  }
}

template <typename T, int CV, int NS, int CW = 1>
void check_all() {
  check_case<T, CV, NS, CW>(1, 16, 1, 1, 0, 16);
  check_case<T, CV, NS, CW>(2, 32, 2, 2, 1, 16);
  check_case<T, CV, NS, CW>(3, 48, 5, 5, 2, 16);
  check_case<T, CV, NS, CW>(2, 64, 7, 7, 1, 32);
  check_case<T, CV, NS, CW>(1, 32, 9, 9, 1, 32);
  // Rectangular grids, with the launcher's chunks: 8 channels, one chunk of 8; 48 at W = 3,
  // 3 chunks of 16; 128 at W = 20, chunks of 32 with 4 channels a thread and one column (64
  // would need 320 threads), of 64 otherwise.
  check_case<T, CV, NS, CW>(3, 8, 5, 7, 1, 0);
  check_case<T, CV, NS, CW>(2, 48, 6, 3, 2, 0);
  check_case<T, CV, NS, CW>(2, 128, 2, 20, 0, 0);
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_all<float, 4, 3>();
  check_all<float, 4, 4>();
  check_all<float, 4, 6>();
  check_all<c10::BFloat16, 4, 6>();
  check_all<c10::BFloat16, 8, 4>();
  check_all<c10::BFloat16, 4, 6, 2>();
  check_nonfinite<float, 4, 6>(2, 16, 5, 7, 1);
  check_nonfinite<c10::BFloat16, 4, 6>(2, 16, 5, 7, 1);
  check_nonfinite<c10::BFloat16, 4, 6>(3, 32, 4, 3, 0);
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
