// Experimental fused PEG kernels for bench/cuda_micro, forward and backward: rows staged through
// shared memory by cp.async, several rows in flight per block, so that the bytes a
// multiprocessor keeps in flight do not depend on its registers (the streaming kernels of
// csrc/cuda/peg_stream.cuh hold one row ahead in registers: about 5-8 KB in flight an SM, where
// 3 TB/s at its latency wants about 20).
//
// A block takes work items (image b, chunk of CH channels) in turn, a thread for each (column,
// vector of CV channels) of the chunk, and streams their rows -1 .. H, one item after another,
// through a ring of NS row buffers in shared memory (W tokens x CH channels each; rows -1 and H
// are zeros, written by cp.async's zero fill): step q waits until its row has landed, issues the
// row NS - 1 positions on into the buffer of row q - 1 (which step q - 1 was the last to read),
// and adds its row to the three output rows it feeds, so that up to NS - 1 rows are in flight
// during the arithmetic and each input value is read from shared memory once. The order of the
// arithmetic is the package's: the bias, the taps row by row (padding columns multiplied as
// zeros), the residual right after the centre tap. Prefix tokens are copied by the block that
// has the item. The backward (peg_pipe_backward_kernel) streams grad_out and x the same way.
//
// Not in the package: bench/cuda_micro times them beside the streaming kernels.
#pragma once

#include "../../csrc/cuda/peg_stream.cuh"

#include <cstdint>

namespace cpvt {
namespace peg_pipe {

using peg_cuda::acc_t;
using peg_cuda::Pack;
using peg_cuda::Params;

constexpr int kMaxThreads = 256;  // W * CH / CV threads a block at most

template <typename T>
struct PipeArgs {
  const T* src;
  int64_t sb, st;  // image and token strides of src (channels contiguous)
  Params<T> p;
  T* out;  // contiguous (B, N, C)
  int64_t B, N, C, P;
  int H, W;
  int CH;      // channels of a work item (divides C; a multiple of 16 bytes and of CV)
  int chunks;  // C / CH
};

template <typename T>
struct PipeBackwardArgs {
  const T* grad;
  int64_t g_sb, g_st;
  const T* x;
  int64_t x_sb, x_st;
  Params<T> p;         // the weight (its taps are flipped for grad_x)
  T* grad_x;           // contiguous (B, N, C)
  acc_t<T>* partials;  // (gridDim.x / chunks, 10, C): a slot for each block of a chunk
  int64_t B, N, C, P;
  int H, W;
  int CH, chunks;  // gridDim.x is a multiple of chunks, so that a block keeps its chunk
};

// Shared memory of a block: NS row buffers of W x CH values.
template <typename T>
inline int64_t pipe_smem(int NS, int W, int CH) {
  return int64_t(NS) * W * CH * static_cast<int64_t>(sizeof(T));
}

#if defined(__CUDACC__)

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool fill) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(fill ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// CV channels (one 8- or 16-byte vector) of token w of a row buffer, as accumulators; zeros
// outside the row (the padding columns).
template <typename T, int CV>
__device__ __forceinline__ void row_vec(acc_t<T> (&v)[CV], const T* row, int w, int W, int c) {
  constexpr int NW = static_cast<int>(CV * sizeof(T) / 4);
  uint32_t raw[NW];
  if (static_cast<unsigned>(w) < static_cast<unsigned>(W)) {
    const Pack<uint32_t, NW> p = *reinterpret_cast<const Pack<uint32_t, NW>*>(row + c);
#pragma unroll
    for (int k = 0; k < NW; ++k) raw[k] = p.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < NW; ++k) raw[k] = 0u;
  }
  peg_cuda::words_to_acc<T, CV, NW>(v, raw);
}

// Input row v (columns w - 1, w, w + 1) into the three output rows it feeds: acc2 (the row
// below, started from `start`) takes tap row 0, acc1 tap row 1 and then the centre input, acc0
// tap row 2. SKIP: the columns outside the row (col_ok false) add nothing, rather than their
// zeros times the tap (the input gradient's rule).
template <typename A, int CV, bool SKIP>
__device__ __forceinline__ void add_row(A (&acc0)[CV], A (&acc1)[CV], A (&acc2)[CV],
                                        const A (&start)[CV], const A (&t)[9][CV],
                                        const A (&v)[3][CV], const bool (&col_ok)[3]) {
#pragma unroll
  for (int e = 0; e < CV; ++e) acc2[e] = start[e];
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    A (&acc)[CV] = i == 0 ? acc2 : i == 1 ? acc1 : acc0;
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      if (!SKIP || col_ok[j]) {
#pragma unroll
        for (int e = 0; e < CV; ++e) acc[e] += t[i * 3 + j][e] * v[j][e];
      }
      if (i == 1 && j == 1) {
#pragma unroll
        for (int e = 0; e < CV; ++e) acc[e] += v[1][e];
      }
    }
  }
}

// Output row acc0 complete: stored at `out` unless it lies outside the image (nullptr), then
// the accumulators move up a row.
template <typename T, int CV>
__device__ __forceinline__ void finish_row(T* out, acc_t<T> (&acc0)[CV], acc_t<T> (&acc1)[CV],
                                           const acc_t<T> (&acc2)[CV]) {
  if (out != nullptr) peg_cuda::store_acc<T, CV>(out, acc0);
#pragma unroll
  for (int e = 0; e < CV; ++e) {
    acc0[e] = acc1[e];
    acc1[e] = acc2[e];
  }
}

// The 3x3 forward: NS row buffers, CV channels a thread, a thread a (column, channel vector)
// of the item (blockDim.x = W * CH / CV). The rows of the block's items form one stream,
// H + 2 positions an item (input rows -1 .. H), so that the next item's first rows are in
// flight while the last rows of the current one are computed.
template <typename T, int CV, int NS>
__global__ void __launch_bounds__(kMaxThreads) peg_pipe_forward_kernel(const PipeArgs<T> a) {
  static_assert(NS >= 3, "the row being read, and at least one more in flight");
  using A = acc_t<T>;
  constexpr int PIECE = 16 / static_cast<int>(sizeof(T));  // values a cp.async moves
  static_assert(CV <= PIECE, "a thread issues at most one piece of a row");
  extern __shared__ __align__(16) unsigned char pipe_smem_raw[];
  T* buf = reinterpret_cast<T*>(pipe_smem_raw);
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int W = a.W, H = a.H, CH = a.CH, R = H + 2;
  const int row_vals = W * CH;
  const int ppt = CH / PIECE;  // cp.async pieces a token
  const int cvecs = CH / CV;
  const int cv = tid % cvecs, w = tid / cvecs;
  // This thread's piece of every row (a row has W * ppt <= blockDim.x pieces): token tid / ppt,
  // values (tid % ppt) * PIECE on.
  const bool has_piece = tid < W * ppt;
  const int piece_s = (tid / ppt) * CH + (tid % ppt) * PIECE;
  const int64_t piece_g = (tid / ppt) * a.st + (tid % ppt) * PIECE;
  const int items = static_cast<int>(a.B * a.chunks);  // the launcher keeps it below 2^31
  const int first = static_cast<int>(blockIdx.x), step = static_cast<int>(gridDim.x);
  if (first >= items) return;
  const int positions = ((items - 1 - first) / step + 1) * R;  // below 2^31 too

  // Item `item` (image b, channels c0 ..): the offsets of its first value in src (returned)
  // and in out.
  auto image_offset = [&](int item, int64_t& out_offset, int64_t& c0) {
    const int b = item / a.chunks;
    c0 = int64_t(item - b * a.chunks) * CH;
    out_offset = b * a.N * a.C + c0;
    return b * a.sb + c0;
  };
  // The issuing side of the stream: position iq is input row ir of the item at offset isrc.
  int iq = 0, ir = -1, iitem = first;
  int64_t unused, unused_c0;
  int64_t isrc = image_offset(first, unused, unused_c0) + a.P * a.st + piece_g;
  const int64_t row_step = int64_t(W) * a.st;
  // Loads position iq into buffer iq % NS (zeros for rows -1 and H), commits a group (empty
  // past the stream, so that every step waits for the same count), and moves on a position.
  auto issue = [&]() {
    if (iq < positions && has_piece) {
      const bool in = ir >= 0 && ir < H;
      cp_async16(buf + (iq % NS) * row_vals + piece_s, a.src + isrc + (in ? ir : 0) * row_step,
                 in);
    }
    cp_async_commit();
    ++iq;
    if (++ir == H + 1) {
      ir = -1;
      iitem += step;
      if (iitem < items) isrc = image_offset(iitem, unused, unused_c0) + a.P * a.st + piece_g;
    }
  };
#pragma unroll 1
  for (int k = 0; k < NS - 1; ++k) issue();  // the prologue: positions 0 .. NS - 2

  A wt[9][CV], bias[CV];
  A acc0[CV], acc1[CV], acc2[CV];  // outputs ri - 1, ri, ri + 1 (rows outside: never stored)
#pragma unroll
  for (int e = 0; e < CV; ++e) acc0[e] = acc1[e] = acc2[e] = A(0);
  T* out_img = nullptr;
  int ri = -1, item = first;
#pragma unroll 1
  for (int q = 0; q < positions; ++q) {
    if (ri == -1) {  // a new item: its taps, bias and prefix tokens
      int64_t out_offset, c0;
      const T* img = a.src + image_offset(item, out_offset, c0);
      out_img = a.out + out_offset;
#pragma unroll
      for (int e = 0; e < CV; ++e) {
        const int64_t c = c0 + cv * CV + e;
#pragma unroll
        for (int t = 0; t < 9; ++t) {
          wt[t][e] = static_cast<A>(peg_cuda::load_ro(a.p.weight + c * a.p.w_sc +
                                                     (t / 3) * a.p.w_si + (t % 3) * a.p.w_sj));
        }
        bias[e] = a.p.bias != nullptr
                      ? static_cast<A>(peg_cuda::load_ro(a.p.bias + c * a.p.b_s))
                      : A(0);
      }
      for (int k = tid; k < a.P * ppt; k += nthreads) {
        const int t = k / ppt, cp = k - t * ppt;
        *reinterpret_cast<Pack<T, PIECE>*>(out_img + t * a.C + cp * PIECE) =
            *reinterpret_cast<const Pack<T, PIECE>*>(img + t * a.st + cp * PIECE);
      }
    }
    cp_async_wait<NS - 2>();  // position q has landed (this thread's piece)
    __syncthreads();          // everyone's pieces; everyone done with position q - 1
    issue();                  // position q + NS - 1, into the buffer of position q - 1
    const T* row = buf + (q % NS) * row_vals;
    A v[3][CV];
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      row_vec<T, CV>(v[j], row + (w - 1 + j) * CH, w - 1 + j, W, cv * CV);
    }
    // Input row ri feeds output rows ri + 1 (tap row 0, after the bias), ri (tap row 1, then
    // the residual after the centre tap) and ri - 1 (tap row 2, which completes it).
    const bool all_cols[3] = {true, true, true};
    add_row<A, CV, false>(acc0, acc1, acc2, bias, wt, v, all_cols);
    finish_row<T, CV>(ri >= 1 ? out_img + (a.P + int64_t(ri - 1) * W + w) * a.C + cv * CV
                              : nullptr,
                      acc0, acc1, acc2);
    if (++ri == H + 1) {
      ri = -1;
      item += step;
    }
  }
  cp_async_wait<0>();
}

// The 3x3 backward: grad_x (the flipped taps over grad_out, taps on padding skipped, grad_out
// itself added after the centre tap) and the block's sums of grad_weight and grad_bias. Two rings
// of NS row buffers, grad_out and x, loaded position by position as in the forward, H + 3
// positions an item (rows -1 .. H + 1). Step q reads grad_out row q and x row q - 1, so it issues
// position q + NS - 2 into the buffers of position q - 2: up to NS - 2 rows of each in flight. x
// row r meets grad_out rows r + 1, r and r - 2 + 1 .. (tap rows 0, 1, 2), kept as the centre
// values of the last three grad_out rows. A block's items share its chunk (gridDim.x is a
// multiple of chunks); at the end the threads' sums are added over the columns in shared memory,
// in order, into the block's slot of partials.
template <typename T, int CV, int NS>
__global__ void __launch_bounds__(kMaxThreads) peg_pipe_backward_kernel(
    const PipeBackwardArgs<T> a) {
  static_assert(NS >= 4, "the rows being read, and at least one more in flight");
  using A = acc_t<T>;
  constexpr int PIECE = 16 / static_cast<int>(sizeof(T));
  static_assert(CV <= PIECE, "a thread issues at most one piece of a row");
  extern __shared__ __align__(16) unsigned char pipe_smem_raw[];
  const int W = a.W, H = a.H, CH = a.CH, R = H + 3;
  const int row_vals = W * CH;
  T* gbuf = reinterpret_cast<T*>(pipe_smem_raw);
  T* xbuf = gbuf + NS * row_vals;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int ppt = CH / PIECE;
  const int cvecs = CH / CV;
  const int cv = tid % cvecs, w = tid / cvecs;
  const bool has_piece = tid < W * ppt;
  const int piece_s = (tid / ppt) * CH + (tid % ppt) * PIECE;
  const int piece_tok = tid / ppt, piece_c = (tid % ppt) * PIECE;
  const int items = static_cast<int>(a.B * a.chunks);
  const int first = static_cast<int>(blockIdx.x), step = static_cast<int>(gridDim.x);
  const int chunk = first % a.chunks;  // the same for all the block's items
  const int64_t c0 = int64_t(chunk) * CH;
  const int positions = first < items ? ((items - 1 - first) / step + 1) * R : 0;
  bool col_ok[3];
#pragma unroll
  for (int j = 0; j < 3; ++j) col_ok[j] = static_cast<unsigned>(w - 1 + j) < unsigned(W);

  // The issuing side: position iq is row ir of image ib, whose row 0 (this thread's piece) is at
  // gsrc and xsrc.
  int iq = 0, ir = -1, ib = first / a.chunks;
  const int ib_step = step / a.chunks;
  const T* gsrc = a.grad + ib * a.g_sb + (a.P + piece_tok) * a.g_st + c0 + piece_c;
  const T* xsrc = a.x + ib * a.x_sb + (a.P + piece_tok) * a.x_st + c0 + piece_c;
  const int64_t g_row = int64_t(W) * a.g_st, x_row = int64_t(W) * a.x_st;
  auto issue = [&]() {
    if (iq < positions && has_piece) {
      const bool in = ir >= 0 && ir < H;
      const int off = (iq % NS) * row_vals + piece_s;
      const int r = in ? ir : 0;
      cp_async16(gbuf + off, gsrc + r * g_row, in);
      cp_async16(xbuf + off, xsrc + r * x_row, in);
    }
    cp_async_commit();
    ++iq;
    if (++ir == H + 2) {
      ir = -1;
      ib += ib_step;
      gsrc += ib_step * a.g_sb;
      xsrc += ib_step * a.x_sb;
    }
  };
#pragma unroll 1
  for (int k = 0; k < NS - 2; ++k) issue();  // the prologue: positions 0 .. NS - 3

  // The flipped taps (wf[i][j] = w[2 - i][2 - j]) of this thread's channels.
  A wf[9][CV];
#pragma unroll
  for (int e = 0; e < CV; ++e) {
    const int64_t c = c0 + cv * CV + e;
#pragma unroll
    for (int t = 0; t < 9; ++t) {
      wf[8 - t][e] = static_cast<A>(peg_cuda::load_ro(a.p.weight + c * a.p.w_sc +
                                                     (t / 3) * a.p.w_si + (t % 3) * a.p.w_sj));
    }
  }
  A dw[9][CV], db[CV];
  A acc0[CV], acc1[CV], acc2[CV];  // grad_x of rows ri - 1, ri, ri + 1
  A g1[CV], g2[CV];                // grad_out at column w, rows ri - 1 and ri - 2
  A zero[CV];
#pragma unroll
  for (int e = 0; e < CV; ++e) {
    db[e] = acc0[e] = acc1[e] = acc2[e] = g1[e] = g2[e] = zero[e] = A(0);
#pragma unroll
    for (int t = 0; t < 9; ++t) dw[t][e] = A(0);
  }
  T* gx_img = nullptr;
  int ri = -1, b = first / a.chunks;
#pragma unroll 1
  for (int q = 0; q < positions; ++q) {
    if (ri == -1) {  // a new item: grad_x's prefix tokens are grad_out's
      gx_img = a.grad_x + b * a.N * a.C + c0;
      const T* g_img = a.grad + b * a.g_sb + c0;
      for (int k = tid; k < a.P * ppt; k += nthreads) {
        const int t = k / ppt, cp = k - t * ppt;
        *reinterpret_cast<Pack<T, PIECE>*>(gx_img + t * a.C + cp * PIECE) =
            *reinterpret_cast<const Pack<T, PIECE>*>(g_img + t * a.g_st + cp * PIECE);
      }
    }
    cp_async_wait<NS - 3>();  // position q has landed (this thread's pieces)
    __syncthreads();          // everyone's pieces; everyone done with position q - 1
    issue();                  // position q + NS - 2, into the buffers of position q - 2
    const bool g_in = ri >= 0 && ri < H;  // grad_out row ri exists
    A G[3][CV];
    const T* grow = gbuf + (q % NS) * row_vals;
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      row_vec<T, CV>(G[j], grow + (w - 1 + j) * CH, w - 1 + j, W, cv * CV);
    }
    // grad_x: row ri feeds rows ri + 1 (flipped tap row 0), ri (row 1 and grad_out itself after
    // the centre tap) and ri - 1 (row 2, which completes it); rows and columns of padding skip.
    if (g_in) {
      add_row<A, CV, true>(acc0, acc1, acc2, zero, wf, G, col_ok);
#pragma unroll
      for (int e = 0; e < CV; ++e) db[e] += G[1][e];
    } else {
#pragma unroll
      for (int e = 0; e < CV; ++e) acc2[e] = A(0);
    }
    finish_row<T, CV>(ri >= 1 && ri - 1 < H
                          ? gx_img + (a.P + int64_t(ri - 1) * W + w) * a.C + cv * CV
                          : nullptr,
                      acc0, acc1, acc2);
    // The weight gradient: x row ri - 1 (zeros outside, multiplied) with grad_out rows ri
    // (tap row 0), ri - 1 (1) and ri - 2 (2), those in the image.
    if (ri >= 0) {
      A X[3][CV];
      const T* xrow = xbuf + ((q + NS - 1) % NS) * row_vals;  // position q - 1
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        row_vec<T, CV>(X[j], xrow + (w - 1 + j) * CH, w - 1 + j, W, cv * CV);
      }
#pragma unroll
      for (int i = 0; i < 3; ++i) {
        const int gr = ri - i;
        if (gr >= 0 && gr < H) {
#pragma unroll
          for (int j = 0; j < 3; ++j) {
#pragma unroll
            for (int e = 0; e < CV; ++e) {
              const A g = i == 0 ? G[1][e] : i == 1 ? g1[e] : g2[e];
              dw[i * 3 + j][e] += g * X[j][e];
            }
          }
        }
      }
    }
#pragma unroll
    for (int e = 0; e < CV; ++e) {
      g2[e] = g1[e];
      g1[e] = G[1][e];
    }
    if (++ri == H + 2) {
      ri = -1;
      b += ib_step;
    }
  }
  cp_async_wait<0>();
  // The sums over the block's columns, tap by tap, in column order, into its slot.
  A* red = reinterpret_cast<A*>(pipe_smem_raw);  // W x CH values (the rings are done)
  const int64_t slot = blockIdx.x / a.chunks;
#pragma unroll
  for (int t = 0; t <= 9; ++t) {  // unrolled: dw stays in registers
    __syncthreads();
#pragma unroll
    for (int e = 0; e < CV; ++e) red[w * CH + cv * CV + e] = t < 9 ? dw[t < 9 ? t : 0][e] : db[e];
    __syncthreads();
    for (int c = tid; c < CH; c += nthreads) {
      A sum = A(0);
      for (int k = 0; k < W; ++k) sum += red[k * CH + c];
      a.partials[(slot * 10 + t) * a.C + c0 + c] = sum;
    }
  }
}

#endif  // __CUDACC__

}  // namespace peg_pipe
}  // namespace cpvt
