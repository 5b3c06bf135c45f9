// Streaming CUDA kernels of the fused PEG for square kernels of fixed size K (1 or 3) on the
// vector path (no ATen here; peg_launch.cuh launches them, bench/cuda_micro builds them alone).
//
// A thread owns one vector of VEC channels of one pixel column w and walks down a strip of rh
// output rows (rh <= RH, RH a compile-time bound). Each input row is read once per strip as K
// vectors (columns w - K/2 .. w + K/2) and converted to the accumulation type; the K output rows
// it feeds are accumulated in registers (the loops are unrolled, so only K accumulators are live
// at a time), and an output row is stored as soon as its last input row has been added. The
// loads run PF input rows ahead of the arithmetic (PF = 1 in the package's launches;
// bench/cuda_micro times deeper ones), so they are in flight during it. No shared memory and no
// barriers in the forward: the horizontal halo (columns w +- K/2) is loaded by the neighbouring
// threads of the same block, so it comes from L1; the vertical halo of a strip (K - 1 rows) is
// the only re-read, from L2.
//
// Blocks are (cv vectors) x (wb pixels of a row): threadIdx.x walks channels, so a warp reads
// contiguous bytes. The grid is (channel chunk, pixel block, row slot); the rows (image, strip)
// are dealt to the row slots in turn: slot, slot + row_slots, ...
//
// The forward adds the bias, the taps (the zero padding is multiplied like any input, so an Inf
// or NaN tap gives NaN next to the border as in the reference) and the residual in the same
// order as conv_tile in peg_kernel.cuh: tap rows in order, tap columns in order, the residual
// right after the centre tap. The input gradient (flipped taps over grad_out, no bias) skips the
// taps on padding: they stand for outputs that do not exist.
//
// The backward also sums grad_weight and grad_bias: grad_out(h, w) * x(h + i - K/2, w + j - K/2)
// over the strip's pixels, in registers, with x read K/2 rows behind grad_out so that a window
// of the last K grad_out vectors is all it keeps. At the end each block adds its threads' sums
// over threadIdx.y in shared memory in a fixed order and writes one slot of partials; the
// reduction of peg_kernel.cuh sums the slots in a fixed order: bitwise reproducible.
//
// The per-thread bodies are __host__ __device__ so that tests/cpp/test_stream_emulated.cpp can
// run them on the CPU, thread by thread and block by block, with the same index arithmetic.
#pragma once

#include "peg_kernel.cuh"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace cpvt {
namespace peg_cuda {

constexpr int kStreamThreads = 256;
constexpr int kStreamMaxRows = 8;  // RH: output rows per strip at most

// Channels per thread: the forward reads 8-byte vectors of the 16-bit types (16-byte ones take
// 172 registers) and 16-byte vectors of float32 and float64; the backward, which also holds
// K*K + 1 sums per channel, half as many.
template <typename T>
struct StreamVec {
  static constexpr int kForward = sizeof(T) == 8 ? 2 : 4;
  static constexpr int kBackward = sizeof(T) == 8 ? 1 : 2;
};

struct StreamGeometry {
  int64_t B, N, C, P;
  int H, W;
  int nvec;             // vectors per token (C / VEC)
  int cv, wb;           // block: cv vectors (threadIdx.x) by wb pixels of a row (threadIdx.y)
  int chunks, wblocks;  // blocks across the channels and across a row
  int rh, strips;       // output rows per strip (the last strip may have fewer), strips per image
  int rows;             // B * strips (the launcher checks that it fits)
  int64_t row_slots;    // grid extent along the rows
  int64_t conv_blocks;  // chunks * wblocks * row_slots; the prefix-copy blocks follow
};

template <typename T>
struct StreamForwardArgs {
  const T* src;  // x, or grad_out for the input gradient alone
  int64_t sb, st;
  Params<T> p;
  T* out;  // contiguous (B, N, C)
  StreamGeometry g;
};

template <typename T>
struct StreamBackwardArgs {
  const T* grad;
  int64_t g_sb, g_st;
  const T* x;
  int64_t x_sb, x_st;
  Params<T> p;
  T* grad_x;           // contiguous (B, N, C), or nullptr
  acc_t<T>* partials;  // (wblocks * row_slots, K*K + 1, C)
  StreamGeometry g;
};

// Host: block shape and grid of a streaming launch, one row (image, strip) per row slot. Strips
// are as even as possible with at most `max_rows` rows each (14 rows: 2 x 7; 24: 3 x 8).
inline StreamGeometry plan_stream(int64_t B, int64_t N, int64_t C, int64_t H, int64_t W,
                                  int64_t P, int vec, int max_rows) {
  StreamGeometry g{};
  g.B = B; g.N = N; g.C = C; g.P = P;
  g.H = static_cast<int>(H); g.W = static_cast<int>(W);
  g.nvec = static_cast<int>(C / vec);
  g.chunks = (g.nvec + 31) / 32;
  g.cv = (g.nvec + g.chunks - 1) / g.chunks;
  const int max_wb = std::max(1, kStreamThreads / g.cv);
  g.wblocks = (g.W + max_wb - 1) / max_wb;
  g.wb = (g.W + g.wblocks - 1) / g.wblocks;
  g.strips = (g.H + max_rows - 1) / max_rows;
  g.rh = (g.H + g.strips - 1) / g.strips;
  g.strips = (g.H + g.rh - 1) / g.rh;
  g.rows = static_cast<int>(std::min<int64_t>(B * g.strips, int64_t(1) << 30));
  g.row_slots = g.rows;
  g.conv_blocks = int64_t(g.chunks) * g.wblocks * g.row_slots;
  return g;
}

// Host: `slots` row slots (clamped to [1, rows]); each then loops over rows / slots rows.
inline void set_row_slots(StreamGeometry& g, int64_t slots) {
  g.row_slots = std::max<int64_t>(1, std::min<int64_t>(slots, g.rows));
  g.conv_blocks = int64_t(g.chunks) * g.wblocks * g.row_slots;
}

// Host: prefix-copy blocks, a few vectors per thread.
inline int64_t stream_prefix_blocks(const StreamGeometry& g) {
  if (g.P == 0) return 0;
  const int64_t per_block = int64_t(g.cv) * g.wb * 4;
  return std::min<int64_t>(ceil_div(g.B * g.P * g.nvec, per_block), 4096);
}

// The position of conv block `blk` in the grid.
struct StreamBlock {
  int chunk, wblk;
  int64_t slot;
};

// Grids stay below 2^31 blocks, so 32-bit division does.
CPVT_HD inline StreamBlock stream_block(const StreamGeometry& g, int64_t blk) {
  const unsigned u = static_cast<unsigned>(blk);
  const unsigned rest = u / unsigned(g.chunks);
  StreamBlock sb;
  sb.chunk = static_cast<int>(u - rest * unsigned(g.chunks));
  sb.slot = rest / unsigned(g.wblocks);
  sb.wblk = static_cast<int>(rest - static_cast<unsigned>(sb.slot) * unsigned(g.wblocks));
  return sb;
}

// A vector as 32-bit words, through the read-only cache; zero when !ok (the padding).
template <int NW>
CPVT_HD inline void load_words(uint32_t (&d)[NW], const void* p, bool ok) {
  static_assert(NW == 1 || NW == 2 || NW == 4, "vectors are 4, 8 or 16 bytes");
#if defined(__CUDA_ARCH__)
  if constexpr (NW == 4) {
    uint4 v = make_uint4(0, 0, 0, 0);
    if (ok) v = __ldg(reinterpret_cast<const uint4*>(p));
    d[0] = v.x; d[1] = v.y; d[2] = v.z; d[3] = v.w;
  } else if constexpr (NW == 2) {
    uint2 v = make_uint2(0, 0);
    if (ok) v = __ldg(reinterpret_cast<const uint2*>(p));
    d[0] = v.x; d[1] = v.y;
  } else {
    d[0] = ok ? __ldg(reinterpret_cast<const unsigned int*>(p)) : 0u;
  }
#else
  for (int k = 0; k < NW; ++k) d[k] = 0;
  if (ok) std::memcpy(d, p, sizeof(d));
#endif
}

template <typename T>
CPVT_HD inline T load_ro(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

template <typename T, int VEC, int NW>
CPVT_HD inline void words_to_acc(acc_t<T> (&dst)[VEC], const uint32_t (&w)[NW]) {
  static_assert(sizeof(Pack<T, VEC>) == 4 * NW, "a vector is NW words");
  Pack<T, VEC> v;
  memcpy(&v, w, sizeof(v));
#pragma unroll
  for (int e = 0; e < VEC; ++e) dst[e] = static_cast<acc_t<T>>(v.v[e]);
}

// The VEC values rounded to T and stored as one vector (the inverse of load_words).
template <typename T, int VEC>
CPVT_HD inline void store_acc(T* p, const acc_t<T> (&acc)[VEC]) {
  Pack<T, VEC> o;
#pragma unroll
  for (int e = 0; e < VEC; ++e) o.v[e] = static_cast<T>(acc[e]);
  store_pack(p, o);
}

// Shared memory of the staged taps: (K*K + 1) rows (the taps, then the bias) of the block's
// cv * VEC channels, in the accumulation type.
template <typename T>
CPVT_HD inline int64_t stream_taps_bytes(const StreamGeometry& g, int vec, int k) {
  return (int64_t(k * k + 1) * g.cv * vec * static_cast<int64_t>(sizeof(acc_t<T>)) + 15) / 16 * 16;
}

template <typename T>
inline int64_t stream_forward_smem(const StreamGeometry& g, int vec, int k) {
  return stream_taps_bytes<T>(g, vec, k);
}

template <typename T>
inline int64_t stream_backward_smem(const StreamGeometry& g, int vec, int k) {
  return stream_taps_bytes<T>(g, vec, k) +
         int64_t(g.cv) * g.wb * vec * static_cast<int64_t>(sizeof(acc_t<T>));
}

// Thread `tid` of `nthreads` of conv block `blk` copies its share of the block's taps (flipped
// for the input gradient) and bias (zero without one) to ws[tap * cv * VEC + channel], reading
// the weight in its own order so that a warp's loads are contiguous.
template <typename T, int VEC, int K>
CPVT_HD inline void stream_stage_taps(acc_t<T>* ws, const Params<T>& p, const StreamGeometry& g,
                                      int64_t blk, bool flip, int tid, int nthreads) {
  using A = acc_t<T>;
  constexpr int KK = K * K;
  const int chunk = static_cast<int>(static_cast<uint64_t>(blk) % unsigned(g.chunks));
  const int nch = std::min(g.cv, g.nvec - chunk * g.cv) * VEC;
  const int64_t c_first = int64_t(chunk) * g.cv * VEC;
  const int stride = g.cv * VEC;
  for (int e = tid; e < (KK + 1) * nch; e += nthreads) {
    const int cl = e / (KK + 1), tap = e - cl * (KK + 1);
    const int64_t c = c_first + cl;
    A v = A(0);
    if (tap < KK) {
      const int src = flip ? KK - 1 - tap : tap;
      const int i = src / K, j = src - i * K;
      v = static_cast<A>(load_ro(p.weight + c * p.w_sc + i * p.w_si + j * p.w_sj));
    } else if (p.bias != nullptr) {
      v = static_cast<A>(load_ro(p.bias + c * p.b_s));
    }
    ws[tap * stride + cl] = v;
  }
}

// The thread's VEC values of staged row `tap` (channel vector tx of the block).
template <typename A, int VEC>
CPVT_HD inline void load_staged(A (&dst)[VEC], const A* ws, int tap, int stride, int tx) {
  const Pack<A, VEC> v = *reinterpret_cast<const Pack<A, VEC>*>(ws + tap * stride + tx * VEC);
#pragma unroll
  for (int e = 0; e < VEC; ++e) dst[e] = v.v[e];
}

// out[b, p, :] = src[b, p, :] for p < P: thread `tid` of `nthreads` in block `rank` of
// `nblocks` prefix blocks.
template <typename T, int VEC>
CPVT_HD inline void stream_copy_prefix(const T* src, int64_t sb, int64_t st, T* out,
                                       const StreamGeometry& g, int64_t rank, int64_t nblocks,
                                       int tid, int nthreads) {
  using V = Pack<T, VEC>;
  const int64_t total = g.B * g.P * g.nvec;
  for (int64_t e = rank * nthreads + tid; e < total; e += nblocks * nthreads) {
    const int64_t v = e % g.nvec, bp = e / g.nvec;
    const int64_t p = bp % g.P, b = bp / g.P;
    *reinterpret_cast<V*>(out + (b * g.N + p) * g.C + v * VEC) =
        *reinterpret_cast<const V*>(src + b * sb + p * st + v * VEC);
  }
}

// One strip of one image for one thread: output rows h0 .. h0 + rh of column w (rh <= RH; the
// forward when FWD, else the input gradient). src and out point at (image b, channel c0). The
// loads run PF input rows ahead of the arithmetic (PF + 1 row buffers in registers).
template <typename T, int VEC, int K, int RH, bool FWD, int PF = 1>
CPVT_HD inline void stream_strip(const T* src, int64_t st, T* out, const StreamGeometry& g,
                                 int h0, int rh, int w, const acc_t<T> (&wt)[K * K][VEC],
                                 const acc_t<T> (&bias)[VEC]) {
  using A = acc_t<T>;
  constexpr int PAD = K / 2, NQ = RH + K - 1;
  constexpr int NW = static_cast<int>(VEC * sizeof(T) / 4);
  bool col_ok[K];
#pragma unroll
  for (int j = 0; j < K; ++j) col_ok[j] = static_cast<unsigned>(w - PAD + j) < unsigned(g.W);
  // Input rows h0 - PAD .. h0 + rh + PAD, clipped to the image.
  const int r_end = std::min(g.H, h0 + rh + PAD);
  // Token of input row h0 - PAD (image row; may be outside), column w.
  const T* base = src + (g.P + int64_t(h0 - PAD) * g.W + w) * st;
  const int64_t row_step = int64_t(g.W) * st;
  static_assert(PF >= 1, "the loads run at least one row ahead");
  constexpr int NB = PF + 1;  // row buffers
  A acc[RH][VEC];
  uint32_t raw[NB][K][NW];
  // Input row q of the strip into its buffer, q % NB (every index is a constant once unrolled).
  auto load_row = [&](int q) {
    const int r = h0 - PAD + q;
    const T* rp = base + q * row_step;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      load_words<NW>(raw[q % NB][j], rp + (j - PAD) * st, r >= 0 && r < r_end && col_ok[j]);
    }
  };
#pragma unroll
  for (int q = 0; q < NQ; ++q) {
    if (q == 0) {
#pragma unroll
      for (int f = 0; f < PF; ++f) {
        if (f < NQ) load_row(f);
      }
    }
    if (q + PF < NQ) load_row(q + PF);  // in flight during the arithmetic of the rows before
    const int r = h0 - PAD + q;
    const bool rv = r >= 0 && r < g.H;
    A xin[K][VEC];
#pragma unroll
    for (int j = 0; j < K; ++j) words_to_acc<T, VEC, NW>(xin[j], raw[q % NB][j]);
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int o = q - i;  // the strip's output row that tap row i of this input row feeds
      if (o < 0 || o >= RH) continue;
      if (i == 0) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[o][e] = bias[e];
      }
      if (FWD || rv) {
#pragma unroll
        for (int j = 0; j < K; ++j) {
          if (FWD || col_ok[j]) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[o][e] += wt[i * K + j][e] * xin[j][e];
          }
          if (i == PAD && j == PAD) {  // the residual: the centre input of output row o
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[o][e] += xin[PAD][e];
          }
        }
      }
    }
    const int o = q - (K - 1);  // complete now
    if (o >= 0 && o < rh && h0 + o < g.H) {
      store_acc<T, VEC>(out + (g.P + int64_t(h0 + o) * g.W + w) * g.C, acc[o]);
    }
  }
}

// Thread (tx, ty) of conv block `blk` of the forward (FWD) or of the input gradient alone, the
// block's taps staged in ws.
template <typename T, int VEC, int K, int RH, bool FWD, int PF = 1>
CPVT_HD inline void stream_forward_thread(const StreamForwardArgs<T>& a, const acc_t<T>* ws,
                                          int64_t blk, int tx, int ty) {
  using A = acc_t<T>;
  constexpr int KK = K * K;
  const StreamGeometry& g = a.g;
  const StreamBlock sb = stream_block(g, blk);
  const int vi = sb.chunk * g.cv + tx;
  const int w = sb.wblk * g.wb + ty;
  if (vi >= g.nvec || w >= g.W) return;
  const int64_t c0 = int64_t(vi) * VEC;
  A wt[KK][VEC], bias[VEC];
#pragma unroll
  for (int t = 0; t < KK; ++t) load_staged<A, VEC>(wt[t], ws, t, g.cv * VEC, tx);
  load_staged<A, VEC>(bias, ws, KK, g.cv * VEC, tx);
  for (int row = static_cast<int>(sb.slot); row < g.rows; row += static_cast<int>(g.row_slots)) {
    const int b = row / g.strips;
    const int h0 = (row - b * g.strips) * g.rh;
    stream_strip<T, VEC, K, RH, FWD, PF>(a.src + b * a.sb + c0, a.st,
                                         a.out + int64_t(b) * g.N * g.C + c0, g, h0, g.rh, w,
                                         wt, bias);
  }
}

// Thread (tx, ty) of backward conv block `blk`: grad_x of its column strips (when a.grad_x is
// set) and its sums of grad_weight (dw) and grad_bias (db); zero sums for threads past the
// channels or the row. The loads run PF rows ahead (PF + 1 row buffers of each input).
template <typename T, int VEC, int K, int RH, int PF = 1>
CPVT_HD inline void stream_backward_thread(const StreamBackwardArgs<T>& a, const acc_t<T>* ws,
                                           int64_t blk, int tx, int ty,
                                           acc_t<T> (&dw)[K * K][VEC], acc_t<T> (&db)[VEC]) {
  using A = acc_t<T>;
  constexpr int PAD = K / 2, KK = K * K;
  constexpr int NQ = RH + K - 1;  // grad_out rows a strip reads
  constexpr int NI = NQ + PAD;    // iterations: x runs PAD rows behind grad_out
  constexpr int NW = static_cast<int>(VEC * sizeof(T) / 4);
  const StreamGeometry& g = a.g;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    db[e] = A(0);
#pragma unroll
    for (int t = 0; t < KK; ++t) dw[t][e] = A(0);
  }
  const StreamBlock sb = stream_block(g, blk);
  const int vi = sb.chunk * g.cv + tx;
  const int w = sb.wblk * g.wb + ty;
  if (vi >= g.nvec || w >= g.W) return;
  const int64_t c0 = int64_t(vi) * VEC;
  const bool want_x = a.grad_x != nullptr;
  A wt[KK][VEC];  // flipped taps, staged only when grad_x is wanted
#pragma unroll
  for (int t = 0; t < KK; ++t) {
    if (want_x) {
      load_staged<A, VEC>(wt[t], ws, t, g.cv * VEC, tx);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) wt[t][e] = A(0);
    }
  }
  bool col_ok[K];
#pragma unroll
  for (int j = 0; j < K; ++j) col_ok[j] = static_cast<unsigned>(w - PAD + j) < unsigned(g.W);

  for (int row = static_cast<int>(sb.slot); row < g.rows; row += static_cast<int>(g.row_slots)) {
    const int b = row / g.strips;
    const int h0 = (row - b * g.strips) * g.rh;
    const int rh = std::min(g.rh, g.H - h0);
    // Rows h0 - PAD .. h0 + rh + PAD of the image, clipped; row q of the strip is image row
    // h0 - PAD + q, for grad_out (read at iteration q) and x (read at iteration q + PAD).
    const int r_end = std::min(g.H, h0 + rh + PAD);
    const T* gbase = a.grad + b * a.g_sb + c0 + (g.P + int64_t(h0 - PAD) * g.W + w) * a.g_st;
    const T* xbase = a.x + b * a.x_sb + c0 + (g.P + int64_t(h0 - PAD) * g.W + w) * a.x_st;
    const int64_t g_step = int64_t(g.W) * a.g_st, x_step = int64_t(g.W) * a.x_st;
    T* gx = want_x ? a.grad_x + int64_t(b) * g.N * g.C + c0 : nullptr;

    A acc[RH][VEC];  // grad_x of the strip's rows (K live at a time)
    A gc[NQ][VEC];   // grad_out at column w (K live at a time)
    static_assert(PF >= 1, "the loads run at least one row ahead");
    constexpr int NB = PF + 1;  // row buffers of each input
    uint32_t graw[NB][K][NW], xraw[NB][K][NW];
#pragma unroll
    for (int it = 0; it < NI; ++it) {
      // Loads: grad_out row it + PF and x row it + PF - PAD (rows 0 .. PF of each before the
      // first iteration).
#pragma unroll
      for (int q = it == 0 ? 0 : it + PF; q <= it + PF; ++q) {
        if (q >= NQ) continue;
        const int r = h0 - PAD + q;
        const bool rv = r >= 0 && r < r_end;
        const T* rp = gbase + q * g_step;
#pragma unroll
        for (int j = 0; j < K; ++j) {
          // Only the centre column unless grad_x is wanted.
          load_words<NW>(graw[q % NB][j], rp + (j - PAD) * a.g_st,
                         rv && col_ok[j] && (want_x || j == PAD));
        }
      }
#pragma unroll
      for (int qx = it == 0 ? -PAD : it + PF - PAD; qx <= it + PF - PAD; ++qx) {
        if (qx < 0 || qx >= NQ) continue;
        const int r = h0 - PAD + qx;
        const bool rv = r >= 0 && r < r_end;
        const T* rp = xbase + qx * x_step;
#pragma unroll
        for (int j = 0; j < K; ++j) {
          load_words<NW>(xraw[qx % NB][j], rp + (j - PAD) * a.x_st, rv && col_ok[j]);
        }
      }
      if (it < NQ) {  // grad_out row q = it
        const int q = it;
        const bool rv = h0 - PAD + q >= 0 && h0 - PAD + q < g.H;
        A gin[K][VEC];
#pragma unroll
        for (int j = 0; j < K; ++j) words_to_acc<T, VEC, NW>(gin[j], graw[q % NB][j]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) gc[q][e] = gin[PAD][e];
        // The bias gradient: the strip's own rows, q in [PAD, PAD + rh).
        if (q >= PAD && q - PAD < rh) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) db[e] += gin[PAD][e];
        }
        if (want_x) {
#pragma unroll
          for (int i = 0; i < K; ++i) {
            const int o = q - i;
            if (o < 0 || o >= RH) continue;
            if (i == 0) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[o][e] = A(0);
            }
            if (rv) {
#pragma unroll
              for (int j = 0; j < K; ++j) {
                if (col_ok[j]) {
#pragma unroll
                  for (int e = 0; e < VEC; ++e) acc[o][e] += wt[i * K + j][e] * gin[j][e];
                }
                if (i == PAD && j == PAD) {
#pragma unroll
                  for (int e = 0; e < VEC; ++e) acc[o][e] += gin[PAD][e];
                }
              }
            }
          }
          const int o = q - (K - 1);
          if (o >= 0 && o < rh) {
            store_acc<T, VEC>(gx + (g.P + int64_t(h0 + o) * g.W + w) * g.C, acc[o]);
          }
        }
      }
      if (it >= PAD) {
        // x row qx pairs with grad_out rows q = qx + PAD - i (tap row i); the strip's own are
        // q in [PAD, PAD + rh). Padding rows and columns of x are zeros and still multiply, so
        // an Inf or NaN in grad_out gives NaN as in the reference.
        const int qx = it - PAD;
        A xin[K][VEC];
#pragma unroll
        for (int j = 0; j < K; ++j) words_to_acc<T, VEC, NW>(xin[j], xraw[qx % NB][j]);
#pragma unroll
        for (int i = 0; i < K; ++i) {
          const int q = qx + PAD - i;
          if (q < PAD || q >= PAD + RH || q - PAD >= rh) continue;
#pragma unroll
          for (int j = 0; j < K; ++j) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) dw[i * K + j][e] += gc[q][e] * xin[j][e];
          }
        }
      }
    }
  }
}

// One round of the backward's block reduction: red holds value `t` (tap t < K*K, or the bias
// at K*K) of every thread as red[(ty * cv + tx) * VEC + e]; thread `tid` of `nthreads` writes
// the sums over ty, in order, to the block's slot of partials.
template <typename T, int VEC, int K>
CPVT_HD inline void stream_reduce_round(const StreamBackwardArgs<T>& a, const acc_t<T>* red,
                                        int64_t blk, int t, int tid, int nthreads) {
  using A = acc_t<T>;
  const StreamGeometry& g = a.g;
  const StreamBlock sb = stream_block(g, blk);
  const int64_t pslot = int64_t(sb.wblk) * g.row_slots + sb.slot;
  const int nch = std::min(g.cv, g.nvec - sb.chunk * g.cv) * VEC;  // channels of this chunk
  for (int q = tid; q < nch; q += nthreads) {
    A s = A(0);
    for (int y = 0; y < g.wb; ++y) s += red[y * g.cv * VEC + q];
    a.partials[(pslot * (K * K + 1) + t) * g.C + int64_t(sb.chunk) * g.cv * VEC + q] = s;
  }
}

#if defined(__CUDACC__)

// Dynamic shared memory: the staged taps (stream_taps_bytes), then in the backward the
// reduction's (wb, cv, VEC) values.

// Block blockIdx.x of the forward kernels below.
template <typename T, int VEC, int K, int RH, bool FWD, int PF>
__device__ __forceinline__ void stream_forward_block(const StreamForwardArgs<T>& a) {
  using A = acc_t<T>;
  const int64_t blk = blockIdx.x;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
  if (blk >= a.g.conv_blocks) {  // the whole block: no barrier below is skipped by part of it
    stream_copy_prefix<T, VEC>(a.src, a.sb, a.st, a.out, a.g, blk - a.g.conv_blocks,
                               int64_t(gridDim.x) - a.g.conv_blocks, tid, nthreads);
    return;
  }
  A* ws = reinterpret_cast<A*>(peg_smem);
  Params<T> p = a.p;
  if (!FWD) p.bias = nullptr;
  stream_stage_taps<T, VEC, K>(ws, p, a.g, blk, /*flip=*/!FWD, tid, nthreads);
  __syncthreads();
  stream_forward_thread<T, VEC, K, RH, FWD, PF>(a, ws, blk, threadIdx.x, threadIdx.y);
}

template <typename T, int VEC, int K, int RH, bool FWD, int PF = 1>
__global__ void __launch_bounds__(kStreamThreads) peg_stream_forward_kernel(
    const StreamForwardArgs<T> a) {
  stream_forward_block<T, VEC, K, RH, FWD, PF>(a);
}

// The same with at least MINB resident blocks per multiprocessor requested, which makes ptxas
// cap the registers at 65536 / (256 * MINB): bench/cuda_micro's variants. (A minimum of 1 is not
// the same as none: it took the bf16 forward from 128 registers to 158.)
template <typename T, int VEC, int K, int RH, bool FWD, int PF, int MINB>
__global__ void __launch_bounds__(kStreamThreads, MINB) peg_stream_forward_kernel_minb(
    const StreamForwardArgs<T> a) {
  stream_forward_block<T, VEC, K, RH, FWD, PF>(a);
}

// Block blockIdx.x of the backward kernels below.
template <typename T, int VEC, int K, int RH, int PF>
__device__ __forceinline__ void stream_backward_block(const StreamBackwardArgs<T>& a) {
  using A = acc_t<T>;
  constexpr int KK = K * K;
  const int64_t blk = blockIdx.x;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nthreads = blockDim.x * blockDim.y;
  if (blk >= a.g.conv_blocks) {
    stream_copy_prefix<T, VEC>(a.grad, a.g_sb, a.g_st, a.grad_x, a.g, blk - a.g.conv_blocks,
                               int64_t(gridDim.x) - a.g.conv_blocks, tid, nthreads);
    return;
  }
  A* ws = reinterpret_cast<A*>(peg_smem);
  A* red = reinterpret_cast<A*>(peg_smem + stream_taps_bytes<T>(a.g, VEC, K));  // (wb, cv, VEC)
  if (a.grad_x != nullptr) {
    Params<T> p = a.p;
    p.bias = nullptr;
    stream_stage_taps<T, VEC, K>(ws, p, a.g, blk, /*flip=*/true, tid, nthreads);
  }
  __syncthreads();
  A dw[KK][VEC], db[VEC];
  stream_backward_thread<T, VEC, K, RH, PF>(a, ws, blk, threadIdx.x, threadIdx.y, dw, db);
#pragma unroll
  for (int t = 0; t <= KK; ++t) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) red[tid * VEC + e] = t < KK ? dw[t < KK ? t : 0][e] : db[e];
    __syncthreads();
    stream_reduce_round<T, VEC, K>(a, red, blk, t, tid, nthreads);
    __syncthreads();
  }
}

template <typename T, int VEC, int K, int RH, int PF = 1>
__global__ void __launch_bounds__(kStreamThreads) peg_stream_backward_kernel(
    const StreamBackwardArgs<T> a) {
  stream_backward_block<T, VEC, K, RH, PF>(a);
}

// The same with at least MINB resident blocks per multiprocessor requested (registers capped at
// 65536 / (256 * MINB)): bench/cuda_micro's variants of the deeper prefetch, which at 130-145
// registers would otherwise leave room for one block of 256 threads a multiprocessor.
template <typename T, int VEC, int K, int RH, int PF, int MINB>
__global__ void __launch_bounds__(kStreamThreads, MINB) peg_stream_backward_kernel_minb(
    const StreamBackwardArgs<T> a) {
  stream_backward_block<T, VEC, K, RH, PF>(a);
}

#endif  // __CUDACC__

}  // namespace peg_cuda
}  // namespace cpvt

#undef CPVT_HD
