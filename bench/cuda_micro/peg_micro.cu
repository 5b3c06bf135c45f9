// Standalone microbenchmark of the CUDA PEG kernels (no torch at run time): the tiled kernels of
// csrc/cuda/peg_kernel.cuh against the streaming kernels of csrc/cuda/peg_stream.cuh in several
// configurations and the experimental cp.async kernels of peg_pipe.cuh, each checked against a
// float64 kernel, timed with CUDA events after an L2 flush, beside a device-to-device copy of the
// same bytes and of 256 MiB.
//
//   bash bench/cuda_micro/build.sh        # nvcc, sm_90, uses torch's c10 headers
//   bench/cuda_micro/peg_micro [reps]     # on the GPU
//
// It prints one line per (shape, pass, variant): median and p20-p80 microseconds, GB/s, % of
// the 256 MiB copy, % of a copy of the same bytes, registers and the largest error.
//
// For a profiler: MICRO_ONLY="fwd tile,bwd stream v2 rh8 sl1" runs only the variants whose
// "pass name" contains one of the comma-separated strings, MICRO_SHAPES="0,1" only those shapes
// (indices into the list in main), and MICRO_PROFILE=1 launches each variant once, untimed:
//   MICRO_PROFILE=1 MICRO_SHAPES=0 MICRO_ONLY="fwd tile,fwd stream v4 rh8 sl1" \
//       ncu --clock-control none --set full -k regex:peg_ bench/cuda_micro/peg_micro
#include "../../csrc/cuda/peg_kernel.cuh"
#include "../../csrc/cuda/peg_stream.cuh"
#include "../../csrc/cuda/peg_pipe.cuh"

#include <c10/util/BFloat16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

using namespace cpvt::peg_cuda;
using bf16 = c10::BFloat16;

#define CK(x)                                                                       \
  do {                                                                              \
    cudaError_t e_ = (x);                                                           \
    if (e_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x,                \
                   cudaGetErrorString(e_));                                         \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

struct Shape {
  int B, C, H, P, K;
};

// ----- float64 references -----
template <typename T>
__global__ void ref_forward(const T* x, const T* w, const T* bias, double* out, int B, int N,
                            int C, int H, int W, int P, int K) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= int64_t(B) * N * C) return;
  const int c = i % C;
  const int64_t bn = i / C;
  const int n = bn % N, b = bn / N;
  if (n < P) { out[i] = double(static_cast<float>(x[i])); return; }
  const int h = (n - P) / W, ww = (n - P) % W, pad = K / 2;
  double s = bias ? double(static_cast<float>(bias[c])) : 0.0;
  s += double(static_cast<float>(x[i]));
  for (int a = 0; a < K; ++a)
    for (int bb = 0; bb < K; ++bb) {
      const int hh = h + a - pad, w2 = ww + bb - pad;
      if (hh < 0 || hh >= H || w2 < 0 || w2 >= W) continue;
      s += double(static_cast<float>(w[(c * K + a) * K + bb])) *
           double(static_cast<float>(x[(int64_t(b) * N + P + hh * W + w2) * C + c]));
    }
  out[i] = s;
}

// grad_x: grad_out itself plus the transposed convolution; prefix tokens pass through.
template <typename T>
__global__ void ref_grad_x(const T* g, const T* w, double* gx, int B, int N, int C, int H, int W,
                           int P, int K) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= int64_t(B) * N * C) return;
  const int c = i % C;
  const int64_t bn = i / C;
  const int n = bn % N, b = bn / N;
  if (n < P) { gx[i] = double(static_cast<float>(g[i])); return; }
  const int h = (n - P) / W, ww = (n - P) % W, pad = K / 2;
  double s = double(static_cast<float>(g[i]));
  for (int a = 0; a < K; ++a)
    for (int bb = 0; bb < K; ++bb) {
      const int ho = h - a + pad, wo = ww - bb + pad;  // outputs that read (h, ww) with tap (a, bb)
      if (ho < 0 || ho >= H || wo < 0 || wo >= W) continue;
      s += double(static_cast<float>(w[(c * K + a) * K + bb])) *
           double(static_cast<float>(g[(int64_t(b) * N + P + ho * W + wo) * C + c]));
    }
  gx[i] = s;
}

// grad_w[c][tap] (tap == K*K: grad_bias[c]).
template <typename T>
__global__ void ref_grad_w(const T* g, const T* x, double* gw, int B, int N, int C, int H, int W,
                           int P, int K) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int kk = K * K;
  if (i >= C * (kk + 1)) return;
  const int c = i / (kk + 1), tap = i % (kk + 1), a = tap / K, bb = tap % K, pad = K / 2;
  double s = 0;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int ww = 0; ww < W; ++ww) {
        const double gv = double(static_cast<float>(g[(int64_t(b) * N + P + h * W + ww) * C + c]));
        if (tap == kk) { s += gv; continue; }
        const int hh = h + a - pad, w2 = ww + bb - pad;
        if (hh < 0 || hh >= H || w2 < 0 || w2 >= W) continue;
        s += gv * double(static_cast<float>(x[(int64_t(b) * N + P + hh * W + w2) * C + c]));
      }
  gw[i] = s;
}

template <typename T>
__global__ void to_double(const T* a, double* b, int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) b[i] = double(static_cast<float>(a[i]));
}

// max |a - b| / max |b|
double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0, r = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(a[i] - b[i]);
    if (!(d <= m)) m = d;  // NaN sticks
    r = std::max(r, std::fabs(b[i]));
  }
  return m / std::max(r, 1e-30);
}

template <typename T>
std::vector<double> fetch(const T* d, int64_t n) {
  double* dd;
  CK(cudaMalloc(&dd, n * sizeof(double)));
  to_double<<<(n + 255) / 256, 256>>>(d, dd, n);
  std::vector<double> h(n);
  CK(cudaMemcpy(h.data(), dd, n * sizeof(double), cudaMemcpyDeviceToHost));
  CK(cudaFree(dd));
  return h;
}

std::vector<double> fetch_d(const double* d, int64_t n) {
  std::vector<double> h(n);
  CK(cudaMemcpy(h.data(), d, n * sizeof(double), cudaMemcpyDeviceToHost));
  return h;
}

// ----- timing -----
static char* g_flush = nullptr;
static const size_t kFlush = 256u << 20;
static int g_reps = 30;
static int g_sms = 0;

struct Timing {
  double med, p20, p80;
};

static bool g_profile = false;  // MICRO_PROFILE=1: one untimed launch per variant

// Whether variant "pass name" runs: MICRO_ONLY unset, or one of its comma-separated parts is in it.
bool selected(const std::string& pass_name) {
  const char* only = std::getenv("MICRO_ONLY");
  if (only == nullptr || *only == '\0') return true;
  std::string list(only);
  size_t start = 0;
  while (start <= list.size()) {
    const size_t end = std::min(list.find(',', start), list.size());
    const std::string part = list.substr(start, end - start);
    if (!part.empty() && pass_name.find(part) != std::string::npos) return true;
    start = end + 1;
  }
  return false;
}

Timing time_it(const std::function<void()>& f) {
  if (g_profile) return {0, 0, 0};  // the checked launch before was the one to profile
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> ts;
  for (int r = 0; r < g_reps + 3; ++r) {
    CK(cudaMemsetAsync(g_flush, r & 0xff, kFlush));
    CK(cudaEventRecord(a));
    f();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    if (r >= 3) ts.push_back(ms * 1000.f);
  }
  CK(cudaGetLastError());
  std::sort(ts.begin(), ts.end());
  auto q = [&](double p) { return ts[std::min<size_t>(ts.size() - 1, size_t(p * ts.size()))]; };
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  return {q(0.5), q(0.2), q(0.8)};
}

static double g_copy_gbs = 0;

void report(const char* pass, const Shape& s, const std::string& name, const Timing& t,
            double bytes, double same_size_copy_us, int regs, double err) {
  if (g_profile) {
    std::printf("%-6s B=%-3d C=%-4d H=%-2d P=%d K=%d  %-26s untimed (MICRO_PROFILE)  regs %3d  "
                "err %.2e\n", pass, s.B, s.C, s.H, s.P, s.K, name.c_str(), regs, err);
    std::fflush(stdout);
    return;
  }
  const double gbs = bytes / (t.med * 1e-6) / 1e9;
  std::printf("%-6s B=%-3d C=%-4d H=%-2d P=%d K=%d  %-26s %8.2f us (%7.2f-%7.2f) %7.0f GB/s %5.1f%% copy %5.1f%% same-size  regs %3d  err %.2e\n",
              pass, s.B, s.C, s.H, s.P, s.K, name.c_str(), t.med, t.p20, t.p80, gbs,
              100 * gbs / g_copy_gbs, 100 * same_size_copy_us / t.med, regs, err);
  std::fflush(stdout);
}

template <typename F>
int regs_of(F* f) {
  cudaFuncAttributes at;
  CK(cudaFuncGetAttributes(&at, f));
  return at.numRegs;
}

// ----- variants -----
template <typename T>
struct Bufs {
  T *x, *g, *w, *bias, *out, *gx, *gw, *gb;
  float* partials;
  size_t partial_elems;
};

// "stream v4 rh8 sl1", with " pf<PF>" when PF is not 1 and " minb<MINB>" when MINB > 0.
std::string stream_name(int vec, int rh, int sl, int pf, int minb) {
  std::string name = "stream v" + std::to_string(vec) + " rh" + std::to_string(rh) + " sl" +
                     std::to_string(sl);
  if (pf != 1) name += " pf" + std::to_string(pf);
  if (minb > 0) name += " minb" + std::to_string(minb);
  return name;
}

// The forward kernel of (T, VEC, K, RH, FWD, PF), with MINB resident blocks requested if > 0.
template <typename T, int VEC, int K, int RH, bool FWD, int PF, int MINB>
constexpr auto stream_fwd_kernel() {
  if constexpr (MINB > 0) {
    return peg_stream_forward_kernel_minb<T, VEC, K, RH, FWD, PF, MINB>;
  } else {
    return peg_stream_forward_kernel<T, VEC, K, RH, FWD, PF>;
  }
}

template <typename T, int VEC, int K, int RH, bool FWD, int PF = 1, int MINB = 0>
void launch_stream_fwd(const Bufs<T>& d, const Shape& s, int64_t slots_per_sm) {
  const int H = s.H, W = s.H, N = s.P + H * W;
  StreamGeometry g = plan_stream(s.B, N, s.C, H, W, s.P, VEC, RH);
  auto kern = stream_fwd_kernel<T, VEC, K, RH, FWD, PF, MINB>();
  if (slots_per_sm > 0) {  // persistent: slots_per_sm waves of resident blocks
    int per_sm = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, g.cv * g.wb,
                                                     stream_forward_smem<T>(g, VEC, K)));
    set_row_slots(g, int64_t(per_sm) * g_sms * slots_per_sm / (int64_t(g.chunks) * g.wblocks));
  }
  StreamForwardArgs<T> a{};
  a.src = FWD ? d.x : d.g;
  a.sb = int64_t(N) * s.C;
  a.st = s.C;
  a.p.weight = d.w;
  a.p.w_sc = K * K; a.p.w_si = K; a.p.w_sj = 1;
  a.p.bias = FWD ? d.bias : nullptr;
  a.p.b_s = 1;
  a.out = FWD ? d.out : d.gx;
  a.g = g;
  const int64_t grid = g.conv_blocks + stream_prefix_blocks(g);
  kern<<<grid, dim3(g.cv, g.wb), stream_forward_smem<T>(g, VEC, K)>>>(a);
}

// The cp.async forward of peg_pipe.cuh: CV channels a thread, NS row buffers; a work item is
// (image, CH channels), CH as the package picks it (pipe_channels; 0 where none fits);
// persistent (one wave of resident blocks).
template <typename T, int CV, int CW = 1>
int pipe_channels(const Shape& s) {
  return s.K == 3 ? cpvt::peg_pipe::pipe_channels(s.C, s.H, int(sizeof(T)), CV, CW) : 0;
}

template <typename T, int CV, int NS, int CW = 1>
void launch_pipe_fwd(const Bufs<T>& d, const Shape& s) {
  using namespace cpvt::peg_pipe;
  const int H = s.H, W = s.H, N = s.P + H * W, CH = pipe_channels<T, CV, CW>(s);
  auto kern = peg_pipe_forward_kernel<T, CV, NS, CW>;
  const int threads = (W + CW - 1) / CW * (CH / CV);
  const int64_t smem = pipe_smem<T>(NS, W, CH, CW);
  CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, threads, smem));
  if (per_sm < 1) std::exit(5);
  PipeArgs<T> a{};
  a.src = d.x; a.sb = int64_t(N) * s.C; a.st = s.C;
  a.p.weight = d.w; a.p.w_sc = 9; a.p.w_si = 3; a.p.w_sj = 1; a.p.bias = d.bias; a.p.b_s = 1;
  a.out = d.out;
  a.B = s.B; a.N = N; a.C = s.C; a.P = s.P; a.H = H; a.W = W;
  a.CH = CH; a.chunks = s.C / CH;
  const int64_t items = int64_t(s.B) * a.chunks;
  const int64_t grid = std::min<int64_t>(items, int64_t(per_sm) * g_sms);
  kern<<<static_cast<unsigned>(grid), threads, smem>>>(a);
}

// The cp.async backward of peg_pipe.cuh (as launch_pipe_fwd; the grid a multiple of the chunks
// so that each block keeps one, a slot of partials for each block of a chunk), then the
// package's reduction of the partials.
template <typename T, int CV, int NS>
void launch_pipe_bwd(const Bufs<T>& d, const Shape& s) {
  using namespace cpvt::peg_pipe;
  const int H = s.H, W = s.H, N = s.P + H * W, CH = pipe_channels<T, CV>(s);
  auto kern = peg_pipe_backward_kernel<T, CV, NS>;
  const int threads = W * (CH / CV);
  const int64_t smem = 2 * pipe_smem<T>(NS, W, CH);
  CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, threads, smem));
  if (per_sm < 1) std::exit(5);
  PipeBackwardArgs<T> a{};
  a.grad = d.g; a.g_sb = int64_t(N) * s.C; a.g_st = s.C;
  a.x = d.x; a.x_sb = int64_t(N) * s.C; a.x_st = s.C;
  a.p.weight = d.w; a.p.w_sc = 9; a.p.w_si = 3; a.p.w_sj = 1;
  a.grad_x = d.gx;
  a.partials = d.partials;
  a.B = s.B; a.N = N; a.C = s.C; a.P = s.P; a.H = H; a.W = W;
  a.CH = CH; a.chunks = s.C / CH;
  const int64_t items = int64_t(s.B) * a.chunks;
  const int64_t grid = std::max<int64_t>(
      a.chunks, std::min<int64_t>(items, int64_t(per_sm) * g_sms) / a.chunks * a.chunks);
  const int64_t slots = grid / a.chunks;
  if (size_t(slots) * 10 * s.C > d.partial_elems) std::exit(4);
  kern<<<static_cast<unsigned>(grid), threads, smem>>>(a);
  const int64_t cblocks = (s.C + 31) / 32;
  reduce_partials_kernel<T><<<10 * cblocks, 256>>>(d.partials, slots, 9, s.C, cblocks, d.gw,
                                                   d.gb);
}

template <typename T, int K>
void launch_tile_fwd(const Bufs<T>& d, const Shape& s) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int RW = K == 1 ? 1 : K == 3 ? 2 : 4;
  const int H = s.H, W = s.H, N = s.P + H * W;
  LaunchPlan plan;
  if (!plan_forward(plan, s.B, N, s.C, H, W, s.P, K, K, VEC, sizeof(T), 4, RW, g_sms)) std::exit(3);
  ForwardArgs<T> a{};
  a.src = d.x; a.sb = int64_t(N) * s.C; a.st = s.C;
  a.p.weight = d.w; a.p.w_sc = K * K; a.p.w_si = K; a.p.w_sj = 1; a.p.bias = d.bias; a.p.b_s = 1;
  a.flip = false;
  a.out = d.out;
  a.g = plan.g;
  a.conv_blocks = plan.conv_blocks;
  a.ws_bytes = plan.ws_bytes;
  peg_forward_kernel<T, VEC, K, K, RW>
      <<<plan.conv_blocks + plan.prefix_blocks, plan.threads, plan.smem>>>(a);
}

template <typename T, int K>
void launch_tile_bwd(const Bufs<T>& d, const Shape& s) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int JW = K * VEC <= 28 ? K : 3;
  const int H = s.H, W = s.H, N = s.P + H * W;
  auto kernel = peg_backward_kernel<T, VEC, K, K, 2, JW>;
  const int64_t budget = kBackwardSmemBudget;
  static bool opted = false;
  if (!opted) {
    CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(budget)));
    opted = true;
  }
  LaunchPlan plan;
  if (!plan_backward(plan, s.B, N, s.C, H, W, s.P, K, K, VEC, sizeof(T), 4, JW, budget)) std::exit(3);
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, plan.threads, plan.smem));
  finish_backward(plan, per_sm, g_sms, true);
  const int kk = K * K;
  if (size_t(plan.slots) * (kk + 1) * s.C > d.partial_elems) std::exit(4);
  BackwardArgs<T> a{};
  a.grad = d.g; a.g_sb = int64_t(N) * s.C; a.g_st = s.C;
  a.x = d.x; a.x_sb = int64_t(N) * s.C; a.x_st = s.C;
  a.p.weight = d.w; a.p.w_sc = kk; a.p.w_si = K; a.p.w_sj = 1;
  a.grad_x = d.gx;
  a.partials = d.partials;
  a.g = plan.g;
  a.conv_blocks = plan.conv_blocks; a.slots = plan.slots; a.tiles_total = plan.tiles_total;
  a.ws_bytes = plan.ws_bytes; a.tile_bytes = plan.tile_bytes;
  a.lanes = plan.lanes; a.groups = plan.groups; a.seg_w = plan.seg_w;
  kernel<<<plan.conv_blocks + plan.prefix_blocks, plan.threads, plan.smem>>>(a);
  const int64_t cblocks = (s.C + 31) / 32;
  reduce_partials_kernel<T><<<(kk + 1) * cblocks, 256>>>(d.partials, plan.slots, kk, s.C, cblocks,
                                                         d.gw, d.gb);
}

// The backward kernel of (T, VEC, K, RH, PF), with MINB resident blocks requested if > 0.
template <typename T, int VEC, int K, int RH, int PF, int MINB>
auto stream_bwd_kernel() {
  if constexpr (MINB > 0) {
    return peg_stream_backward_kernel_minb<T, VEC, K, RH, PF, MINB>;
  } else {
    return peg_stream_backward_kernel<T, VEC, K, RH, PF>;
  }
}

template <typename T, int VEC, int K, int RH, int PF = 1, int MINB = 0>
void launch_stream_bwd(const Bufs<T>& d, const Shape& s, int slots_per_sm) {
  const int H = s.H, W = s.H, N = s.P + H * W;
  const int kk = K * K;
  StreamGeometry g = plan_stream(s.B, N, s.C, H, W, s.P, VEC, RH);
  auto kern = stream_bwd_kernel<T, VEC, K, RH, PF, MINB>();
  const size_t smem = stream_backward_smem<T>(g, VEC, K);
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, g.cv * g.wb, smem));
  set_row_slots(g, int64_t(per_sm) * g_sms * slots_per_sm / (int64_t(g.chunks) * g.wblocks));
  const int64_t slots = int64_t(g.wblocks) * g.row_slots;
  if (size_t(slots) * (kk + 1) * s.C > d.partial_elems) std::exit(4);
  StreamBackwardArgs<T> a{};
  a.grad = d.g; a.g_sb = int64_t(N) * s.C; a.g_st = s.C;
  a.x = d.x; a.x_sb = int64_t(N) * s.C; a.x_st = s.C;
  a.p.weight = d.w; a.p.w_sc = kk; a.p.w_si = K; a.p.w_sj = 1;
  a.grad_x = d.gx;
  a.partials = d.partials;
  a.g = g;
  const int64_t grid = g.conv_blocks + stream_prefix_blocks(g);
  kern<<<grid, dim3(g.cv, g.wb), smem>>>(a);
  const int64_t cblocks = (s.C + 31) / 32;
  reduce_partials_kernel<T><<<(kk + 1) * cblocks, 256>>>(d.partials, slots, kk, s.C, cblocks,
                                                         d.gw, d.gb);
}

template <typename T>
void fill(T* d, int64_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<T> h(n);
  for (auto& v : h) v = T(nd(rng));
  CK(cudaMemcpy(d, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
}

template <typename T>
void nan_fill(T* d, int64_t n) { CK(cudaMemset(d, 0xff, n * sizeof(T))); }

template <typename T, int K>
void run_shape(const Shape& s) {
  const int H = s.H, W = s.H, N = s.P + H * W;
  const int64_t n = int64_t(s.B) * N * s.C;
  const int kk = K * K;
  Bufs<T> d{};
  CK(cudaMalloc(&d.x, n * sizeof(T)));
  CK(cudaMalloc(&d.g, n * sizeof(T)));
  CK(cudaMalloc(&d.out, n * sizeof(T)));
  CK(cudaMalloc(&d.gx, n * sizeof(T)));
  CK(cudaMalloc(&d.w, s.C * kk * sizeof(T)));
  CK(cudaMalloc(&d.bias, s.C * sizeof(T)));
  CK(cudaMalloc(&d.gw, s.C * kk * sizeof(T)));
  CK(cudaMalloc(&d.gb, s.C * sizeof(T)));
  d.partial_elems = size_t(8192) * (kk + 1) * s.C;
  CK(cudaMalloc(&d.partials, d.partial_elems * sizeof(float)));
  std::mt19937 rng(1234 + s.C + s.H);
  fill(d.x, n, rng, 1.f);
  fill(d.g, n, rng, 1.f);
  fill(d.w, s.C * kk, rng, 0.3f);
  fill(d.bias, s.C, rng, 0.5f);

  double *rout, *rgx, *rgw;
  CK(cudaMalloc(&rout, n * sizeof(double)));
  CK(cudaMalloc(&rgx, n * sizeof(double)));
  CK(cudaMalloc(&rgw, s.C * (kk + 1) * sizeof(double)));
  ref_forward<T><<<(n + 255) / 256, 256>>>(d.x, d.w, d.bias, rout, s.B, N, s.C, H, W, s.P, K);
  ref_grad_x<T><<<(n + 255) / 256, 256>>>(d.g, d.w, rgx, s.B, N, s.C, H, W, s.P, K);
  ref_grad_w<T><<<(s.C * (kk + 1) + 127) / 128, 128>>>(d.g, d.x, rgw, s.B, N, s.C, H, W, s.P, K);
  CK(cudaDeviceSynchronize());
  const auto h_out = fetch_d(rout, n), h_gx = fetch_d(rgx, n);
  const auto h_gwb = fetch_d(rgw, s.C * (kk + 1));
  std::vector<double> h_gw(s.C * kk), h_gb(s.C);
  for (int c = 0; c < s.C; ++c) {
    for (int t = 0; t < kk; ++t) h_gw[c * kk + t] = h_gwb[c * (kk + 1) + t];
    h_gb[c] = h_gwb[c * (kk + 1) + kk];
  }

  const double S = double(n) * sizeof(T);
  // A copy of the same bytes (read S, write S).
  const Timing cp = time_it([&] { CK(cudaMemcpyAsync(d.out, d.x, S, cudaMemcpyDeviceToDevice)); });
  if (!g_profile) {
    std::printf("copy   B=%-3d C=%-4d H=%-2d          %8.2f us  %7.0f GB/s (%.1f%% of the 256 MiB copy)\n",
                s.B, s.C, s.H, cp.med, 2 * S / (cp.med * 1e-6) / 1e9,
                100 * 2 * S / (cp.med * 1e-6) / 1e9 / g_copy_gbs);
  }
  const Timing cp3 = time_it([&] {
    CK(cudaMemcpyAsync(d.out, d.x, S, cudaMemcpyDeviceToDevice));
    CK(cudaMemcpyAsync(d.gx, d.g, S / 2, cudaMemcpyDeviceToDevice));
  });
  (void)cp3;

  auto check_fwd = [&](const std::string& name, int regs, const std::function<void()>& f) {
    if (!selected("fwd " + name)) return;
    nan_fill(d.out, n);
    f();
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    const double err = rel_err(fetch(d.out, n), h_out);
    const Timing t = time_it(f);
    report("fwd", s, name, t, 2 * S, cp.med, regs, err);
  };
  auto check_bwd = [&](const std::string& name, int regs, const std::function<void()>& f) {
    if (!selected("bwd " + name)) return;
    nan_fill(d.gx, n);
    nan_fill(d.gw, s.C * kk);
    nan_fill(d.gb, s.C);
    f();
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    const double err = std::max({rel_err(fetch(d.gx, n), h_gx), rel_err(fetch(d.gw, s.C * kk), h_gw),
                                 rel_err(fetch(d.gb, s.C), h_gb)});
    const Timing t = time_it(f);
    report("bwd", s, name, t, 3 * S, cp.med * 1.5, regs, err);
  };
  auto check_gx = [&](const std::string& name, int regs, const std::function<void()>& f) {
    if (!selected("gx " + name)) return;
    nan_fill(d.gx, n);
    f();
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    const double err = rel_err(fetch(d.gx, n), h_gx);
    const Timing t = time_it(f);
    report("gx", s, name, t, 2 * S, cp.med, regs, err);
  };

  constexpr int V16 = 16 / sizeof(T);
  constexpr int RW = K == 1 ? 1 : K == 3 ? 2 : 4;
  check_fwd("tile", regs_of(peg_forward_kernel<T, V16, K, K, RW>), [&] { launch_tile_fwd<T, K>(d, s); });
  // Streaming variants: VEC channels a thread, RH rows a strip, SL waves of persistent blocks
  // (0: a block per row), loads PF rows ahead (the package runs PF = 1) and, with MINB > 0, at
  // least MINB resident blocks a multiprocessor requested (registers capped at
  // 65536 / (256 * MINB)).
#define SFWD(VEC, RH, SL, PF, MINB)                                                         \
  check_fwd(stream_name(VEC, RH, SL, PF, MINB),                                             \
            regs_of(stream_fwd_kernel<T, VEC, K, RH, true, PF, MINB>()),                     \
            [&] { launch_stream_fwd<T, VEC, K, RH, true, PF, MINB>(d, s, SL); });
  SFWD(4, 8, 0, 1, 0)
  SFWD(4, 14, 0, 1, 0)
  if constexpr (sizeof(T) == 2) { SFWD(8, 8, 0, 1, 0) }
  SFWD(2, 8, 0, 1, 0)
  SFWD(2, 14, 0, 1, 0)
  SFWD(4, 8, 1, 1, 0)
  SFWD(4, 8, 2, 1, 0)
  SFWD(4, 4, 0, 1, 0)
  SFWD(2, 8, 1, 1, 0)
  SFWD(4, 14, 1, 1, 0)
  SFWD(4, 8, 1, 2, 0)
  SFWD(4, 8, 1, 3, 0)
  SFWD(2, 8, 1, 2, 0)
  SFWD(2, 8, 1, 4, 0)
  SFWD(4, 8, 1, 1, 3)  // ptxas sm_90 bf16: 80 registers, no spills
  SFWD(4, 8, 1, 2, 3)  // 80 registers, 200 bytes of spills
  // cp.async forward (peg_pipe.cuh): "pipe cv<CV> ch<CH> ns<NS>", up to NS - 1 rows in flight.
#define PFWD(CV, NS)                                                                        \
  if constexpr (K == 3) {                                                                   \
    if (const int ch = pipe_channels<T, CV>(s); ch > 0) {                                   \
      check_fwd("pipe cv" #CV " ch" + std::to_string(ch) + " ns" #NS,                       \
                regs_of(cpvt::peg_pipe::peg_pipe_forward_kernel<T, CV, NS>),                 \
                [&] { launch_pipe_fwd<T, CV, NS>(d, s); });                                  \
    }                                                                                       \
  }
  PFWD(4, 3)
  PFWD(4, 4)
  PFWD(4, 6)
  PFWD(4, 8)
  if constexpr (sizeof(T) == 2) { PFWD(8, 6) }
  // Two columns a thread, sharing their loads (16-bit types: a row's pieces, 8 values each,
  // still one a thread).
#define PFWD2(CV, NS)                                                                       \
  if constexpr (K == 3 && sizeof(T) == 2) {                                                 \
    if (const int ch = pipe_channels<T, CV, 2>(s); ch > 0) {                                \
      check_fwd("pipe cv" #CV " cw2 ch" + std::to_string(ch) + " ns" #NS,                   \
                regs_of(cpvt::peg_pipe::peg_pipe_forward_kernel<T, CV, NS, 2>),              \
                [&] { launch_pipe_fwd<T, CV, NS, 2>(d, s); });                               \
    }                                                                                       \
  }
  PFWD2(4, 6)
  PFWD2(4, 8)
  check_gx("stream v4 rh8", regs_of(peg_stream_forward_kernel<T, 4, K, 8, false>),
           [&] { launch_stream_fwd<T, 4, K, 8, false>(d, s, 0); });
  check_bwd("tile", regs_of(peg_backward_kernel<T, V16, K, K, 2, (K * V16 <= 28 ? K : 3)>),
            [&] { launch_tile_bwd<T, K>(d, s); });
#define SBWD(VEC, RH, SL, PF, MINB)                                                         \
  check_bwd(stream_name(VEC, RH, SL, PF, MINB),                                             \
            regs_of(stream_bwd_kernel<T, VEC, K, RH, PF, MINB>()),                           \
            [&] { launch_stream_bwd<T, VEC, K, RH, PF, MINB>(d, s, SL); });
  SBWD(2, 8, 1, 1, 0)
  SBWD(2, 8, 2, 1, 0)
  SBWD(2, 8, 4, 1, 0)
  SBWD(2, 14, 1, 1, 0)
  SBWD(4, 8, 1, 1, 0)
  SBWD(4, 8, 2, 1, 0)
  SBWD(2, 4, 2, 1, 0)
  SBWD(2, 8, 1, 2, 0)
  SBWD(2, 8, 1, 3, 0)
  SBWD(4, 8, 1, 2, 0)
  // cp.async backward (peg_pipe.cuh): "pipe cv<CV> ch<CH> ns<NS>", up to NS - 2 rows of
  // grad_out and of x in flight.
#define PBWD(CV, NS)                                                                        \
  if constexpr (K == 3) {                                                                   \
    if (const int ch = pipe_channels<T, CV>(s); ch > 0) {                                   \
      check_bwd("pipe cv" #CV " ch" + std::to_string(ch) + " ns" #NS,                       \
                regs_of(cpvt::peg_pipe::peg_pipe_backward_kernel<T, CV, NS>),                \
                [&] { launch_pipe_bwd<T, CV, NS>(d, s); });                                  \
    }                                                                                       \
  }
  PBWD(2, 8)
  PBWD(4, 6)
  // Two rows ahead at two resident blocks a multiprocessor, where PF 2 alone takes 130
  // registers and one block (ptxas sm_90: bf16 128 registers, no spills; PF 3 40 bytes of
  // spills; float32 PF 2 8 bytes).
  SBWD(2, 8, 1, 2, 2)
  SBWD(2, 8, 1, 3, 2)

  CK(cudaFree(d.x)); CK(cudaFree(d.g)); CK(cudaFree(d.out)); CK(cudaFree(d.gx));
  CK(cudaFree(d.w)); CK(cudaFree(d.bias)); CK(cudaFree(d.gw)); CK(cudaFree(d.gb));
  CK(cudaFree(d.partials)); CK(cudaFree(rout)); CK(cudaFree(rgx)); CK(cudaFree(rgw));
}

int main(int argc, char** argv) {
  if (argc > 1) g_reps = std::atoi(argv[1]);
  const char* prof = std::getenv("MICRO_PROFILE");
  g_profile = prof != nullptr && std::strcmp(prof, "1") == 0;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  g_sms = prop.multiProcessorCount;
  std::printf("device %s, %d SMs, L2 %d MiB\n", prop.name, g_sms, prop.l2CacheSize >> 20);
  CK(cudaMalloc(&g_flush, kFlush));
  {
    char *a, *b;
    CK(cudaMalloc(&a, kFlush));
    CK(cudaMalloc(&b, kFlush));
    CK(cudaMemset(a, 1, kFlush));
    const Timing t = time_it([&] { CK(cudaMemcpyAsync(b, a, kFlush, cudaMemcpyDeviceToDevice)); });
    g_copy_gbs = 2.0 * kFlush / (t.med * 1e-6) / 1e9;
    std::printf("copy 256 MiB: %.1f us, %.1f GB/s (read + write)\n", t.med, g_copy_gbs);
    CK(cudaFree(a));
    CK(cudaFree(b));
  }
  const Shape shapes[] = {{128, 384, 14, 1, 3}, {128, 768, 14, 1, 3}, {128, 192, 24, 1, 3},
                          {64, 384, 32, 0, 3}};
  // MICRO_SHAPES: the indices to run, 0-3 the bf16 shapes above, 4 the float32 one.
  const char* pick = std::getenv("MICRO_SHAPES");
  auto wanted = [&](int i) {
    if (pick == nullptr || *pick == '\0') return true;
    const std::string list = std::string(",") + pick + ",";
    return list.find("," + std::to_string(i) + ",") != std::string::npos;
  };
  for (int i = 0; i < 4; ++i) {
    if (wanted(i)) run_shape<bf16, 3>(shapes[i]);
  }
  if (wanted(4)) run_shape<float, 3>({128, 384, 14, 1, 3});
  return 0;
}
