// CPU kernels of the fused PEG, forward and backward.
//
// Tokens are channel-last, so every kernel walks a grid row at a time and vectorizes along C.
// Each input row the convolution needs is converted once into a zero-padded row of the
// accumulation type (float for float/half/bfloat16, double for double) that stays in cache
// while the kh output rows that use it are computed: the zero padding of the convolution is
// then plain memory and the inner loops carry no bounds checks. Rows are cached in a ring of
// kh slots per thread.
// ATen's vector types pick their width from CPU_CAPABILITY_* macros, which ATen's own build
// sets per dispatch target. This file is compiled for the build machine's ISA (CPVT_CPU_ARCH),
// so select the matching width from the compiler's target macros.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY_AVX2)
#define CPU_CAPABILITY_AVX2
#endif

#include "../peg.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace cpvt {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Work is split into a fixed number of row chunks that depends only on the shape, never on
// the thread count, so the weight and bias gradients are summed in the same order every run.
constexpr int64_t kMaxChunks = 128;

struct Geometry {
  int64_t B, N, C, H, W, P, kh, kw, ph, pw;
  int64_t sb, st;  // strides of the token tensor in elements (channel stride is 1)
};

// dst[0:n] = float(src[0:n]); ATen's generic convert() is a scalar loop for half types.
template <typename T, typename A>
void widen(const T* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::copy_n(src, n, dst);
  } else {
    using VecT = at::vec::Vectorized<T>;
    using VecA = at::vec::Vectorized<A>;
    int64_t i = 0;
    for (; i + VecT::size() <= n; i += VecT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VecT::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + VecA::size());
    }
    for (; i < n; ++i) dst[i] = static_cast<A>(src[i]);
  }
}

// A ring of kh zero-padded rows of width (W + 2*pw) * C, tagged by (batch, row).
template <typename T>
class RowRing {
 public:
  using A = acc_t<T>;
  RowRing(const Geometry& g, const T* base)
      : g_(g), base_(base), width_(round_up((g.W + 2 * g.pw) * g.C)),
        storage_(static_cast<size_t>((g.kh + 1) * width_ + kAlign / sizeof(A)), A(0)),
        buf_(aligned(storage_.data())), tag_(g.kh, -1) {}

  // A row of zeros for rows outside the grid: the padding is multiplied like any other input,
  // so an Inf or NaN tap meets 0 * Inf = NaN at the border exactly as in a padded convolution.
  const A* zeros() const { return buf_ + g_.kh * width_; }

  // Padded row hh of image b (0 <= hh < H); loads it on a miss.
  const A* get(int64_t b, int64_t hh) {
    const int64_t slot = hh % g_.kh;
    const int64_t tag = b * g_.H + hh;
    A* row = buf_ + slot * width_;
    if (tag_[slot] != tag) {
      const T* src = base_ + b * g_.sb + (g_.P + hh * g_.W) * g_.st;
      A* dst = row + g_.pw * g_.C;  // borders stay zero from construction
      if (g_.st == g_.C) {
        widen(src, dst, g_.W * g_.C);
      } else {
        for (int64_t w = 0; w < g_.W; ++w) widen(src + w * g_.st, dst + w * g_.C, g_.C);
      }
      tag_[slot] = tag;
    }
    return row;
  }

 private:
  const Geometry& g_;
  const T* base_;
  // Rows start on cache-line boundaries: a 64-byte vector load from an unaligned row would
  // split across two lines on every access.
  static constexpr size_t kAlign = 64;
  static int64_t round_up(int64_t n) {
    const int64_t per_line = kAlign / sizeof(A);
    return (n + per_line - 1) / per_line * per_line;
  }
  static A* aligned(A* p) {
    const auto addr = reinterpret_cast<uintptr_t>(p);
    return reinterpret_cast<A*>((addr + kAlign - 1) / kAlign * kAlign);
  }
  int64_t width_;
  std::vector<A> storage_;
  A* buf_;
  std::vector<int64_t> tag_;
};

// Vector load/store of n <= size() elements; FULL (n == size()) avoids the masked forms.
template <bool FULL, typename A>
inline at::vec::Vectorized<A> ld(const A* p, int64_t n) {
  if constexpr (FULL) return at::vec::Vectorized<A>::loadu(p);
  else return at::vec::Vectorized<A>::loadu(p, n);
}
template <bool FULL, typename A>
inline void st(const at::vec::Vectorized<A>& v, A* p, int64_t n) {
  if constexpr (FULL) v.store(p);
  else v.store(p, n);
}

// out[w, c] = bias[c] + sum_{i, j} wt[i*kw + j][c] * rows[i][(w + j)*C + c]
//             + rows[ph][(w + pw)*C + c]
// rows[i] is the padded input row h + i - ph (a zero row outside the grid). The residual is its
// own term, not folded into the centre tap, so that Inf and NaN propagate exactly as in
// conv(x) + x. WB outputs along w are computed together: each weight vector is loaded once for
// all of them, and each input vector once for all the taps that read it (WB + KW - 1 loads
// instead of WB * KW). With KH and KW known at compile time everything unrolls and the
// accumulators stay in registers; KH = KW = 0 is the general path for any kernel size.
template <typename A, int KH, int KW, int WB, bool FULL>
inline void conv_block(const A* const* rows, int64_t kh_rt, int64_t kw_rt, const A* wt,
                       const at::vec::Vectorized<A>& b, int64_t w0, int64_t C, int64_t c0,
                       int64_t n, A* out) {
  using Vec = at::vec::Vectorized<A>;
  Vec acc[WB];
#pragma GCC unroll 16
  for (int q = 0; q < WB; ++q) acc[q] = b;
  if constexpr (KH > 0) {
#pragma GCC unroll 8
    for (int i = 0; i < KH; ++i) {
      const A* ri = rows[i] + w0 * C + c0;
      const A* wi = wt + i * KW * C + c0;
      Vec in[WB + KW - 1];
#pragma GCC unroll 16
      for (int t = 0; t < WB + KW - 1; ++t) in[t] = ld<FULL>(ri + t * C, n);
#pragma GCC unroll 8
      for (int j = 0; j < KW; ++j) {
        const Vec wv = ld<FULL>(wi + j * C, n);
#pragma GCC unroll 16
        for (int q = 0; q < WB; ++q) acc[q] = at::vec::fmadd(wv, in[q + j], acc[q]);
      }
      if (i == KH / 2) {
#pragma GCC unroll 16
        for (int q = 0; q < WB; ++q) acc[q] = acc[q] + in[q + KW / 2];
      }
    }
  } else {
    for (int64_t i = 0; i < kh_rt; ++i) {
      const A* ri = rows[i] + w0 * C + c0;
      const A* wi = wt + i * kw_rt * C + c0;
      for (int64_t j = 0; j < kw_rt; ++j) {
        const Vec wv = ld<FULL>(wi + j * C, n);
#pragma GCC unroll 16
        for (int q = 0; q < WB; ++q) acc[q] = at::vec::fmadd(wv, ld<FULL>(ri + (q + j) * C, n), acc[q]);
      }
      if (i == kh_rt / 2) {
#pragma GCC unroll 16
        for (int q = 0; q < WB; ++q) acc[q] = acc[q] + ld<FULL>(ri + (q + kw_rt / 2) * C, n);
      }
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < WB; ++q) st<FULL>(acc[q], out + (w0 + q) * C + c0, n);
}

template <typename A, int KH, int KW, bool FULL>
inline void conv_cols(const A* const* rows, int64_t kh, int64_t kw, const A* wt, const A* bias,
                      int64_t W, int64_t C, int64_t c0, int64_t n, A* out) {
  // Registers: WB accumulators + WB + KW - 1 inputs + 1 weight must fit in 32 (AVX-512);
  // AVX2's 16 spill a little for the wider blocks, which costs little.
  constexpr int WB = (KW > 0 && KW <= 3) ? 8 : 4;
  const auto b = ld<FULL>(bias + c0, n);
  int64_t w = 0;
  for (; w + WB <= W; w += WB) conv_block<A, KH, KW, WB, FULL>(rows, kh, kw, wt, b, w, C, c0, n, out);
  if (WB > 4 && w + 4 <= W) {
    conv_block<A, KH, KW, 4, FULL>(rows, kh, kw, wt, b, w, C, c0, n, out);
    w += 4;
  }
  if (w + 2 <= W) {
    conv_block<A, KH, KW, 2, FULL>(rows, kh, kw, wt, b, w, C, c0, n, out);
    w += 2;
  }
  for (; w < W; ++w) conv_block<A, KH, KW, 1, FULL>(rows, kh, kw, wt, b, w, C, c0, n, out);
}

template <typename A, int KH, int KW>
void conv_row(const A* const* rows, int64_t kh, int64_t kw, const A* wt, const A* bias,
              int64_t W, int64_t C, A* out) {
  constexpr int64_t V = at::vec::Vectorized<A>::size();
  int64_t c0 = 0;
  for (; c0 + V <= C; c0 += V) conv_cols<A, KH, KW, true>(rows, kh, kw, wt, bias, W, C, c0, V, out);
  if (c0 < C) conv_cols<A, KH, KW, false>(rows, kh, kw, wt, bias, W, C, c0, C - c0, out);
}

template <typename A>
void conv_row_dispatch(const A* const* rows, int64_t kh, int64_t kw, const A* wt, const A* bias,
                       int64_t W, int64_t C, A* out) {
  if (kh == kw) {
    switch (kw) {
      case 1: return conv_row<A, 1, 1>(rows, kh, kw, wt, bias, W, C, out);
      case 3: return conv_row<A, 3, 3>(rows, kh, kw, wt, bias, W, C, out);
      case 5: return conv_row<A, 5, 5>(rows, kh, kw, wt, bias, W, C, out);
      case 7: return conv_row<A, 7, 7>(rows, kh, kw, wt, bias, W, C, out);
      default: break;
    }
  }
  return conv_row<A, 0, 0>(rows, kh, kw, wt, bias, W, C, out);
}

// part[(i*kw + j)*C + c] += sum_w g[w, c] * rows[i][(w + j)*C + c];  part_b[c] += sum_w g[w, c]
// With KW known at compile time, all KW taps of a row accumulate in registers over blocks of WB
// columns, so each input vector is loaded once for all taps that read it.
template <typename A, int KW>
void weight_grad_taps(const A* r, const A* g, int64_t W, int64_t C, int64_t c0, int64_t n,
                      A* part) {
  using Vec = at::vec::Vectorized<A>;
  constexpr int WB = 4;
  Vec acc[KW];
#pragma GCC unroll 8
  for (int j = 0; j < KW; ++j) acc[j] = Vec(A(0));
  int64_t w = 0;
  for (; w + WB <= W; w += WB) {
    Vec gv[WB], in[WB + KW - 1];
#pragma GCC unroll 8
    for (int q = 0; q < WB; ++q) gv[q] = Vec::loadu(g + (w + q) * C + c0, n);
#pragma GCC unroll 16
    for (int t = 0; t < WB + KW - 1; ++t) in[t] = Vec::loadu(r + (w + t) * C + c0, n);
#pragma GCC unroll 8
    for (int j = 0; j < KW; ++j) {
#pragma GCC unroll 8
      for (int q = 0; q < WB; ++q) acc[j] = at::vec::fmadd(gv[q], in[q + j], acc[j]);
    }
  }
  for (; w < W; ++w) {
    const Vec gv = Vec::loadu(g + w * C + c0, n);
#pragma GCC unroll 8
    for (int j = 0; j < KW; ++j) {
      acc[j] = at::vec::fmadd(gv, Vec::loadu(r + (w + j) * C + c0, n), acc[j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < KW; ++j) {
    A* p = part + j * C + c0;
    (Vec::loadu(p, n) + acc[j]).store(p, n);
  }
}

// Any kw: one tap at a time.
template <typename A>
void weight_grad_tap_rt(const A* r, const A* g, int64_t j, int64_t W, int64_t C, int64_t c0,
                        int64_t n, A* part) {
  using Vec = at::vec::Vectorized<A>;
  Vec acc(A(0));
  for (int64_t w = 0; w < W; ++w) {
    acc = at::vec::fmadd(Vec::loadu(g + w * C + c0, n), Vec::loadu(r + (w + j) * C + c0, n), acc);
  }
  A* p = part + j * C + c0;
  (Vec::loadu(p, n) + acc).store(p, n);
}

template <typename A>
void weight_grad_row(const A* const* rows, int64_t kh, int64_t kw, const A* g, int64_t W,
                     int64_t C, A* part, A* part_b) {
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t V = Vec::size();
  for (int64_t c0 = 0; c0 < C; c0 += V) {
    const int64_t n = std::min<int64_t>(V, C - c0);
    if (part_b != nullptr) {
      Vec acc(A(0));
      for (int64_t w = 0; w < W; ++w) acc = acc + Vec::loadu(g + w * C + c0, n);
      (Vec::loadu(part_b + c0, n) + acc).store(part_b + c0, n);
    }
    if (part == nullptr) continue;
    for (int64_t i = 0; i < kh; ++i) {
      A* pi = part + i * kw * C;
      switch (kw) {
        case 1: weight_grad_taps<A, 1>(rows[i], g, W, C, c0, n, pi); break;
        case 3: weight_grad_taps<A, 3>(rows[i], g, W, C, c0, n, pi); break;
        case 5: weight_grad_taps<A, 5>(rows[i], g, W, C, c0, n, pi); break;
        case 7: weight_grad_taps<A, 7>(rows[i], g, W, C, c0, n, pi); break;
        default:
          for (int64_t j = 0; j < kw; ++j) weight_grad_tap_rt<A>(rows[i], g, j, W, C, c0, n, pi);
      }
    }
  }
}

Geometry make_geometry(const at::Tensor& x, const at::Tensor& weight, int64_t H, int64_t W,
                       int64_t P) {
  Geometry g;
  g.B = x.size(0); g.N = x.size(1); g.C = x.size(2);
  g.H = H; g.W = W; g.P = P;
  g.kh = weight.size(2); g.kw = weight.size(3);
  g.ph = g.kh / 2; g.pw = g.kw / 2;
  g.sb = x.stride(0); g.st = x.stride(1);
  return g;
}

// Kernels read channels contiguously; any batch and token strides are fine.
at::Tensor channels_contiguous(const at::Tensor& t) {
  return (t.size(2) <= 1 || t.stride(2) == 1) ? t : t.contiguous();
}

// (C, 1, kh, kw) -> (kh*kw, C) in the accumulation type; flipped for the input gradient.
at::Tensor taps_by_channel(const at::Tensor& weight, at::ScalarType acc, bool flip) {
  at::Tensor w = flip ? weight.flip({2, 3}) : weight;
  return w.reshape({weight.size(0), -1}).t().to(acc).contiguous();
}

template <typename T>
void copy_prefix(const T* src, const Geometry& g, T* dst) {
  if (g.P == 0) return;
  at::parallel_for(0, g.B * g.P, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t b = k / g.P, p = k % g.P;
      std::copy_n(src + b * g.sb + p * g.st, g.C, dst + (b * g.N + p) * g.C);
    }
  });
}

// The forward pass: prefix tokens copied, then each grid row convolved from the row ring.
template <typename T>
void peg_conv_residual(const T* src, const Geometry& g, const acc_t<T>* wt,
                       const acc_t<T>* bias, T* dst) {
  using A = acc_t<T>;
  copy_prefix(src, g, dst);
  const int64_t rows = g.B * g.H;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.W * g.C));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    RowRing<T> ring(g, src);
    std::vector<const A*> in_rows(g.kh);
    std::vector<A> tmp(std::is_same_v<T, A> ? 0 : g.W * g.C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.H, h = r % g.H;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t hh = h + i - g.ph;
        in_rows[i] = (hh >= 0 && hh < g.H) ? ring.get(b, hh) : ring.zeros();
      }
      T* out_row = dst + (b * g.N + g.P + h * g.W) * g.C;
      if constexpr (std::is_same_v<T, A>) {
        conv_row_dispatch<A>(in_rows.data(), g.kh, g.kw, wt, bias, g.W, g.C, out_row);
      } else {
        conv_row_dispatch<A>(in_rows.data(), g.kh, g.kw, wt, bias, g.W, g.C, tmp.data());
        at::vec::convert(tmp.data(), out_row, g.W * g.C);
      }
    }
  });
}

at::Tensor peg_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, int64_t H, int64_t W,
                           int64_t P) {
  check_forward_inputs(x_in, weight, bias, H, W, P);
  const at::Tensor x = channels_contiguous(x_in);
  const Geometry g = make_geometry(x, weight, H, W, P);
  at::Tensor out = at::empty({g.B, g.N, g.C}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peg_forward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    const at::Tensor wt = taps_by_channel(weight, acc, /*flip=*/false);
    const at::Tensor bt = (bias.has_value() && bias->defined())
                              ? bias->to(acc).contiguous()
                              : at::zeros({g.C}, x.options().dtype(acc));
    peg_conv_residual<scalar_t>(x.const_data_ptr<scalar_t>(), g, wt.const_data_ptr<A>(),
                                bt.const_data_ptr<A>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// One pass over grad_out and x: grad_x rows (flipped taps over grad_out, plus grad_out) and
// per-chunk partial sums of grad_weight and grad_bias, then a fixed-order reduction.
template <typename T>
void peg_backward_fused(const T* g_ptr, const T* x_ptr, const Geometry& gg, const Geometry& gx,
                        const acc_t<T>* wt_flip, std::array<bool, 3> mask, T* grad_x,
                        acc_t<T>* gw_out, acc_t<T>* gb_out) {
  using A = acc_t<T>;
  const bool want_x = mask[0], want_w = mask[1], want_b = mask[2];
  if (want_x) copy_prefix(g_ptr, gg, grad_x);
  const int64_t rows = gx.B * gx.H;
  const int64_t nchunks = std::min<int64_t>(rows, kMaxChunks);
  if (nchunks == 0) return;
  const int64_t per = (rows + nchunks - 1) / nchunks;
  const int64_t kk = gx.kh * gx.kw, C = gx.C, W = gx.W;
  std::vector<A> part_w(want_w ? nchunks * kk * C : 0, A(0));
  std::vector<A> part_b(want_b ? nchunks * C : 0, A(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t cbeg, int64_t cend) {
    RowRing<T> xring(gx, x_ptr);
    RowRing<T> gring(gg, g_ptr);
    std::vector<const A*> x_rows(gx.kh), g_rows(gx.kh);
    const A* zero_bias = wt_flip + kk * C;  // a row of zeros after the taps
    std::vector<A> tmp(std::is_same_v<T, A> || !want_x ? 0 : W * C);
    for (int64_t k = cbeg; k < cend; ++k) {
      for (int64_t r = k * per; r < std::min(rows, (k + 1) * per); ++r) {
        const int64_t b = r / gx.H, h = r % gx.H;
        for (int64_t i = 0; i < gx.kh; ++i) {
          const int64_t hh = h + i - gx.ph;
          const bool valid = hh >= 0 && hh < gx.H;
          x_rows[i] = !want_w ? nullptr : valid ? xring.get(b, hh) : xring.zeros();
          g_rows[i] = !(want_x || i == gx.ph) ? nullptr : valid ? gring.get(b, hh) : gring.zeros();
        }
        const A* g_center = g_rows[gx.ph] + gx.pw * C;
        if (want_x) {
          T* out_row = grad_x + (b * gx.N + gx.P + h * W) * C;
          if constexpr (std::is_same_v<T, A>) {
            conv_row_dispatch<A>(g_rows.data(), gx.kh, gx.kw, wt_flip, zero_bias, W, C,
                                 out_row);
          } else {
            conv_row_dispatch<A>(g_rows.data(), gx.kh, gx.kw, wt_flip, zero_bias, W, C,
                                 tmp.data());
            at::vec::convert(tmp.data(), out_row, W * C);
          }
        }
        if (want_w || want_b) {
          weight_grad_row<A>(x_rows.data(), gx.kh, gx.kw, g_center, W, C,
                             want_w ? part_w.data() + k * kk * C : nullptr,
                             want_b ? part_b.data() + k * C : nullptr);
        }
      }
    }
  });
  // Fixed-order reduction over chunks.
  at::parallel_for(0, kk + 1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const bool is_bias = t == kk;
      if (is_bias ? !want_b : !want_w) continue;
      A* dst = is_bias ? gb_out : gw_out + t * C;
      const A* src = is_bias ? part_b.data() : part_w.data() + t * C;
      const int64_t step = is_bias ? C : kk * C;
      for (int64_t k = 0; k < nchunks; ++k) {
        for (int64_t c = 0; c < C; ++c) dst[c] += src[k * step + c];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> peg_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight, int64_t H,
    int64_t W, int64_t P, std::array<bool, 3> output_mask) {
  check_backward_inputs(grad_out_in, x_in, weight, H, W, P);
  const at::Tensor grad_out = channels_contiguous(grad_out_in);
  const at::Tensor x = channels_contiguous(x_in);
  const Geometry gx = make_geometry(x, weight, H, W, P);
  const Geometry gg = make_geometry(grad_out, weight, H, W, P);
  const int64_t C = gx.C, kh = gx.kh, kw = gx.kw;
  // Masked-out outputs are distinct empty tensors (outputs must not alias one another).
  at::Tensor grad_x = output_mask[0] ? at::empty({gx.B, gx.N, C}, x.options())
                                      : at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, x.options()), grad_b = at::empty({0}, x.options());
  const bool want_params = output_mask[1] || output_mask[2];
  if (!output_mask[0] && !want_params) return {grad_x, grad_w, grad_b};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peg_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    // Flipped taps (kh*kw, C) followed by one row of zeros that serves as the (absent) bias.
    const at::Tensor wt = at::zeros({kh * kw + 1, C}, x.options().dtype(acc));
    wt.narrow(0, 0, kh * kw).copy_(taps_by_channel(weight, acc, /*flip=*/true));
    at::Tensor gw = at::zeros({kh * kw, C}, x.options().dtype(acc));
    at::Tensor gb = at::zeros({C}, x.options().dtype(acc));
    if (gx.B > 0 && C > 0) {
      peg_backward_fused<scalar_t>(
          grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gg, gx,
          wt.const_data_ptr<A>(), output_mask,
          output_mask[0] ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
          gw.mutable_data_ptr<A>(), gb.mutable_data_ptr<A>());
    }
    if (output_mask[1]) {
      grad_w = gw.t().reshape({C, 1, kh, kw}).to(weight.scalar_type()).contiguous();
    }
    if (output_mask[2]) grad_b = gb.to(x.scalar_type());
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace cpvt

TORCH_LIBRARY_IMPL(cpvt, CPU, m) {
  m.impl("peg_forward", &cpvt::peg_forward_cpu);
  m.impl("peg_backward", &cpvt::peg_backward_cpu);
}
