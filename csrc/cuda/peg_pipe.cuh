// Fused PEG kernels, forward and backward, that stage rows through shared memory by cp.async,
// several rows in flight per block, so that the bytes a multiprocessor keeps in flight do not
// depend on its registers (the streaming kernels of peg_stream.cuh hold one row ahead in
// registers: about 5-8 KB in flight an SM, where 3 TB/s at its latency wants about 20).
//
// A block takes work items (image b, chunk of CH channels) in turn, a thread for each (group of
// CW columns, vector of CV channels) of the chunk, and streams their rows -1 .. H, one item
// after another, through a ring of NS row buffers in shared memory. A buffer holds a row's W
// tokens x CH channels between zero tokens, so that a thread reads the columns either side of
// its own unguarded; rows -1 and H are zeros, written by cp.async's zero fill. Step q waits
// until its row has landed, issues the row NS - 1 positions on into the buffer of row q - 1
// (which step q - 1 was the last to read), and adds its row to the three output rows it feeds,
// so that up to NS - 1 rows are in flight during the arithmetic and each input value is read
// from shared memory once. The order of the arithmetic is the package's: the bias, the taps
// row by row (padding columns multiplied as zeros), the residual right after the centre tap.
// Prefix tokens are copied by the block that has the item. The backward
// (peg_pipe_backward_kernel) streams grad_out and x the same way.
//
// Experimental. The package runs them only where CPVT_CUDA_KERNELS=pipe asks for it
// (peg_launch.cuh: launch_pipe_forward, launch_pipe_backward): the 3x3 forward on the vector
// path of 16-bit and float32 tokens, the 3x3 backward with the weight gradient on that of 16-bit
// tokens. bench/cuda_micro times them beside the streaming kernels, and
// tests/cpp/test_pipe_emulated.cpp runs their thread code (PipeForwardThread,
// PipeBackwardThread: __host__ __device__) on the CPU.
#pragma once

#include "peg_stream.cuh"

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace cpvt {
namespace peg_pipe {

using peg_cuda::acc_t;
using peg_cuda::Pack;
using peg_cuda::Params;

constexpr int kMaxThreads = 256;  // ceil(W / CW) * CH / CV threads a block at most

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
  T* grad_x;           // contiguous (B, N, C); nullptr: not wanted
  acc_t<T>* partials;  // (gridDim.x / chunks, 10, C): a slot for each block of a chunk
  int64_t B, N, C, P;
  int H, W;
  int CH, chunks;  // gridDim.x is a multiple of chunks, so that a block keeps its chunk
};

// The channels of a work item: the largest CH of 256, 128, ... that divides C in whole 16-byte
// pieces and CV-channel vectors, with ceil(W / CW) * CH / CV threads a block at most
// kMaxThreads; 0 where none does.
inline int pipe_channels(int64_t C, int64_t W, int elem_bytes, int CV, int CW) {
  const int piece = 16 / elem_bytes;
  for (int ch = 256; ch >= piece && ch >= CV; ch /= 2) {
    if (C % ch == 0 && ch % piece == 0 && ch % CV == 0 &&
        (W + CW - 1) / CW * (ch / CV) <= kMaxThreads) {
      return ch;
    }
  }
  return 0;
}

#if defined(__CUDACC__)
#define PIPE_HD __host__ __device__ __forceinline__
#else
#define PIPE_HD inline
#endif

// Tokens of a row buffer: a zero token, the row's W, and zero tokens up to a whole number of
// groups of CW columns and one more, so that every thread reads its CW + 2 tokens unguarded.
PIPE_HD int pipe_row_tokens(int W, int CW) { return (W + CW - 1) / CW * CW + 2; }

// Shared memory of a block: NS row buffers of pipe_row_tokens(W, CW) x CH values.
template <typename T>
inline int64_t pipe_smem(int NS, int W, int CH, int CW = 1) {
  return int64_t(NS) * pipe_row_tokens(W, CW) * CH * static_cast<int64_t>(sizeof(T));
}

// cp.async needs sm_80 or later; older devices (a build for them) copy at once.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define PIPE_CP_ASYNC 1
#else
#define PIPE_CP_ASYNC 0
#endif

// The block's row buffers as a thread addresses them: a pointer (for the reads, and for the
// host, where tests/cpp/test_pipe_emulated.cpp runs the kernels' thread code) and, on the
// device, the shared-memory address of its start for cp.async, taken once.
template <typename T>
struct SmemRows {
  T* p;
  unsigned s;

  PIPE_HD void set(T* buf) {
    p = buf;
#if PIPE_CP_ASYNC
    s = static_cast<unsigned>(__cvta_generic_to_shared(buf));
#else
    s = 0u;
#endif
  }

  // 16 bytes from global memory to values off .. of the buffers, asynchronously (zeros when
  // !fill); on the host and before sm_80, at once.
  PIPE_HD void copy16(int off, const T* g, bool fill) const {
#if PIPE_CP_ASYNC
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                     s + static_cast<unsigned>(off) * static_cast<unsigned>(sizeof(T))),
                 "l"(g), "r"(fill ? 16 : 0)
                 : "memory");
#elif defined(__CUDA_ARCH__)
    using P16 = Pack<uint32_t, 4>;
    *reinterpret_cast<P16*>(p + off) = fill ? *reinterpret_cast<const P16*>(g) : P16{};
#else
    if (fill) {
      std::memcpy(p + off, g, 16);
    } else {
      std::memset(p + off, 0, 16);
    }
#endif
  }

  // 16 bytes of zeros at values off .. of the buffers, at once.
  PIPE_HD void zero16(int off) const {
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<Pack<uint32_t, 4>*>(p + off) = Pack<uint32_t, 4>{};
#else
    std::memset(p + off, 0, 16);
#endif
  }
};

// A float from its bits.
PIPE_HD float float_of_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// CV channels (one 8- or 16-byte vector) at p in a row buffer, as accumulators. bfloat16 is the
// top half of a float: a word's low value shifted up, its high value masked, one instruction
// each.
template <typename T, int CV>
PIPE_HD void load_vec(acc_t<T> (&v)[CV], const T* p) {
  constexpr int NW = static_cast<int>(CV * sizeof(T) / 4);
  const Pack<uint32_t, NW> w = *reinterpret_cast<const Pack<uint32_t, NW>*>(p);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
#pragma unroll
    for (int k = 0; k < NW; ++k) {
      v[2 * k] = float_of_bits(w.v[k] << 16);
      v[2 * k + 1] = float_of_bits(w.v[k] & 0xffff0000u);
    }
  } else {
    uint32_t raw[NW];
#pragma unroll
    for (int k = 0; k < NW; ++k) raw[k] = w.v[k];
    peg_cuda::words_to_acc<T, CV, NW>(v, raw);
  }
}

// Values computed here, before the branches that use them: nvcc otherwise sinks a row's
// unpacking into each branch that reads it, and the backward unpacked its x row three times.
template <typename A, int N, int CV>
PIPE_HD void keep_here(A (&v)[N][CV]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
  for (int j = 0; j < N; ++j) {
#pragma unroll
    for (int e = 0; e < CV; ++e) {
      if constexpr (sizeof(A) == 4) {
        asm volatile("" : "+f"(v[j][e]));
      } else {
        asm volatile("" : "+d"(v[j][e]));
      }
    }
  }
#endif
}

// Input row v (columns w - 1, w, w + 1) into the three output rows it feeds: acc2 (the row
// below, started from `start`) takes tap row 0, acc1 tap row 1 and then the centre input, acc0
// tap row 2. SKIP: the columns outside the row (col_ok false) add nothing, rather than their
// zeros times the tap (the input gradient's rule).
template <typename A, int CV, bool SKIP>
PIPE_HD void add_row(A (&acc0)[CV], A (&acc1)[CV], A (&acc2)[CV], const A (&start)[CV],
                     const A (&t)[9][CV], const A (&v)[3][CV], const bool (&col_ok)[3]) {
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
PIPE_HD void finish_row(T* out, acc_t<T> (&acc0)[CV], acc_t<T> (&acc1)[CV],
                        const acc_t<T> (&acc2)[CV]) {
  if (out != nullptr) peg_cuda::store_acc<T, CV>(out, acc0);
#pragma unroll
  for (int e = 0; e < CV; ++e) {
    acc0[e] = acc1[e];
    acc1[e] = acc2[e];
  }
}

// The 3x3 taps of channels c .. c + CV - 1, wt[tap][e] (flipped: wt[8 - tap]).
template <typename T, int CV>
PIPE_HD void load_taps(acc_t<T> (&wt)[9][CV], const Params<T>& p, int64_t c, bool flip) {
#pragma unroll
  for (int e = 0; e < CV; ++e) {
#pragma unroll
    for (int t = 0; t < 9; ++t) {
      wt[flip ? 8 - t : t][e] = static_cast<acc_t<T>>(peg_cuda::load_ro(
          p.weight + (c + e) * p.w_sc + (t / 3) * p.w_si + (t % 3) * p.w_sj));
    }
  }
}

// The prefix tokens of an item: out[t, :ppt pieces] = src[t, ...] for t < P (out's tokens C
// apart, src's st apart), a 16-byte piece a thread in turn.
template <typename T>
PIPE_HD void copy_prefix(T* out, int64_t C, const T* src, int64_t st, int64_t P, int ppt,
                         int tid, int nthreads) {
  constexpr int PIECE = 16 / static_cast<int>(sizeof(T));
  for (int k = tid; k < P * ppt; k += nthreads) {
    const int t = k / ppt, cp = k - t * ppt;
    *reinterpret_cast<Pack<T, PIECE>*>(out + t * C + cp * PIECE) =
        *reinterpret_cast<const Pack<T, PIECE>*>(src + t * st + cp * PIECE);
  }
}

// A thread's place in a block of ceil(W / CW) * CH / CV threads: channel vector cv of columns
// w .. w + CW - 1, whose CW + 2 tokens (columns w - 1 .. w + CW) it reads at rd, rd + CH, ... of
// a row buffer; and its 16-byte piece of every row (a row has W * ppt <= blockDim.x pieces:
// token piece_tok, values piece_c on, at piece_s in a row buffer). A row buffer holds
// wp = pipe_row_tokens(W, CW) tokens, column c at token c + 1; the others stay zero.
template <typename T, int CV, int CW = 1>
struct PipeLayout {
  static constexpr int PIECE = 16 / static_cast<int>(sizeof(T));  // values a cp.async moves
  static_assert(CV * CW <= PIECE, "a thread issues at most one piece of a row");
  int tid, nthreads, cv, w, ppt, wp, row_vals, rd;
  bool has_piece;
  int piece_tok, piece_c, piece_s;

  PIPE_HD void place(int W, int CH, int tid_, int nthreads_) {
    tid = tid_;
    nthreads = nthreads_;
    ppt = CH / PIECE;
    wp = pipe_row_tokens(W, CW);
    row_vals = wp * CH;
    cv = tid % (CH / CV);
    w = tid / (CH / CV) * CW;
    rd = w * CH + cv * CV;  // token w: column w - 1
    has_piece = tid < W * ppt;
    piece_tok = tid / ppt;
    piece_c = (tid % ppt) * PIECE;
    piece_s = (piece_tok + 1) * CH + piece_c;
  }

  // The zero tokens of `rings` x NS row buffers (token 0 and W + 1 .. wp - 1 of each), which
  // no copy writes: once, before the first barrier.
  PIPE_HD void zero_pads(const SmemRows<T>& rows, int rings, int NS, int W, int CH) const {
    const int per_row = (wp - W) * ppt;
    for (int k = tid; k < rings * NS * per_row; k += nthreads) {
      const int r = k / per_row, pad = k - r * per_row, t = pad / ppt;
      rows.zero16(r * row_vals + (t == 0 ? 0 : W + t) * CH + (pad - t * ppt) * PIECE);
    }
  }
};

// One thread of the 3x3 forward: NS row buffers, CV channels of CW columns a thread, a thread
// for each (column group, channel vector) of an item (blockDim.x = ceil(W / CW) * CH / CV; CW
// columns share the loads of the row's CW + 2 vectors). The rows of the block's items form one
// stream, H + 2 positions an item (input rows -1 .. H), so that the next item's first rows are
// in flight while the current one's last are computed. The kernel below runs, per thread: init;
// zero_pads; issue NS - 1 times; then for each position: begin (at a new item), wait for the
// position's row and a barrier, issue, step. On the host the test runs the same calls, every
// thread in turn at each stage. The ring's slots, the source rows and the output rows advance
// by counters and pointers, so that a step computes no index.
template <typename T, int CV, int NS, int CW = 1>
struct PipeForwardThread : PipeLayout<T, CV, CW> {
  static_assert(NS >= 3, "the row being read, and at least one more in flight");
  using A = acc_t<T>;
  using L = PipeLayout<T, CV, CW>;
  using L::tid, L::nthreads, L::cv, L::w, L::ppt, L::row_vals, L::rd, L::has_piece, L::piece_s;

  SmemRows<T> rows;
  int items, step_items, positions;
  int64_t piece_g;  // this thread's piece in src, from a row's first token
  // The issuing side: position iq into slot islot, input row ir of item iitem, whose piece is
  // at isrc (row max(ir, 0)).
  int iq, islot, ir, iitem;
  const T* isrc;
  int64_t row_step;
  A wt[9][CV], bias[CV];
  // Outputs ri - 1, ri, ri + 1 of each of the thread's columns (rows outside: never stored).
  A acc0[CW][CV], acc1[CW][CV], acc2[CW][CV];
  // The computing side: position q in slot `slot`, input row ri of item `item`; output row
  // max(ri - 1, 0) of the thread's first column at orow, rows out_row values apart.
  T* orow;
  int64_t out_row;
  int q, slot, ri, item;

  // Item `it` (image b, channels c0 ..): the offsets of its first value in src and in out.
  struct Item {
    int64_t src, out, c0;
  };
  PIPE_HD Item locate(const PipeArgs<T>& a, int it) const {
    const int b = it / a.chunks;
    const int64_t c0 = int64_t(it - b * a.chunks) * a.CH;
    return {b * a.sb + c0, b * a.N * a.C + c0, c0};
  }

  PIPE_HD const T* first_row(const PipeArgs<T>& a, int it) const {
    return a.src + locate(a, it).src + a.P * a.st + piece_g;
  }

  PIPE_HD void init(const PipeArgs<T>& a, int tid_, int nthreads_, int block, int grid,
                    T* buf) {
    L::place(a.W, a.CH, tid_, nthreads_);
    rows.set(buf);
    piece_g = L::piece_tok * a.st + L::piece_c;
    items = static_cast<int>(a.B * a.chunks);  // the launcher keeps it below 2^31
    step_items = grid;
    positions = block < items ? ((items - 1 - block) / step_items + 1) * (a.H + 2) : 0;
    iq = islot = 0;
    ir = -1;
    iitem = block;
    isrc = block < items ? first_row(a, block) : a.src;
    row_step = int64_t(a.W) * a.st;
#pragma unroll
    for (int k = 0; k < CW; ++k) {
#pragma unroll
      for (int e = 0; e < CV; ++e) acc0[k][e] = acc1[k][e] = acc2[k][e] = A(0);
    }
    orow = nullptr;
    out_row = int64_t(a.W) * a.C;
    q = slot = 0;
    ri = -1;
    item = block;
  }

  PIPE_HD void zero_pads(const PipeArgs<T>& a) const { L::zero_pads(rows, 1, NS, a.W, a.CH); }

  // Loads position iq into slot islot (zeros for rows -1 and H), and moves on a position. The
  // kernel commits a group after each, empty past the stream, so that every step waits for the
  // same count.
  PIPE_HD void issue(const PipeArgs<T>& a) {
    if (iq < positions && has_piece) {
      const bool in = static_cast<unsigned>(ir) < static_cast<unsigned>(a.H);
      rows.copy16(islot * row_vals + piece_s, isrc, in);
      if (in) isrc += row_step;
    }
    ++iq;
    islot = islot == NS - 1 ? 0 : islot + 1;
    if (++ir == a.H + 1) {
      ir = -1;
      iitem += step_items;
      if (iitem < items) isrc = first_row(a, iitem);
    }
  }

  // At a new item (ri == -1): its taps, bias and prefix tokens, and its first output row.
  PIPE_HD void begin(const PipeArgs<T>& a) {
    const Item at = locate(a, item);
    const T* img = a.src + at.src;
    T* out_img = a.out + at.out;
    orow = out_img + (a.P + w) * a.C + cv * CV;
    load_taps<T, CV>(wt, a.p, at.c0 + cv * CV, /*flip=*/false);
#pragma unroll
    for (int e = 0; e < CV; ++e) {
      bias[e] = a.p.bias != nullptr
                    ? static_cast<A>(peg_cuda::load_ro(a.p.bias + (at.c0 + cv * CV + e) * a.p.b_s))
                    : A(0);
    }
    copy_prefix(out_img, a.C, img, a.st, a.P, ppt, tid, nthreads);
  }

  // The position in slot `slot` (input row ri, landed) into the output rows it feeds: ri + 1
  // (tap row 0, after the bias), ri (tap row 1, then the residual after the centre tap) and
  // ri - 1 (tap row 2, which completes it).
  PIPE_HD void step(const PipeArgs<T>& a) {
    const T* row = rows.p + slot * row_vals + rd;
    A v[CW + 2][CV];  // columns w - 1 .. w + CW (zeros outside the row)
#pragma unroll
    for (int j = 0; j < CW + 2; ++j) load_vec<T, CV>(v[j], row + j * a.CH);
    const bool all_cols[3] = {true, true, true};
    const bool store = ri >= 1;
#pragma unroll
    for (int k = 0; k < CW; ++k) {
      A win[3][CV];  // columns w + k - 1 .. w + k + 1
#pragma unroll
      for (int j = 0; j < 3; ++j) {
#pragma unroll
        for (int e = 0; e < CV; ++e) win[j][e] = v[k + j][e];
      }
      add_row<A, CV, false>(acc0[k], acc1[k], acc2[k], bias, wt, win, all_cols);
      finish_row<T, CV>(store && (CW == 1 || w + k < a.W) ? orow + k * a.C : nullptr, acc0[k],
                        acc1[k], acc2[k]);
    }
    if (store) orow += out_row;
    ++q;
    slot = slot == NS - 1 ? 0 : slot + 1;
    if (++ri == a.H + 1) {
      ri = -1;
      item += step_items;
    }
  }
};

// One thread of the 3x3 backward: grad_x (the flipped taps over grad_out, taps on padding
// skipped, grad_out itself added after the centre tap) and its sums of grad_weight and
// grad_bias. Two rings of NS row buffers, grad_out and x, loaded position by position as in the
// forward, H + 3 positions an item (rows -1 .. H + 1). Step q reads grad_out row q and x row
// q - 1, so the kernel issues position q + NS - 2 into the buffers of position q - 2: up to
// NS - 2 rows of each in flight. x row r meets grad_out rows r + 1, r and r - 1 (tap rows 0, 1,
// 2), the last two kept as their centre values. A block's items share its chunk (gridDim.x is a
// multiple of chunks); at the end the kernel adds the threads' sums over the columns in shared
// memory, in order, into the block's slot of partials (put, then sum, tap by tap). GX: grad_x
// is wanted (a.grad_x not nullptr); without, only the sums.
template <typename T, int CV, int NS, bool GX = true>
struct PipeBackwardThread : PipeLayout<T, CV> {
  static_assert(NS >= 4, "the rows being read, and at least one more in flight");
  using A = acc_t<T>;
  using L = PipeLayout<T, CV>;
  using L::tid, L::nthreads, L::cv, L::w, L::ppt, L::row_vals, L::rd, L::has_piece, L::piece_s;

  SmemRows<T> rows;  // the grad_out ring, then the x ring at xring
  int xring;
  int positions, ib_step;
  int64_t c0;
  bool col_ok[3];
  // The issuing side: position iq into slot islot, row ir of the image whose pieces of row
  // max(ir, 0) are at gsrc and xsrc.
  int iq, islot, ir;
  const T* gsrc;
  const T* xsrc;
  int64_t g_row, x_row;
  A wf[9][CV];  // the flipped taps: wf[i][j] = w[2 - i][2 - j]
  A dw[9][CV], db[CV];
  // Windows that turn with the step's phase q % 3 rather than move (step_phase): grad_x of rows
  // ri - 1, ri, ri + 1 in acc[(q + 0, 1, 2) % 3]; grad_out at column w of rows ri - 2, ri - 1
  // in gh[(q + 1, 2) % 3], row ri going to gh[q % 3].
  A acc[3][CV], gh[3][CV];
  // The computing side: position q in slot `slot` (q - 1 in pslot), grad_out row ri of image b;
  // grad_x row max(ri - 1, 0) of the thread's column at orow, rows out_row values apart.
  T* orow;
  int64_t out_row;
  int q, slot, pslot, ri, b;

  PIPE_HD void init(const PipeBackwardArgs<T>& a, int tid_, int nthreads_, int block,
                    int grid, T* buf) {
    L::place(a.W, a.CH, tid_, nthreads_);
    rows.set(buf);
    xring = NS * row_vals;
    const int piece_tok = L::piece_tok, piece_c = L::piece_c;
    const int items = static_cast<int>(a.B * a.chunks);
    positions = block < items ? ((items - 1 - block) / grid + 1) * (a.H + 3) : 0;
    c0 = int64_t(block % a.chunks) * a.CH;  // the same for all the block's items
    ib_step = grid / a.chunks;
#pragma unroll
    for (int j = 0; j < 3; ++j) col_ok[j] = static_cast<unsigned>(w - 1 + j) < unsigned(a.W);
    iq = islot = 0;
    ir = -1;
    b = block / a.chunks;
    gsrc = a.grad + b * a.g_sb + (a.P + piece_tok) * a.g_st + c0 + piece_c;
    xsrc = a.x + b * a.x_sb + (a.P + piece_tok) * a.x_st + c0 + piece_c;
    g_row = int64_t(a.W) * a.g_st;
    x_row = int64_t(a.W) * a.x_st;
    load_taps<T, CV>(wf, a.p, c0 + cv * CV, /*flip=*/true);
#pragma unroll
    for (int e = 0; e < CV; ++e) {
#pragma unroll
      for (int t = 0; t < 9; ++t) dw[t][e] = A(0);
      db[e] = A(0);
#pragma unroll
      for (int k = 0; k < 3; ++k) acc[k][e] = gh[k][e] = A(0);
    }
    orow = nullptr;
    out_row = int64_t(a.W) * a.C;
    q = slot = 0;
    pslot = NS - 1;
    ri = -1;
  }

  PIPE_HD void zero_pads(const PipeBackwardArgs<T>& a) const {
    L::zero_pads(rows, 2, NS, a.W, a.CH);
  }

  // Loads position iq of both rings (zeros outside the image) and moves on a position.
  PIPE_HD void issue(const PipeBackwardArgs<T>& a) {
    if (iq < positions && has_piece) {
      const bool in = static_cast<unsigned>(ir) < static_cast<unsigned>(a.H);
      const int off = islot * row_vals + piece_s;
      rows.copy16(off, gsrc, in);
      rows.copy16(xring + off, xsrc, in);
      if (in) {
        gsrc += g_row;
        xsrc += x_row;
      }
    }
    ++iq;
    islot = islot == NS - 1 ? 0 : islot + 1;
    if (++ir == a.H + 2) {  // from row H of the image to row 0 of the block's next one
      ir = -1;
      gsrc += ib_step * a.g_sb - a.H * g_row;
      xsrc += ib_step * a.x_sb - a.H * x_row;
    }
  }

  // At a new item (ri == -1): grad_x's prefix tokens are grad_out's; its first row.
  PIPE_HD void begin(const PipeBackwardArgs<T>& a) {
    if constexpr (!GX) return;
    T* gx_img = a.grad_x + b * a.N * a.C + c0;
    orow = gx_img + (a.P + w) * a.C + cv * CV;
    const T* g_img = a.grad + b * a.g_sb + c0;
    copy_prefix(gx_img, a.C, g_img, a.g_st, a.P, ppt, tid, nthreads);
  }

  // The step of phase PH = q % 3 (the kernel unrolls its loop by 3; step() picks the phase).
  template <int PH>
  PIPE_HD void step_phase(const PipeBackwardArgs<T>& a) {
    A (&acc0)[CV] = acc[PH];
    A (&acc1)[CV] = acc[(PH + 1) % 3];
    A (&acc2)[CV] = acc[(PH + 2) % 3];
    const A (&g2)[CV] = gh[(PH + 1) % 3];
    const A (&g1)[CV] = gh[(PH + 2) % 3];
    const bool g_in = static_cast<unsigned>(ri) < static_cast<unsigned>(a.H);  // row ri exists
    A G[3][CV];
    const T* grow = rows.p + slot * row_vals + rd;
#pragma unroll
    for (int j = 0; j < 3; ++j) load_vec<T, CV>(G[j], grow + j * a.CH);
    keep_here(G);
    // grad_x: row ri feeds rows ri + 1 (flipped tap row 0), ri (row 1 and grad_out itself after
    // the centre tap) and ri - 1 (row 2, which completes it); rows and columns of padding skip.
    if (g_in) {
      if constexpr (GX) {
        const A zero[CV] = {};
        add_row<A, CV, true>(acc0, acc1, acc2, zero, wf, G, col_ok);
      }
#pragma unroll
      for (int e = 0; e < CV; ++e) db[e] += G[1][e];
    } else {
#pragma unroll
      for (int e = 0; e < CV; ++e) acc2[e] = A(0);
    }
    const bool store = GX && ri >= 1 && ri <= a.H;  // grad_x row ri - 1 is complete
    if (store) {  // acc0's slot is the next step's acc2
      peg_cuda::store_acc<T, CV>(orow, acc0);
      orow += out_row;
    }
    // The weight gradient: x row ri - 1 (zeros outside, multiplied) with grad_out rows ri
    // (tap row 0), ri - 1 (1) and ri - 2 (2), those in the image.
    if (ri >= 0) {
      A X[3][CV];
      const T* xrow = rows.p + xring + pslot * row_vals + rd;  // position q - 1
#pragma unroll
      for (int j = 0; j < 3; ++j) load_vec<T, CV>(X[j], xrow + j * a.CH);
      keep_here(X);
#pragma unroll
      for (int i = 0; i < 3; ++i) {
        const int gr = ri - i;
        if (gr >= 0 && gr < a.H) {
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
    for (int e = 0; e < CV; ++e) gh[PH][e] = G[1][e];  // over row ri - 3's
    ++q;
    pslot = slot;
    slot = slot == NS - 1 ? 0 : slot + 1;
    if (++ri == a.H + 2) {
      ri = -1;
      b += ib_step;
    }
  }

  PIPE_HD void step(const PipeBackwardArgs<T>& a) {
    switch (q % 3) {
      case 0: return step_phase<0>(a);
      case 1: return step_phase<1>(a);
      default: return step_phase<2>(a);
    }
  }

  // Tap t's sums (the bias's at t == 9) into red[w * CH + channel] (W x CH values).
  PIPE_HD void put(const PipeBackwardArgs<T>& a, A* red, int t) const {
#pragma unroll
    for (int e = 0; e < CV; ++e) {
      red[w * a.CH + cv * CV + e] = t < 9 ? dw[t < 9 ? t : 0][e] : db[e];
    }
  }

  // The block's sum over the columns of tap t, in column order, into its slot of partials.
  PIPE_HD void sum(const PipeBackwardArgs<T>& a, const A* red, int t, int block) const {
    const int64_t slot = block / a.chunks;
    for (int c = tid; c < a.CH; c += nthreads) {
      A s = A(0);
      for (int k = 0; k < a.W; ++k) s += red[k * a.CH + c];
      a.partials[(slot * 10 + t) * a.C + c0 + c] = s;
    }
  }
};

#if defined(__CUDACC__)

// A kernel's register limit: __maxnreg__ from CUDA 12.4 on; before, the kernels are bounded by
// their block size alone (more registers, fewer resident blocks, the same results).
#if __CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4)
#define PIPE_REGS(n) __maxnreg__(n)
#else
#define PIPE_REGS(n) __launch_bounds__(kMaxThreads)
#endif

__device__ __forceinline__ void cp_async_commit() {
#if PIPE_CP_ASYNC
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if PIPE_CP_ASYNC
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Registers of a forward thread. 4 channels of one column (the package's) fit 96 with no
// spills (sm_90), so that three blocks of 224 threads (CPVT-S) fit an SM; ptxas takes 112 when
// left free. Wider threads are left free.
template <int CV, int CW>
constexpr int pipe_forward_regs() {
  return CV * CW == 4 ? 96 : 255;
}

template <typename T, int CV, int NS, int CW = 1>
__global__ void PIPE_REGS((pipe_forward_regs<CV, CW>()))
    peg_pipe_forward_kernel(const PipeArgs<T> a) {
  extern __shared__ __align__(16) unsigned char pipe_smem_raw[];
  T* buf = reinterpret_cast<T*>(pipe_smem_raw);
  PipeForwardThread<T, CV, NS, CW> th;
  th.init(a, threadIdx.x, blockDim.x, blockIdx.x, gridDim.x, buf);
  if (th.positions == 0) return;
  th.zero_pads(a);  // seen by all after the first barrier below
#pragma unroll 1
  for (int k = 0; k < NS - 1; ++k) {  // the prologue: positions 0 .. NS - 2
    th.issue(a);
    cp_async_commit();
  }
#pragma unroll 1
  while (th.q < th.positions) {
    if (th.ri == -1) th.begin(a);
    cp_async_wait<NS - 2>();  // position q has landed (this thread's piece)
    __syncthreads();          // everyone's pieces; everyone done with position q - 1
    th.issue(a);              // position q + NS - 1, into the slot of position q - 1
    cp_async_commit();
    th.step(a);
  }
  cp_async_wait<0>();
}

// Registers of a backward thread: in 16-bit types 2 and 4 channels fit 96 and 144 with no
// spills (sm_90), so that three and two blocks of 224 threads (CPVT-S) fit an SM; ptxas takes
// 108 and 154 when left free. float32 is left free.
template <typename T, int CV>
constexpr int pipe_backward_regs() {
  return sizeof(T) != 2 ? 255 : CV == 2 ? 96 : CV == 4 ? 144 : 255;
}

template <typename T, int CV, int NS, bool GX = true>
__global__ void PIPE_REGS((pipe_backward_regs<T, CV>()))
    peg_pipe_backward_kernel(const PipeBackwardArgs<T> a) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char pipe_smem_raw[];
  PipeBackwardThread<T, CV, NS, GX> th;
  th.init(a, threadIdx.x, blockDim.x, blockIdx.x, gridDim.x,
          reinterpret_cast<T*>(pipe_smem_raw));
  th.zero_pads(a);  // seen by all after the first barrier below
#pragma unroll 1
  for (int k = 0; k < NS - 2; ++k) {  // the prologue: positions 0 .. NS - 3
    th.issue(a);
    cp_async_commit();
  }
  auto position = [&](auto phase) {
    if (th.ri == -1) th.begin(a);
    cp_async_wait<NS - 3>();  // position q has landed (this thread's pieces)
    __syncthreads();          // everyone's pieces; everyone done with position q - 1
    th.issue(a);              // position q + NS - 2, into the buffers of position q - 2
    cp_async_commit();
    th.template step_phase<decltype(phase)::value>(a);
  };
  // Unrolled by the windows' period, 3, so that they turn without moves.
#pragma unroll 1
  while (th.q < th.positions) {
    position(std::integral_constant<int, 0>{});
    if (th.q == th.positions) break;
    position(std::integral_constant<int, 1>{});
    if (th.q == th.positions) break;
    position(std::integral_constant<int, 2>{});
  }
  cp_async_wait<0>();
  A* red = reinterpret_cast<A*>(pipe_smem_raw);  // W x CH values (the rings are done)
#pragma unroll
  for (int t = 0; t <= 9; ++t) {  // unrolled: the sums stay in registers
    __syncthreads();
    th.put(a, red, t);
    __syncthreads();
    th.sum(a, red, t, blockIdx.x);
  }
}

#endif  // __CUDACC__

#undef PIPE_HD
#undef PIPE_CP_ASYNC
#undef PIPE_REGS

}  // namespace peg_pipe
}  // namespace cpvt
