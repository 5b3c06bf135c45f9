// CUDA kernels of the fused PEG and their launch planning (no ATen here: peg_kernel.cu owns
// tensors, dispatch and registration).
//
// Layout. Tokens are channel-last (B, P + H*W, C) with any batch/token strides and channel
// stride 1. A thread moves one "vector" of VEC channels: 16 bytes (8 bf16/fp16, 4 fp32,
// 2 fp64) when C, the strides and the base pointer allow it, else one element.
//
// Forward. A block owns an output tile of TH x TW pixels of one image and a chunk of 2^cch_shift
// vectors (128 bytes of channels on the vector path). It copies the input tile plus its halo,
// clipped to the image, into shared memory (cp.async), so each input element crosses DRAM about
// once; the zero padding of the convolution is never stored but masked on read. Each thread
// then computes RW neighbouring output pixels of one vector, sliding a window of RW input
// vectors along each kernel row, so an input vector is read from shared memory
// (RW + kw - 1) / RW times per kernel row instead of kw times. The bias is the initial value of
// the accumulator and the residual is added with the centre tap. Extra blocks at the end of the
// grid copy the prefix tokens.
//
// Backward. grad_x is the forward with flipped taps over grad_out and no bias. The weight and
// bias gradients are sums over every pixel of grad_out times shifted x. Persistent blocks, one
// per (channel chunk, slot), loop over the tiles slot, slot + slots, ... and compute grad_x of
// each tile (when wanted) together with per-thread sums for grad_weight/grad_bias held in
// registers. At the end each block reduces its threads' sums in shared memory in a fixed order
// and writes one row of partials[slot][tap][c]; a second kernel sums the slots in a fixed order.
// No atomics anywhere, so the gradients are bitwise reproducible for a shape on a device.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Functions the host also compiles: the streaming kernels' per-thread bodies (run on the CPU by
// tests/cpp/test_stream_emulated.cpp) and store_pack.
#if defined(__CUDACC__)
#define CPVT_HD __host__ __device__
#else
#define CPVT_HD
#endif

namespace cpvt {
namespace peg_cuda {

constexpr int kMaxThreads = 256;
// Dynamic shared memory per block: the forward stays within the 48 KiB every device allows
// without opting in; the backward stages two tiles (grad_out and x) and opts in to up to
// 96 KiB (less where the device allows less).
constexpr int64_t kForwardSmemBudget = 48 * 1024 - 64;
constexpr int64_t kBackwardSmemBudget = 96 * 1024 - 64;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Stores a Pack at p with one instruction. Assigning the Pack, or storing its
// bits as a uint2, leaves nvcc free to split the store, and it does: an 8-byte vector of
// c10::BFloat16 went out as four 2-byte stores (sm_90 SASS of the streaming forward: STG.E.U16
// x 4 per output vector; float32 and the tiled kernels' 16-byte vectors: STG.E x 4), and a uint2
// as two 4-byte ones. A st.global of the whole vector keeps it one store (STG.E.64, STG.E.128);
// the __stwb intrinsics would too, but as strong stores (STG.E.64.STRONG.SM). double keeps the
// assignment (two 8-byte stores): as one 16-byte store its 3x3 streaming forward spills 8 bytes.
template <typename T, int N>
CPVT_HD inline void store_pack(T* p, const Pack<T, N>& o) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 8 || sizeof(o) < 4) {  // double; a single 16-bit value
    *reinterpret_cast<Pack<T, N>*>(p) = o;
  } else {
    constexpr int NW = static_cast<int>(sizeof(o) / 4);
    static_assert(sizeof(o) % 4 == 0 && (NW == 1 || NW == 2 || NW == 4),
                  "vectors are 4, 8 or 16 bytes");
    uint32_t w[NW];
    memcpy(w, &o, sizeof(o));
    if constexpr (NW == 4) {
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};"
                   :: "l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]) : "memory");
    } else if constexpr (NW == 2) {
      asm volatile("st.global.v2.b32 [%0], {%1, %2};" :: "l"(p), "r"(w[0]), "r"(w[1])
                   : "memory");
    } else {
      asm volatile("st.global.b32 [%0], %1;" :: "l"(p), "r"(w[0]) : "memory");
    }
  }
#else
  std::memcpy(p, &o, sizeof(o));
#endif
}

// Accumulator values in one 16-byte shared-memory load (weights are staged in acc_t).
template <typename A, int VEC>
constexpr int quad_width() {
  return VEC < static_cast<int>(16 / sizeof(A)) ? VEC : static_cast<int>(16 / sizeof(A));
}

// Shapes and tiling of one launch.
struct Geometry {
  int64_t B, N, C, P;
  int H, W, kh, kw;
  int TH, TW, tiles_h, tiles_w;  // output tile and tile counts per image
  int cch_shift;                 // a block's channel chunk is 2^cch_shift vectors
  int64_t nvec;                  // vectors per token (C / VEC)
  int64_t chunks;                // channel chunks per token
};

// Weight (C, 1, kh, kw) and bias (C,) of any strides, read once per block.
template <typename T>
struct Params {
  const T* weight;
  int64_t w_sc, w_si, w_sj;  // strides of dims 0, 2 and 3
  const T* bias;             // nullptr when absent
  int64_t b_s;
};

template <typename T>
struct ForwardArgs {
  const T* src;  // x (forward) or grad_out (grad_x only)
  int64_t sb, st;
  Params<T> p;
  bool flip;     // flipped taps: the input gradient
  T* out;        // contiguous (B, N, C)
  Geometry g;
  int64_t conv_blocks;  // blocks before the prefix-copy blocks
  int ws_bytes;         // shared memory: staged taps, then the tile
};

template <typename T>
struct BackwardArgs {
  const T* grad;  // grad_out
  int64_t g_sb, g_st;
  const T* x;
  int64_t x_sb, x_st;
  Params<T> p;
  T* grad_x;  // contiguous (B, N, C), or nullptr when not wanted
  acc_t<T>* partials;  // (slots, kh*kw + 1, C)
  Geometry g;
  int64_t conv_blocks, slots, tiles_total;
  int ws_bytes, tile_bytes;  // shared memory: taps, grad_out tile, x tile
  int lanes, groups, seg_w;  // weight-gradient work split (see peg_backward_kernel)
};

#if defined(__CUDACC__)

extern __shared__ __align__(16) unsigned char peg_smem[];

// The input region a tile needs: output rows [h0, h0 + th) and columns [w0, w0 + tw) plus the
// halo, clipped to the image: rows [r0, r0 + rows), columns [c0, c0 + cols).
struct Tile {
  int h0, w0, th, tw;
  int r0, c0, rows, cols;
};

__device__ __forceinline__ Tile make_tile(int th_i, int tw_i, const Geometry& g, int ph, int pw) {
  Tile t;
  t.h0 = th_i * g.TH;
  t.th = std::min(g.TH, g.H - t.h0);
  t.w0 = tw_i * g.TW;
  t.tw = std::min(g.TW, g.W - t.w0);
  t.r0 = std::max(0, t.h0 - ph);
  t.rows = std::min(g.H, t.h0 + t.th + ph) - t.r0;
  t.c0 = std::max(0, t.w0 - pw);
  t.cols = std::min(g.W, t.w0 + t.tw + pw) - t.c0;
  return t;
}

template <typename V>
__device__ __forceinline__ void copy_to_smem(V* dst, const V* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(V) == 16) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
    return;
  }
#endif
  *dst = *src;
}

__device__ __forceinline__ void wait_smem_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Copies a tile region of one image's channel chunk into shared memory as
// s[(row * cols + col) << cch_shift | u]. src points at (image b, channel c_first).
template <typename T, int VEC>
__device__ __forceinline__ void stage_tile(Pack<T, VEC>* s, const T* src, int64_t st,
                                           const Geometry& g, const Tile& t, int nu) {
  using V = Pack<T, VEC>;
  const int sh = g.cch_shift;
  const int row_len = t.cols << sh;
  const int total = t.rows * row_len;
#pragma unroll 4
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int u = e & ((1 << sh) - 1);
    if (u >= nu) continue;
    const int r = e / row_len;
    const int col = (e - r * row_len) >> sh;
    const int64_t tok = g.P + static_cast<int64_t>(t.r0 + r) * g.W + (t.c0 + col);
    copy_to_smem(s + e, reinterpret_cast<const V*>(src + tok * st + static_cast<int64_t>(u) * VEC));
  }
}

// Stages the chunk's taps (optionally flipped) and bias as kh*kw + 1 "taps" in accumulation
// type, laid out so that a thread's VEC values are 16-byte loads and the 8 threads of a
// quarter warp read 128 contiguous bytes:
// ws[((tap * NP + part) << cch_shift | u) * QV + q] holds channel u * VEC + part * QV + q.
template <typename T, int VEC>
__device__ __forceinline__ void stage_taps(acc_t<T>* ws, const Params<T>& p, int kh, int kw,
                                           int64_t c_first, int cch_shift, int nu, bool flip) {
  using A = acc_t<T>;
  constexpr int QV = quad_width<A, VEC>();
  constexpr int NP = VEC / QV;
  const int kk = kh * kw, taps = kk + 1;
  const int total = (VEC << cch_shift) * taps;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int cl = e / taps, tap = e - cl * taps;
    const int u = cl / VEC, r = cl - u * VEC, part = r / QV, q = r - part * QV;
    A v = A(0);
    if (u < nu) {
      const int64_t c = c_first + cl;
      if (tap < kk) {
        const int src = flip ? kk - 1 - tap : tap;
        const int i = src / kw, j = src - i * kw;
        v = static_cast<A>(p.weight[c * p.w_sc + i * p.w_si + j * p.w_sj]);
      } else if (p.bias != nullptr) {
        v = static_cast<A>(p.bias[c * p.b_s]);
      }
    }
    ws[(((tap * NP + part) << cch_shift) | u) * QV + q] = v;
  }
}

template <typename A, int VEC>
__device__ __forceinline__ void load_taps(A (&dst)[VEC], const A* ws, int tap, int u,
                                          int cch_shift) {
  constexpr int QV = quad_width<A, VEC>();
  constexpr int NP = VEC / QV;
  const Pack<A, QV>* w = reinterpret_cast<const Pack<A, QV>*>(ws);
#pragma unroll
  for (int part = 0; part < NP; ++part) {
    const Pack<A, QV> v = w[((tap * NP + part) << cch_shift) | u];
#pragma unroll
    for (int q = 0; q < QV; ++q) dst[part * QV + q] = v.v[q];
  }
}

// One tap's VEC weights held in registers. 16-bit types keep them in their own type, two per
// 32-bit register (exact: the weights are of that type), which halves their register cost.
template <typename T, int VEC>
struct RegTap {
  using A = acc_t<T>;
  static constexpr bool kPacked = sizeof(T) == 2 && VEC % 2 == 0;
  static constexpr int kWords = kPacked ? VEC / 2 : VEC;
  std::conditional_t<kPacked, uint32_t, A> w[kWords];

  __device__ __forceinline__ void set(const A (&v)[VEC]) {
    if constexpr (kPacked) {
#pragma unroll
      for (int k = 0; k < kWords; ++k) {
        const T lo = static_cast<T>(v[2 * k]), hi = static_cast<T>(v[2 * k + 1]);
        w[k] = uint32_t(lo.x) | (uint32_t(hi.x) << 16);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kWords; ++k) w[k] = v[k];
    }
  }
  __device__ __forceinline__ void get(A (&v)[VEC]) const {
    if constexpr (kPacked) {
#pragma unroll
      for (int k = 0; k < kWords; ++k) {
        uint32_t word = w[k];
#if defined(__CUDA_ARCH__)
        asm volatile("" : "+r"(word));  // unpack at each use: hoisted, it would cost VEC registers
#endif
        v[2 * k] = static_cast<A>(T(static_cast<uint16_t>(word & 0xffffu), T::from_bits()));
        v[2 * k + 1] = static_cast<A>(T(static_cast<uint16_t>(word >> 16), T::from_bits()));
      }
    } else {
#pragma unroll
      for (int k = 0; k < kWords; ++k) v[k] = w[k];
    }
  }
};

// Vector at tile column `col` of a staged row (row already offset by u), zero outside the
// staged columns [c0, c0 + cols): the convolution's padding, or columns no valid output uses.
template <typename T, int VEC>
__device__ __forceinline__ void load_col(acc_t<T> (&dst)[VEC], const Pack<T, VEC>* row, int col,
                                         const Tile& t, int cch_shift) {
  if (static_cast<unsigned>(col - t.c0) < static_cast<unsigned>(t.cols)) {
    const Pack<T, VEC> v = row[(col - t.c0) << cch_shift];
#pragma unroll
    for (int e = 0; e < VEC; ++e) dst[e] = static_cast<acc_t<T>>(v.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) dst[e] = acc_t<T>(0);
  }
}

// out[h, w] = bias + in[h, w] + sum_{i,j} tap[i][j] * in[h + i - ph, w + j - pw] over a
// staged tile; out points at (image b, channel c_first). WREG keeps the thread's taps in
// registers (small kernels). `fwd` (the forward) starts from the staged bias and multiplies the
// zero padding like any input; without it (grad_x, the same sum over grad_out with flipped
// taps) taps that fall outside the grid are skipped, as the reference's gradient does: they
// stand for outputs that do not exist, and an Inf or NaN tap must not turn them into NaN. A
// run-time flag (constant where the caller's is): one copy of the loop per kernel.
template <typename T, int VEC, int KH, int KW, int RW, bool WREG>
__device__ __forceinline__ void conv_tile(const Pack<T, VEC>* s, const acc_t<T>* ws,
                                          const Tile& t, const Geometry& g, int nu, T* out,
                                          bool fwd) {
  using A = acc_t<T>;
  using V = Pack<T, VEC>;
  const int kh = KH > 0 ? KH : g.kh, kw = KW > 0 ? KW : g.kw;
  const int ph = kh / 2, pw = kw / 2;
  const int sh = g.cch_shift;
  const int u = threadIdx.x & ((1 << sh) - 1);
  if (u >= nu) return;
  constexpr int NW = WREG ? KH * KW : 1;
  RegTap<T, VEC> wr[NW];
  if constexpr (WREG) {
#pragma unroll
    for (int tap = 0; tap < NW; ++tap) {
      A v[VEC];
      load_taps<A, VEC>(v, ws, tap, u, sh);
      wr[tap].set(v);
    }
  }

  const int ngroups = (t.tw + RW - 1) / RW;
  const int items = t.th * ngroups;
  for (int it = threadIdx.x >> sh; it < items; it += blockDim.x >> sh) {
    const int lo = it / ngroups, qg = it - lo * ngroups;
    const int h = t.h0 + lo, wb = t.w0 + qg * RW;
    A acc[RW][VEC];
    {
      A bv[VEC];
      if (fwd) {
        load_taps<A, VEC>(bv, ws, kh * kw, u, sh);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) bv[e] = A(0);
      }
#pragma unroll
      for (int k = 0; k < RW; ++k) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[k][e] = bv[e];
      }
    }
#pragma unroll(KH > 0 ? KH : 1)
    for (int i = 0; i < kh; ++i) {
      const int hh = h + i - ph;
      if (hh < 0 || hh >= g.H) {
        // Padding rows: the forward adds their (tap * 0) terms after this loop; grad_x has no
        // output there to take a gradient from.
        continue;
      }
      const V* row = s + (((hh - t.r0) * t.cols) << sh) + u;
      // win[k] holds input column wb + k + j - pw while tap column j is applied.
      A win[RW][VEC];
#pragma unroll
      for (int k = 0; k < RW; ++k) load_col<T, VEC>(win[k], row, wb - pw + k, t, sh);
#pragma unroll(KW > 0 ? KW : 1)
      for (int j = 0; j < kw; ++j) {
        A wv[VEC];
        if constexpr (WREG) {
          wr[i * KW + j].get(wv);
        } else {
          load_taps<A, VEC>(wv, ws, i * kw + j, u, sh);
        }
#pragma unroll
        for (int k = 0; k < RW; ++k) {
          // grad_x skips taps on padding columns (see the rows above); the forward multiplies
          // their zeros.
          if (fwd || static_cast<unsigned>(wb - pw + k + j) < static_cast<unsigned>(g.W)) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[k][e] += wv[e] * win[k][e];
          }
        }
        if (i == ph && j == pw) {  // the residual: win[k] is the centre input here
#pragma unroll
          for (int k = 0; k < RW; ++k) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[k][e] += win[k][e];
          }
        }
        if (j + 1 < kw) {
#pragma unroll
          for (int k = 0; k + 1 < RW; ++k) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) win[k][e] = win[k + 1][e];
          }
          load_col<T, VEC>(win[RW - 1], row, wb - pw + j + RW, t, sh);
        }
      }
    }
    if (fwd) {
      // Forward, rows next to the grid's top or bottom: the padding rows' zeros count like any
      // other input, so an Inf or NaN tap there gives NaN as in the reference (tap * 0); finite
      // taps add exactly 0. Kept out of the loop above, whose registers it would otherwise cost.
      if (h < ph || h >= g.H - ph) {
#pragma unroll 1
        for (int i = 0; i < kh; ++i) {
          const int hh = h + i - ph;
          if (hh >= 0 && hh < g.H) continue;
#pragma unroll 1
          for (int j = 0; j < kw; ++j) {
            A wv[VEC];
            load_taps<A, VEC>(wv, ws, i * kw + j, u, sh);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              if (!isfinite(wv[e])) {
#pragma unroll
                for (int k = 0; k < RW; ++k) acc[k][e] = A(NAN);
              }
            }
          }
        }
      }
    }
    T* orow = out + (g.P + static_cast<int64_t>(h) * g.W) * g.C + static_cast<int64_t>(u) * VEC;
#pragma unroll
    for (int k = 0; k < RW; ++k) {
      const int w = wb + k;
      if (w < t.w0 + t.tw) {
        V o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) o.v[e] = static_cast<T>(acc[k][e]);
        store_pack(orow + static_cast<int64_t>(w) * g.C, o);
      }
    }
  }
}

// out[b, p, :] = src[b, p, :] for p < P, by blocks rank .. of nblocks.
template <typename T, int VEC>
__device__ __forceinline__ void copy_prefix(const T* src, int64_t sb, int64_t st, T* out,
                                            const Geometry& g, int64_t rank, int64_t nblocks) {
  using V = Pack<T, VEC>;
  const int64_t total = g.B * g.P * g.nvec;
  for (int64_t e = rank * blockDim.x + threadIdx.x; e < total; e += nblocks * blockDim.x) {
    const int64_t v = e % g.nvec, bp = e / g.nvec;
    const int64_t p = bp % g.P, b = bp / g.P;
    *reinterpret_cast<V*>(out + (b * g.N + p) * g.C + v * VEC) =
        *reinterpret_cast<const V*>(src + b * sb + p * st + v * VEC);
  }
}

template <typename T, int VEC, int KH, int KW, int RW>
__global__ void __launch_bounds__(kMaxThreads) peg_forward_kernel(const ForwardArgs<T> a) {
  using A = acc_t<T>;
  using V = Pack<T, VEC>;
  constexpr bool WREG = KH > 0 && KH * KW * RegTap<T, VEC>::kWords <= 36;
  const Geometry& g = a.g;
  int64_t blk = blockIdx.x;
  if (blk >= a.conv_blocks) {
    copy_prefix<T, VEC>(a.src, a.sb, a.st, a.out, g, blk - a.conv_blocks,
                        static_cast<int64_t>(gridDim.x) - a.conv_blocks);
    return;
  }
  const int kh = KH > 0 ? KH : g.kh, kw = KW > 0 ? KW : g.kw;
  const int tw_i = static_cast<int>(blk % g.tiles_w);
  blk /= g.tiles_w;
  const int th_i = static_cast<int>(blk % g.tiles_h);
  blk /= g.tiles_h;
  const int64_t chunk = blk % g.chunks, b = blk / g.chunks;
  const int nu = static_cast<int>(std::min<int64_t>(int64_t(1) << g.cch_shift,
                                                    g.nvec - (chunk << g.cch_shift)));
  const int64_t c_first = (chunk << g.cch_shift) * VEC;

  A* ws = reinterpret_cast<A*>(peg_smem);
  V* s = reinterpret_cast<V*>(peg_smem + a.ws_bytes);
  const Tile t = make_tile(th_i, tw_i, g, kh / 2, kw / 2);
  stage_tile<T, VEC>(s, a.src + b * a.sb + c_first, a.st, g, t, nu);
  stage_taps<T, VEC>(ws, a.p, kh, kw, c_first, g.cch_shift, nu, a.flip);
  wait_smem_copies();
  __syncthreads();
  // The input gradient (flip) skips the taps on padding, as the fused backward does: an Inf or
  // NaN tap times a padding zero must not give NaN there.
  T* out = a.out + b * g.N * g.C + c_first;
  conv_tile<T, VEC, KH, KW, RW, WREG>(s, ws, t, g, nu, out, /*fwd=*/!a.flip);
}

// Sums of grad_out(h, w) * x(h + i - ph, w + j - pw) over the tile for the thread's lane:
// vector u, tap row i, tap columns j = jg * JW + [0, JW) (taps past kw accumulate garbage that
// is never written), over the row segments unit = rg, rg + groups, ... Also sums grad_out
// (the bias gradient; meaningful in the lanes with i == ph, whose x row is always valid).
template <typename T, int VEC, int KH, int KW, int JW>
__device__ __forceinline__ void wgrad_tile(const Pack<T, VEC>* sg, const Pack<T, VEC>* sx,
                                           const Tile& t, const Geometry& g, int u, int i,
                                           int jg, int rg, int groups, int seg_w,
                                           acc_t<T> (&acc)[JW][VEC], acc_t<T> (&bacc)[VEC]) {
  using A = acc_t<T>;
  using V = Pack<T, VEC>;
  const int kh = KH > 0 ? KH : g.kh, kw = KW > 0 ? KW : g.kw;
  const int ph = kh / 2, pw = kw / 2;
  const int sh = g.cch_shift;
  const int nseg = (t.tw + seg_w - 1) / seg_w;
  const int units = t.th * nseg;
  for (int unit = rg; unit < units; unit += groups) {
    const int lo = unit / nseg, sgi = unit - lo * nseg;
    const int h = t.h0 + lo, hx = h + i - ph;
    const int wa = t.w0 + sgi * seg_w, we = std::min(wa + seg_w, t.w0 + t.tw);
    const V* grow = sg + (((h - t.r0) * t.cols) << sh) + u;
    if (hx < 0 || hx >= g.H) {
      // The whole tap row reads padding: its terms are grad_out * 0, which is 0 except that Inf
      // or NaN in grad_out gives NaN, as in the reference. (Such lanes have i != ph, so their
      // bias sums are never used.)
#pragma unroll 1
      for (int w = wa; w < we; ++w) {
        const V gp = grow[(w - t.c0) << sh];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (!isfinite(static_cast<A>(gp.v[e]))) {
#pragma unroll
            for (int j = 0; j < JW; ++j) acc[j][e] = A(NAN);
          }
        }
      }
      continue;
    }
    const V* xrow = sx + (((hx - t.r0) * t.cols) << sh) + u;
    // win[j] holds x column w + jg * JW + j - pw at pixel w.
    const int xc = wa + jg * JW - pw;
    A win[JW][VEC];
#pragma unroll
    for (int j = 0; j + 1 < JW; ++j) load_col<T, VEC>(win[j], xrow, xc + j, t, sh);
    for (int w = wa; w < we; ++w) {
      load_col<T, VEC>(win[JW - 1], xrow, xc + (w - wa) + JW - 1, t, sh);
      const V gp = grow[(w - t.c0) << sh];
      A gv[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) gv[e] = static_cast<A>(gp.v[e]);
#pragma unroll
      for (int j = 0; j < JW; ++j) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[j][e] += gv[e] * win[j][e];
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) bacc[e] += gv[e];
#pragma unroll
      for (int j = 0; j + 1 < JW; ++j) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) win[j][e] = win[j + 1][e];
      }
    }
  }
}

// Fused backward. Block (chunk, slot) walks the tiles slot, slot + slots, ...; for each it
// stages grad_out and x (tile plus halo), writes grad_x of the tile (if wanted) and adds to its
// threads' weight/bias sums. Thread t < lanes * groups owns lane t % lanes = (u, i, jg) and
// row-segment group t / lanes. At the end the groups are summed in a fixed order.
template <typename T, int VEC, int KH, int KW, int RW, int JW>
__global__ void __launch_bounds__(kMaxThreads, 2) peg_backward_kernel(const BackwardArgs<T> a) {
  using A = acc_t<T>;
  using V = Pack<T, VEC>;
  const Geometry& g = a.g;
  const int64_t blk = blockIdx.x;
  if (blk >= a.conv_blocks) {
    copy_prefix<T, VEC>(a.grad, a.g_sb, a.g_st, a.grad_x, g, blk - a.conv_blocks,
                        static_cast<int64_t>(gridDim.x) - a.conv_blocks);
    return;
  }
  const int kh = KH > 0 ? KH : g.kh, kw = KW > 0 ? KW : g.kw;
  const int ph = kh / 2, kk = kh * kw;
  const int sh = g.cch_shift;
  const int64_t chunk = blk % g.chunks, slot = blk / g.chunks;
  const int nu = static_cast<int>(std::min<int64_t>(int64_t(1) << sh, g.nvec - (chunk << sh)));
  const int64_t c_first = (chunk << sh) * VEC;

  A* ws = reinterpret_cast<A*>(peg_smem);
  V* sg = reinterpret_cast<V*>(peg_smem + a.ws_bytes);
  V* sx = reinterpret_cast<V*>(peg_smem + a.ws_bytes + a.tile_bytes);
  if (a.grad_x != nullptr) stage_taps<T, VEC>(ws, a.p, kh, kw, c_first, sh, nu, /*flip=*/true);

  const int tid = threadIdx.x;
  const int lane = tid % a.lanes, rg = tid / a.lanes;
  const int lu = lane & ((1 << sh) - 1), li = (lane >> sh) % kh, ljg = (lane >> sh) / kh;
  const bool lane_on = rg < a.groups && lu < nu;
  A acc[JW][VEC], bacc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    bacc[e] = A(0);
#pragma unroll
    for (int j = 0; j < JW; ++j) acc[j][e] = A(0);
  }

  for (int64_t tile = slot; tile < a.tiles_total; tile += a.slots) {
    const int tw_i = static_cast<int>(tile % g.tiles_w);
    const int64_t rest = tile / g.tiles_w;
    const int th_i = static_cast<int>(rest % g.tiles_h);
    const int64_t b = rest / g.tiles_h;
    const Tile t = make_tile(th_i, tw_i, g, ph, kw / 2);
    __syncthreads();  // the previous tile is no longer read
    stage_tile<T, VEC>(sg, a.grad + b * a.g_sb + c_first, a.g_st, g, t, nu);
    stage_tile<T, VEC>(sx, a.x + b * a.x_sb + c_first, a.x_st, g, t, nu);
    wait_smem_copies();
    __syncthreads();
    if (a.grad_x != nullptr) {
      conv_tile<T, VEC, KH, KW, RW, false>(sg, ws, t, g, nu, a.grad_x + b * g.N * g.C + c_first,
                                           /*fwd=*/false);
    }
    if (lane_on) {
      wgrad_tile<T, VEC, KH, KW, JW>(sg, sx, t, g, lu, li, ljg, rg, a.groups, a.seg_w, acc, bacc);
    }
  }

  // partials[slot][tap][c] = sum over groups, one tap column jj of every lane per round.
  __syncthreads();
  A* red = reinterpret_cast<A*>(peg_smem);  // (lanes * groups, VEC), reuses the tiles
  const int active = a.lanes * a.groups;
#pragma unroll
  for (int jj = 0; jj <= JW; ++jj) {
    if (tid < active) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) red[tid * VEC + e] = jj < JW ? acc[jj][e] : bacc[e];
    }
    __syncthreads();
    for (int q = tid; q < a.lanes * VEC; q += blockDim.x) {
      const int ln = q / VEC, e = q - ln * VEC;
      const int u = ln & ((1 << sh) - 1), i = (ln >> sh) % kh, jg = (ln >> sh) / kh;
      if (u >= nu) continue;
      int tap;
      if (jj < JW) {
        const int j = jg * JW + jj;
        if (j >= kw) continue;
        tap = i * kw + j;
      } else {
        if (i != ph || jg != 0) continue;
        tap = kk;
      }
      A sum = A(0);
      for (int r = 0; r < a.groups; ++r) sum += red[(r * a.lanes + ln) * VEC + e];
      a.partials[(slot * (kk + 1) + tap) * g.C + c_first + u * VEC + e] = sum;
    }
    __syncthreads();
  }
}

// grad_weight[c, 0, i, j] = sum_s partials[s][i * kw + j][c], grad_bias[c] = sum_s
// partials[s][kk][c]: block (tap, 32 channels); 8 warps sum strided slots, then one warp adds
// the 8 in order.
template <typename T>
__global__ void __launch_bounds__(256) reduce_partials_kernel(const acc_t<T>* partials,
                                                              int64_t slots, int kk, int64_t C,
                                                              int64_t cblocks, T* grad_w,
                                                              T* grad_b) {
  using A = acc_t<T>;
  __shared__ A buf[8][32];
  const int64_t tap = blockIdx.x / cblocks;
  const int lane = threadIdx.x & 31, grp = threadIdx.x >> 5;
  const int64_t c = (blockIdx.x % cblocks) * 32 + lane;
  A s = A(0);
  if (c < C) {
    for (int64_t k = grp; k < slots; k += 8) s += partials[(k * (kk + 1) + tap) * C + c];
  }
  buf[grp][lane] = s;
  __syncthreads();
  if (grp == 0 && c < C) {
    A total = A(0);
#pragma unroll
    for (int r = 0; r < 8; ++r) total += buf[r][lane];
    if (tap < kk) {
      if (grad_w != nullptr) grad_w[c * kk + tap] = static_cast<T>(total);
    } else if (grad_b != nullptr) {
      grad_b[c] = static_cast<T>(total);
    }
  }
}

#endif  // __CUDACC__

// ---------------------------------------------------------------------------------------------
// Host-side planning: tile sizes, channel chunks, threads and shared memory of a launch.

struct LaunchPlan {
  Geometry g;
  int threads;
  int64_t conv_blocks, prefix_blocks;
  int ws_bytes, tile_bytes;
  int64_t smem;
  int lanes, groups, seg_w;   // backward only
  int64_t slots, tiles_total;  // backward only
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

inline Geometry base_geometry(int64_t B, int64_t N, int64_t C, int64_t H, int64_t W, int64_t P,
                              int kh, int kw, int vec) {
  Geometry g{};
  g.B = B; g.N = N; g.C = C; g.P = P;
  g.H = static_cast<int>(H); g.W = static_cast<int>(W);
  g.kh = kh; g.kw = kw;
  g.nvec = C / vec;
  return g;
}

// Picks the channel chunk, 2^shift vectors with shift <= max_shift, no wider than C and with
// lanes_per_vector * 2^shift <= kMaxThreads, and the largest output tile, full-width rows first,
// whose `ntiles` staged copies plus the staged taps fit in `budget` bytes; then evens out the
// tiles. Prefers wide chunks: a smaller chunk only when nothing fits. False if nothing fits.
inline bool plan_tiles(Geometry& g, int vec, int elem_bytes, int acc_bytes, int ntiles,
                       int64_t budget, int max_shift, int lanes_per_vector, LaunchPlan& plan) {
  int sh = max_shift;
  while (sh > 0 && (int64_t(1) << (sh - 1)) >= g.nvec) --sh;  // no chunk wider than C
  const int64_t kk = int64_t(g.kh) * g.kw;
  for (; sh >= 0; --sh) {
    const int64_t cch = int64_t(1) << sh;
    if (lanes_per_vector > 0 && cch * lanes_per_vector > kMaxThreads) continue;
    const int64_t ws = align16((kk + 1) * cch * vec * acc_bytes);
    const int64_t avail = budget - ws - 16 * ntiles;
    if (avail <= 0) continue;
    for (int64_t tw = g.W;; tw = (tw + 1) / 2) {
      const int64_t sw = std::min<int64_t>(tw + g.kw - 1, g.W);
      const int64_t row_bytes = sw * cch * vec * elem_bytes * ntiles;
      const int64_t rows = avail / row_bytes;
      const int64_t th = rows >= g.H ? g.H : rows - (g.kh - 1);
      if (th >= 1) {
        g.cch_shift = sh;
        g.tiles_h = static_cast<int>(ceil_div(g.H, th));
        g.TH = static_cast<int>(ceil_div(g.H, g.tiles_h));
        g.tiles_w = static_cast<int>(ceil_div(g.W, tw));
        g.TW = static_cast<int>(ceil_div(g.W, g.tiles_w));
        g.chunks = ceil_div(g.nvec, cch);
        plan.ws_bytes = static_cast<int>(ws);
        return true;
      }
      if (tw == 1) break;
    }
  }
  return false;
}

inline void finish_tiles(LaunchPlan& plan, int vec, int elem_bytes) {
  Geometry& g = plan.g;
  const int64_t elems = std::min(g.TH + g.kh - 1, g.H) * int64_t(std::min(g.TW + g.kw - 1, g.W))
                        << g.cch_shift;
  plan.tile_bytes = static_cast<int>(align16(elems * vec * elem_bytes));
}

inline int64_t prefix_blocks(const Geometry& g, int threads) {
  if (g.P == 0) return 0;
  return std::min<int64_t>(ceil_div(g.B * g.P * g.nvec, int64_t(threads) * 4), 4096);
}

// Forward (and grad_x alone). `rw`: output pixels per thread; `sms`: multiprocessors.
inline bool plan_forward(LaunchPlan& plan, int64_t B, int64_t N, int64_t C, int64_t H, int64_t W,
                         int64_t P, int kh, int kw, int vec, int elem_bytes, int acc_bytes,
                         int rw, int sms) {
  plan = LaunchPlan{};
  plan.g = base_geometry(B, N, C, H, W, P, kh, kw, vec);
  Geometry& g = plan.g;
  if (!plan_tiles(g, vec, elem_bytes, acc_bytes, 1, kForwardSmemBudget, vec > 1 ? 3 : 5, 0,
                  plan)) {
    return false;
  }
  // Enough blocks to fill the device: split rows further for small batches.
  while (g.B * g.chunks * g.tiles_h * g.tiles_w < 2 * int64_t(sms) && g.TH > 1) {
    g.tiles_h = std::min(g.H, 2 * g.tiles_h);
    g.TH = static_cast<int>(ceil_div(g.H, g.tiles_h));
    g.tiles_h = static_cast<int>(ceil_div(g.H, g.TH));
  }
  finish_tiles(plan, vec, elem_bytes);
  // Threads: one per work item of a tile if that is at most 256, else the multiple of 32 in
  // [128, 256] that leaves the fewest threads idle in the last round.
  const int64_t items = (int64_t(1) << g.cch_shift) * g.TH * ceil_div(g.TW, rw);
  int best = static_cast<int>(std::min<int64_t>(kMaxThreads, ceil_div(items, 32) * 32));
  if (items > kMaxThreads) {
    int64_t best_cost = ceil_div(items, best) * best;
    for (int nt = kMaxThreads - 32; nt >= 128; nt -= 32) {
      const int64_t cost = ceil_div(items, nt) * nt;
      if (cost < best_cost) { best = nt; best_cost = cost; }
    }
  }
  plan.threads = best;
  plan.conv_blocks = g.B * g.chunks * g.tiles_h * g.tiles_w;
  plan.prefix_blocks = prefix_blocks(g, plan.threads);
  plan.smem = plan.ws_bytes + plan.tile_bytes;
  return true;
}

// Backward, before the number of slots is known. `jw`: tap columns per weight-gradient lane.
inline bool plan_backward(LaunchPlan& plan, int64_t B, int64_t N, int64_t C, int64_t H, int64_t W,
                          int64_t P, int kh, int kw, int vec, int elem_bytes, int acc_bytes,
                          int jw, int64_t smem_budget) {
  plan = LaunchPlan{};
  plan.g = base_geometry(B, N, C, H, W, P, kh, kw, vec);
  Geometry& g = plan.g;
  const int lanes_per_vector = kh * static_cast<int>(ceil_div(kw, jw));
  if (!plan_tiles(g, vec, elem_bytes, acc_bytes, 2, smem_budget, vec > 1 ? 3 : 5,
                  lanes_per_vector, plan)) {
    return false;
  }
  finish_tiles(plan, vec, elem_bytes);
  plan.threads = kMaxThreads;
  plan.lanes = lanes_per_vector << g.cch_shift;
  plan.groups = kMaxThreads / plan.lanes;
  plan.seg_w = static_cast<int>(ceil_div(g.TW, ceil_div(g.TW, 8)));
  plan.tiles_total = g.B * g.tiles_h * g.tiles_w;
  const int64_t red = align16(int64_t(kMaxThreads) * vec * acc_bytes);
  plan.smem = std::max<int64_t>(plan.ws_bytes + 2 * int64_t(plan.tile_bytes), red);
  return true;
}

// Slots: as many blocks as fit on the device at once, shared among the channel chunks.
inline void finish_backward(LaunchPlan& plan, int blocks_per_sm, int sms, bool want_x) {
  const Geometry& g = plan.g;
  const int64_t resident = std::max<int64_t>(1, int64_t(blocks_per_sm) * sms);
  plan.slots = std::max<int64_t>(1, std::min<int64_t>(plan.tiles_total, resident / g.chunks));
  plan.conv_blocks = g.chunks * plan.slots;
  plan.prefix_blocks = want_x ? prefix_blocks(g, plan.threads) : 0;
}

}  // namespace peg_cuda
}  // namespace cpvt
