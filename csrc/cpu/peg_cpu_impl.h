// CPU kernels of the fused PEG, forward and backward: the templates, included by one file per
// dtype (peg_cpu_<dtype>.cpp), each of which instantiates forward_typed and backward_typed for
// its dtype (CPVT_CPU_INSTANTIATE). peg_kernel.cpp holds the op that dispatches to them.
//
// Tokens are channel-last, so every kernel walks a grid row at a time and vectorizes along C.
// Each input row the convolution needs is converted once into a zero-padded, channel-blocked row
// of the accumulation type (float for float/half/bfloat16, double for double) that stays in
// cache while the kh output rows that use it are computed (RowRing): the zero padding of the
// convolution is then plain memory, the inner loops carry no bounds checks, and every vector
// they read is aligned and at a compile-time distance from its neighbours. For k = 1 and 3 with
// contiguous tokens and whole vectors of channels the convolutions read the rows where they lie
// instead (reads_in_place, PassRows), which saves the copy: the forward for every dtype (half
// types converted as they load), the backward's grad_x for float and double.
// ATen's vector types pick their width from CPU_CAPABILITY_* macros, which ATen's own build
// sets per dispatch target. This file is compiled for the build machine's ISA (CPVT_CPU_ARCH),
// so select the matching width from the compiler's target macros.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY_AVX2)
#define CPU_CAPABILITY_AVX2
#endif

#include "../peg.h"
#include "peg_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace cpvt {
namespace cpu {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Work is split into a fixed number of row chunks that depends only on the shape, never on
// the thread count, so the weight and bias gradients are summed in the same order every run.
constexpr int64_t kMaxChunks = 128;

#define CPVT_ALWAYS_INLINE inline __attribute__((always_inline))

template <typename A>
using Vec = at::vec::Vectorized<A>;

// n <= Vec::size() elements of src as a vector of the accumulation type, zero-filled past n.
template <typename T, typename A>
CPVT_ALWAYS_INLINE Vec<A> load_acc(const T* src, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return Vec<A>::loadu(src, n);
  } else {
    return at::vec::convert<A>(Vec<T>::loadu(src, n));
  }
}

// A full vector of the accumulation type from V elements of a source row of type S (S = A, or
// a half type converted as it loads: one or two instructions with AVX-512 or F16C, where ATen's
// conversion of a partial half vector costs several).
template <typename A, typename S>
CPVT_ALWAYS_INLINE Vec<A> load_row(const S* p) {
  if constexpr (std::is_same_v<S, A>) {
    return Vec<A>::loadu(p);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<A, float> && sizeof(Vec<A>) == 64) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      if constexpr (std::is_same_v<S, at::BFloat16>) {
        return Vec<A>(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      } else if constexpr (std::is_same_v<S, at::Half>) {
        return Vec<A>(_mm512_cvtph_ps(h));
      }
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<A, float> && sizeof(Vec<A>) == 32) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      if constexpr (std::is_same_v<S, at::BFloat16>) {
        return Vec<A>(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
      }
#if defined(__F16C__)
      if constexpr (std::is_same_v<S, at::Half>) return Vec<A>(_mm256_cvtph_ps(h));
#endif
    }
#endif
    return load_acc<S, A>(p, Vec<A>::size());
  }
}

// Row buffers start on a cache line (so every vector of a row is aligned): their storage has
// kAlign bytes to spare, and align_up finds the first line in it.
constexpr size_t kAlign = 64;
template <typename U>
U* align_up(U* p) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<U*>((addr + kAlign - 1) / kAlign * kAlign);
}

// Store modes of the output loops: a partial vector (masked), a full vector, or a full vector to
// a vector-aligned address with a non-temporal hint (see store_full).
constexpr int kPartial = 0, kFull = 1, kStream = 2;

// Rows of the grid in the layout the inner loops want: converted to the accumulation type,
// zero-padded by pw columns on both sides, and split into channel blocks of one vector each:
// element (column w, channel c) of a padded row is at [(c / V) * Wp + w + pw] * V + c % V, with
// Wp = W + 2 * pw. Inside a block every column is one aligned vector at a constant distance
// from its neighbours, the padding and the channel tail (zero lanes) need no bounds checks, and
// a vector is read from cache rather than from a stride-C address. A ring of such rows per
// thread (kh + 1 slots, so that a pair of output rows finds all its inputs), tagged by (image,
// row), holds each row while the output rows that read it are computed, so it is converted once.
template <typename T>
class RowRing {
 public:
  using A = acc_t<T>;
  static constexpr int64_t V = Vec<A>::size();
  RowRing(const Geometry& g, const T* base, int64_t slots)
      : g_(g), base_(base), nblk_((g.C + V - 1) / V), wp_(g.W + 2 * g.pw),
        width_(nblk_ * wp_ * V), slots_(slots),
        storage_(new A[static_cast<size_t>((slots + 1) * width_ + kAlign / sizeof(A))]),
        buf_(align_up(storage_.get())), tag_(slots, -1) {
    // Zero only what no row load writes: the padding columns of every block, and the zero row.
    for (int64_t s = 0; s < slots; ++s) {
      for (int64_t blk = 0; blk < nblk_; ++blk) {
        A* b = buf_ + s * width_ + blk * wp_ * V;
        std::fill_n(b, g.pw * V, A(0));
        std::fill_n(b + (g.pw + g.W) * V, g.pw * V, A(0));
      }
    }
    std::fill_n(buf_ + slots * width_, width_, A(0));
  }

  int64_t block_stride() const { return wp_ * V; }

  // A row of zeros for rows outside the grid: the padding is multiplied like any other input,
  // so an Inf or NaN tap meets 0 * Inf = NaN at the border exactly as in a padded convolution.
  const A* zeros() const { return buf_ + slots_ * width_; }

  // Whether padded row hh of image b is in the ring.
  bool has(int64_t b, int64_t hh) const { return tag_[hh % slots_] == b * g_.H + hh; }

  // Row hh of image b in the source tensor.
  const T* source(int64_t b, int64_t hh) const {
    return base_ + b * g_.sb + (g_.P + hh * g_.W) * g_.st;
  }

  // Padded row hh of image b (0 <= hh < H); converts it on a miss.
  const A* get(int64_t b, int64_t hh) {
    const int64_t slot = hh % slots_;
    const int64_t tag = b * g_.H + hh;
    A* row = buf_ + slot * width_;
    if (tag_[slot] != tag) {
      const T* src = base_ + b * g_.sb + (g_.P + hh * g_.W) * g_.st;
      const int64_t C = g_.C, full = C / V * V;
      for (int64_t w = 0; w < g_.W; ++w) {
        const T* s = src + w * g_.st;
        A* d = row + (w + g_.pw) * V;
        int64_t c = 0;
        for (; c < full; c += V, d += wp_ * V) load_acc<T, A>(s + c, V).store(d);
        if (c < C) load_acc<T, A>(s + c, C - c).store(d);  // zero lanes past C
      }
      tag_[slot] = tag;
    }
    return row;
  }

 private:
  const Geometry& g_;
  const T* base_;
  int64_t nblk_, wp_, width_, slots_;
  std::unique_ptr<A[]> storage_;
  A* buf_;
  std::vector<int64_t> tag_;
};

// Software prefetch of the source rows the next pass will convert, spread over the channel
// blocks of the current pass (step() once per block), into L2 (into L1 they would evict the ring
// rows the pass is reading). Without it the row copy waits on the misses of every line, and a
// burst of prefetches for a whole row fills the miss queue and stalls just the same. Up to two
// address ranges (the backward's grad_out and x rows). Measured on a 2-core Zen 4, B=32, C=192,
// k=3: backward 16-27% faster at 24x24 (inputs from DRAM), 3-7% at 14x14 (from L3).
class RowPrefetch {
 public:
  // CPVT_CPU_PREFETCH: unset, the pass's default (in_place_rows: also the rows read in place, else
  // only the rows copied into a ring); 1, also the rows read in place; 0, none. The forward reads
  // its rows in place in address order, which the hardware prefetchers follow: on a 2-core Xeon
  // the software prefetch of them made the k = 3 forward 4-8% slower (B=32, C=192, 14x14 and
  // 24x24, float32 and bfloat16, FusedPEG, 3 alternating rounds), on a 2-core Zen 5 2-14% slower
  // (op alone, 15 alternating rounds), while for k = 7 (rings) it keeps the float32
  // forward+backward 5-15% faster. The backward reads two tensors in place, a pass's rows of x
  // and of grad_out at once, which the prefetchers of a 2-core Zen 5 do not keep up with:
  // prefetching them made its backward 1.3-2.7x faster at 24x24 (B=32, C=192, float32 and
  // bfloat16, two series of 10 alternating rounds; inputs partly from DRAM) and 1.0-1.8x at
  // 14x14; on the Xeon it changed the backward alone by -5% to +5% (op alone, 10 alternating
  // rounds: faster at 14x14, slower in float32 at 24x24).
  explicit RowPrefetch(bool in_place_rows = false) {
    const std::optional<bool> on = env_flag("CPVT_CPU_PREFETCH");
    mode_ = !on ? (in_place_rows ? 2 : 1) : *on ? 2 : 0;
  }

  void clear() { n_ = 0; }

  // Queues the rows of image b from hh_lo to hh_hi that ring does not hold (nothing when the
  // tokens are not contiguous, as the range would then hold more than the rows).
  template <typename T>
  void add(const RowRing<T>& ring, const Geometry& g, int64_t b, int64_t hh_lo, int64_t hh_hi) {
    if (mode_ == 0) return;
    hh_lo = std::max<int64_t>(hh_lo, 0);
    hh_hi = std::min<int64_t>(hh_hi, g.H - 1);
    while (hh_lo <= hh_hi && ring.has(b, hh_lo)) ++hh_lo;
    while (hh_hi >= hh_lo && ring.has(b, hh_hi)) --hh_hi;
    if (hh_lo > hh_hi || g.st != g.C) return;
    add_span(ring.source(b, hh_lo), ring.source(b, hh_hi) + g.W * g.C);
  }

  // Queues the rows lo..hi of image b of the tokens at base that the pass just run, which read
  // the rows of image b_now up to read_hi, did not read (nothing unless tokens are contiguous).
  template <typename T>
  void add_unread(const T* base, const Geometry& g, int64_t b_now, int64_t read_hi, int64_t b,
                  int64_t lo, int64_t hi) {
    if (mode_ < 2) return;
    const int64_t first = std::max<int64_t>({b == b_now ? read_hi + 1 : 0, lo, 0});
    const int64_t last = std::min<int64_t>(hi, g.H - 1);
    if (first > last || g.st != g.C) return;
    const T* row = base + b * g.sb + g.P * g.st;
    add_span(row + first * g.W * g.st, row + (last + 1) * g.W * g.st);
  }

  // Queues the bytes [lo, hi).
  void add_span(const void* lo, const void* hi) {
    if (n_ == kRanges) return;
    p_[n_] = reinterpret_cast<uintptr_t>(lo) / kAlign * kAlign;
    end_[n_] = reinterpret_cast<uintptr_t>(hi);
    ++n_;
  }

  // Spreads the queued lines over `steps` calls of step().
  void spread(int64_t steps) {
    steps = std::max<int64_t>(steps, 1);
    for (int i = 0; i < n_; ++i) {
      const uintptr_t lines = (end_[i] - p_[i] + kAlign - 1) / kAlign;
      per_[i] = (lines + steps - 1) / steps * kAlign;
    }
  }

  CPVT_ALWAYS_INLINE void step() {
    for (int i = 0; i < n_; ++i) {
      const uintptr_t e = std::min(p_[i] + per_[i], end_[i]);
      for (uintptr_t q = p_[i]; q < e; q += kAlign) {
        __builtin_prefetch(reinterpret_cast<const void*>(q), 0, 2);  // read, into L2 (T1)
      }
      p_[i] = e;
    }
  }

 private:
  static constexpr int kRanges = 2;
  int mode_;  // 0: no prefetch, 1: ring rows only, 2: also rows read in place
  int n_ = 0;
  uintptr_t p_[kRanges] = {}, end_[kRanges] = {}, per_[kRanges] = {};
};

// Grid rows of the token tensor where they lie: row hh of image b, for any hh (a row of W * C
// zeros outside the grid).
template <typename T>
class SourceRows {
 public:
  SourceRows(const Geometry& g, const T* base)
      : g_(g), base_(base), zeros_(static_cast<size_t>(g.W * g.C), T(0)) {}
  const T* get(int64_t b, int64_t hh) const {
    return hh >= 0 && hh < g_.H ? base_ + b * g_.sb + (g_.P + hh * g_.W) * g_.st : zeros_.data();
  }

 private:
  const Geometry& g_;
  const T* base_;
  std::vector<T> zeros_;
};

// The grid rows the passes of a thread read: from a row ring, or (in_place) from the tensor
// itself. get() gives rows of the accumulation type (ring rows, or for float and double the
// source rows); source() gives source rows of any type, for the convolutions that convert as
// they load. For the inner loops: the distance between channel blocks, and the column stride of
// rows read in place (0: ring rows).
template <typename T>
class PassRows {
 public:
  using A = acc_t<T>;
  static constexpr int64_t V = Vec<A>::size();
  PassRows(const Geometry& g, const T* base, bool in_place)
      : g_(g), base_(base), in_place_(in_place) {
    // kh + 1 slots: a pair of output rows reads kh + 1 input rows.
    if (in_place) src_.emplace(g, base);
    else ring_.emplace(g, base, g.kh + 1);
  }

  // Row hh of image b (any hh: the zero row outside the grid).
  const A* get(int64_t b, int64_t hh) {
    if constexpr (std::is_same_v<T, A>) {
      if (in_place_) return src_->get(b, hh);
    }
    TORCH_INTERNAL_ASSERT(!in_place_);
    return hh >= 0 && hh < g_.H ? ring_->get(b, hh) : ring_->zeros();
  }

  // Source row hh of image b, read in place (any hh).
  const T* source(int64_t b, int64_t hh) const {
    TORCH_INTERNAL_ASSERT(in_place_);
    return src_->get(b, hh);
  }

  int64_t block_stride() const { return in_place_ ? V : ring_->block_stride(); }
  int64_t col0() const { return in_place_ ? 0 : g_.pw * V; }  // of a block, in elements
  int64_t col_stride() const { return in_place_ ? g_.st : V; }

  // Queues into pf the rows lo..hi of image b that the pass just run, which read the rows of
  // image b_now up to read_hi, did not read (ring: that the ring does not hold).
  void prefetch(RowPrefetch& pf, int64_t b_now, int64_t read_hi, int64_t b, int64_t lo,
                int64_t hi) const {
    if (in_place_) pf.add_unread(base_, g_, b_now, read_hi, b, lo, hi);
    else pf.add(*ring_, g_, b, lo, hi);
  }

 private:
  const Geometry& g_;
  const T* base_;
  bool in_place_;
  std::optional<SourceRows<T>> src_;
  std::optional<RowRing<T>> ring_;
};

// Loads of n <= size() taps (FULL: n == size(), no mask).
template <bool FULL, typename A>
CPVT_ALWAYS_INLINE Vec<A> ld(const A* p, int64_t n) {
  if constexpr (FULL) return Vec<A>::loadu(p);
  else return Vec<A>::loadu(p, n);
}

// Stores a full vector to a vector-aligned dst with a non-temporal hint when STREAM: the line
// goes to memory without first being read into cache (no read-for-ownership), which saves a
// third of the memory traffic when the output is too large to stay in cache anyway.
template <bool STREAM, typename A>
CPVT_ALWAYS_INLINE void store_full(const Vec<A>& v, A* dst) {
#if defined(__AVX512F__)
  if constexpr (STREAM && sizeof(Vec<A>) == 64) {
    __m512 raw;
    std::memcpy(&raw, &v, sizeof(raw));
    _mm512_stream_ps(reinterpret_cast<float*>(dst), raw);
    return;
  }
#elif defined(__AVX2__)
  if constexpr (STREAM && sizeof(Vec<A>) == 32) {
    __m256 raw;
    std::memcpy(&raw, &v, sizeof(raw));
    _mm256_stream_ps(reinterpret_cast<float*>(dst), raw);
    return;
  }
#endif
  v.store(dst);
}

// Stores n <= Vec<A>::size() elements of v to dst, rounding to T.
template <int M, typename T, typename A>
CPVT_ALWAYS_INLINE void store_out(const Vec<A>& v, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    if constexpr (M == kStream) store_full<true>(v, dst);
    else if constexpr (M == kFull) v.store(dst);
    else v.store(dst, n);
  } else {
#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
    // One instruction (round to nearest even, NaN stays NaN) instead of ATen's integer
    // emulation of the rounding, which costs more vector operations than the taps themselves.
    // It flushes results below float's normal range (about 1.2e-38) to zero, as the eager
    // bfloat16 convolution does on this CPU (ATen's emulation would keep them).
    if constexpr (std::is_same_v<T, at::BFloat16> && sizeof(Vec<A>) == 64) {
      __m512 raw;
      std::memcpy(&raw, &v, sizeof(raw));
      const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(raw));
      if constexpr (M == kPartial) {
        _mm256_mask_storeu_epi16(dst, static_cast<__mmask16>((1u << n) - 1), h);
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), h);
      }
      return;
    }
#elif defined(CPU_CAPABILITY_AVX2)
    // ATen's rounding (round to nearest even, NaN to 0xffff: bitwise the same results) in fewer
    // operations: the NaN mask ORed in before the shift instead of a blend after it, and the two
    // halves packed with one 128-bit instruction instead of a 256-bit pack and a lane
    // permutation, stored as 16 bytes instead of through ATen's partial-vector copy. The
    // rounding costs as many vector operations as the taps (a 256-bit operation is two on Zen 1).
    if constexpr (std::is_same_v<T, at::BFloat16> && sizeof(Vec<A>) == 32) {
      __m256 raw;
      std::memcpy(&raw, &v, sizeof(raw));
      const __m256i bits = _mm256_castps_si256(raw);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i t = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb);
      t = _mm256_or_si256(t, _mm256_castps_si256(_mm256_cmp_ps(raw, raw, _CMP_UNORD_Q)));
      t = _mm256_srli_epi32(t, 16);
      const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
      if constexpr (M == kPartial) {
        alignas(16) uint16_t tmp[8];
        _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
        std::memcpy(dst, tmp, static_cast<size_t>(n) * sizeof(uint16_t));
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), h);
      }
      return;
    }
#endif
    at::vec::convert<T>(v).store(dst, M == kPartial ? n : Vec<A>::size());
  }
}

// Orders this thread's non-temporal stores before whatever it does next (they are weakly
// ordered): called by each thread after its last streaming store.
inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Returns v unchanged, but through an empty asm statement the compiler cannot see into, so it
// keeps v in a register: otherwise GCC re-reads an input vector from memory as the operand of
// each FMA that uses it, and the loads, not the FMAs, bound the loop.
template <typename A>
CPVT_ALWAYS_INLINE Vec<A> in_register(Vec<A> v) {
#if defined(__GNUC__) && defined(__AVX512F__)
  if constexpr (sizeof(Vec<A>) == 64) {
    __m512 raw;
    std::memcpy(&raw, &v, sizeof(raw));
    asm("" : "+v"(raw));
    std::memcpy(static_cast<void*>(&v), &raw, sizeof(raw));
  }
#elif defined(__GNUC__) && defined(__AVX2__)
  if constexpr (sizeof(Vec<A>) == 32) {
    __m256 raw;
    std::memcpy(&raw, &v, sizeof(raw));
    asm("" : "+x"(raw));
    std::memcpy(static_cast<void*>(&v), &raw, sizeof(raw));
  }
#endif
  return v;
}

#if defined(__GNUC__) && defined(__AVX512F__)
// The same for a raw AVX-512 vector (__m512, __m512i), for the loops written in intrinsics.
template <typename R>
CPVT_ALWAYS_INLINE R in_register_raw(R v) {
  asm("" : "+v"(v));
  return v;
}
#endif

// Calls block(std::integral_constant<int, n>{}, w0) over the columns [0, W): blocks of WB (8, 4,
// 2 or 1), then at most one each of the widths 4, 2 and 1 below WB, so that every block width is
// a compile-time constant.
template <int WB, typename F>
CPVT_ALWAYS_INLINE void column_blocks(int64_t W, F&& block) {
  static_assert(WB == 1 || WB == 2 || WB == 4 || WB == 8, "block widths are powers of two <= 8");
  int64_t w0 = 0;
  for (; w0 + WB <= W; w0 += WB) block(std::integral_constant<int, WB>{}, w0);
  if constexpr (WB > 4) {
    if (w0 + 4 <= W) {
      block(std::integral_constant<int, 4>{}, w0);
      w0 += 4;
    }
  }
  if constexpr (WB > 2) {
    if (w0 + 2 <= W) {
      block(std::integral_constant<int, 2>{}, w0);
      w0 += 2;
    }
  }
  if constexpr (WB > 1) {
    if (w0 < W) block(std::integral_constant<int, 1>{}, w0);
  }
}

// One output row of the convolution for one block of channels:
//   out[w, c] = bias[c] + sum_{i, j} wt[i*kw + j][c] * r[i][w + j] + r[ph][w + pw]
// r[i] is the block of padded input row h + i - ph (a zero row outside the grid). The residual
// is its own term, not folded into the centre tap, so that Inf and NaN propagate exactly as in
// conv(x) + x.
//
// Square kernels K = 1, 3, 5, 7 (the sizes PEG uses) are fully unrolled: WB outputs along w
// accumulate in registers while the input row slides past them, so each input vector is loaded
// once for every tap that reads it, and for K <= 3 the K*K weight vectors stay in registers
// across the whole row. RB = 2 computes two consecutive output rows at once from K + 1 input
// rows (r[0..K]), so each of the K - 1 shared input vectors feeds both: with K = 3 that cuts the
// loads per FMA enough that the FMAs, not the loads, set the pace. Output row p is at
// out + p * row_stride.
//
// DIRECT: r[i] is the unpadded source row itself (column w at r[i] + w * cs, full vectors),
// read where it lies instead of from a ring row; L and R say that the block starts at column 0
// or ends at column W - 1, where the columns of the padding are a vector of zeros (multiplied
// like any other input, as in the ring's padding).
template <int K, int WB, int RB, int M, typename T, typename A, bool DIRECT = false,
          bool L = false, bool R = false, typename S = A>
CPVT_ALWAYS_INLINE void conv_block_k(const S* const* r, const Vec<A>* wv, const A* wt,
                                     const Vec<A>& b, int64_t w0, int64_t C, int64_t n,
                                     int64_t row_stride, T* out, int64_t cs = 0) {
  constexpr int64_t V = Vec<A>::size();
  constexpr bool FULL = M != kPartial;
  constexpr bool kRegWeights = K <= 3;
  Vec<A> acc[RB][WB];
#pragma GCC unroll 8
  for (int p = 0; p < RB; ++p) {
#pragma GCC unroll 16
    for (int q = 0; q < WB; ++q) acc[p][q] = b;
  }
  const Vec<A> zero = in_register<A>(Vec<A>(A(0)));
#pragma GCC unroll 16
  for (int i = 0; i < K + RB - 1; ++i) {
    const S* ri = DIRECT ? r[i] + (w0 - K / 2) * cs : r[i] + w0 * V;
#pragma GCC unroll 16
    for (int t = 0; t < WB + K - 1; ++t) {
      const bool pad = DIRECT && ((L && t < K / 2) || (R && t >= WB + K / 2));
      const Vec<A> v = pad ? zero : in_register<A>(load_row<A>(ri + t * (DIRECT ? cs : V)));
#pragma GCC unroll 8
      for (int p = 0; p < RB; ++p) {
        const int ki = i - p;  // the kernel row input row i is for output row p
        if (ki < 0 || ki >= K) continue;
#pragma GCC unroll 8
        for (int j = 0; j < K; ++j) {
          const int q = t - j;
          if (q >= 0 && q < WB) {
            const Vec<A> wij =
                kRegWeights ? wv[ki * K + j] : ld<FULL>(wt + (ki * K + j) * C, n);
            acc[p][q] = at::vec::fmadd(wij, v, acc[p][q]);
          }
        }
        if (ki == K / 2) {
          const int q = t - K / 2;
          if (q >= 0 && q < WB) acc[p][q] = acc[p][q] + v;
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < RB; ++p) {
    T* o = out + p * row_stride + w0 * C;
#pragma GCC unroll 16
    for (int q = 0; q < WB; ++q, o += C) store_out<M>(acc[p][q], o, n);
  }
}

template <int K, int RB, int M, typename T, typename A>
CPVT_ALWAYS_INLINE void conv_cols_k(const A* const* r, const A* wt, const A* bias, int64_t W,
                                    int64_t C, int64_t n, int64_t row_stride, T* out) {
  // Registers (AVX-512): RB * WB accumulators + K*K weights (K <= 3) + bias + input <= 32.
  constexpr int WB = 8;
  constexpr bool FULL = M != kPartial;
  Vec<A> wv[K <= 3 ? K * K : 1];
  if constexpr (K <= 3) {
#pragma GCC unroll 16
    for (int t = 0; t < K * K; ++t) wv[t] = ld<FULL>(wt + t * C, n);
  }
  const Vec<A> b = ld<FULL>(bias, n);
  column_blocks<WB>(W, [&](auto nb, int64_t w0) {
    conv_block_k<K, decltype(nb)::value, RB, M, T, A>(r, wv, wt, b, w0, C, n, row_stride, out);
  });
}

// The column blocks column_blocks<WB> walks for W columns.
template <int WB = 8>
int64_t column_block_count(int64_t W) {
  int64_t count = 0;
  column_blocks<WB>(W, [&](auto, int64_t) { ++count; });
  return count;
}

// RB consecutive output rows of a K x K kernel (K = 1, 3) from source rows read in place
// (rows[i]: column w at rows[i] + w * cs, element type S, converted as it loads; C a whole
// number of vectors). Columns outermost, every channel block of a column block in turn: the
// rows are read, and the output written, in address order (blocks of WB tokens of C channels
// each), which the hardware prefetchers follow, where channel blocks outermost would walk each
// row C / V times at a stride of C elements. The taps of a channel block are reloaded for each
// column block (from L1; the loop is bound by memory, not by loads). Columns outermost against
// channel blocks outermost, B=32, C=192, 2 threads on a 2-core Xeon (AVX-512), in a loop of the
// forward alone: float32 4-5% faster at 14x14 and 24x24, bfloat16 10% and 25%. One prefetch
// step per column block.
template <int K, int RB, int WB, typename T, typename A, typename S>
void conv_row_direct(const S* const* rows, const A* wt, const A* bias, int64_t W, int64_t C,
                     bool stream, int64_t row_stride, T* out, RowPrefetch& pf, int64_t cs) {
  constexpr int64_t V = Vec<A>::size();
  column_blocks<WB>(W, [&](auto nb, int64_t w0) {
    constexpr int NB = decltype(nb)::value;
    pf.step();
    // The channel blocks of this column block, with the store mode and the edges (does it start
    // or end the row) known at compile time: no branch inside the loop.
    auto channels = [&](auto mode, auto lc, auto rc) {
      for (int64_t c0 = 0; c0 < C; c0 += V) {
        const S* r[K + RB - 1];
#pragma GCC unroll 8
        for (int i = 0; i < K + RB - 1; ++i) r[i] = rows[i] + c0;
        Vec<A> wv[K * K];
#pragma GCC unroll 16
        for (int t = 0; t < K * K; ++t) wv[t] = Vec<A>::loadu(wt + t * C + c0);
        const Vec<A> b = Vec<A>::loadu(bias + c0);
        conv_block_k<K, NB, RB, decltype(mode)::value, T, A, true, decltype(lc)::value,
                     decltype(rc)::value>(r, wv, wt + c0, b, w0, C, V, row_stride, out + c0,
                                          cs);
      }
    };
    const bool left = w0 == 0, right = w0 + NB == W;
    auto edges = [&](auto mode) {
      using t_ = std::true_type;
      using f_ = std::false_type;
      if constexpr (K == 1) {
        channels(mode, f_{}, f_{});
      } else if (left && right) {
        channels(mode, t_{}, t_{});
      } else if (left) {
        channels(mode, t_{}, f_{});
      } else if (right) {
        channels(mode, f_{}, t_{});
      } else {
        channels(mode, f_{}, f_{});
      }
    };
    if (stream) edges(std::integral_constant<int, kStream>{});
    else edges(std::integral_constant<int, kFull>{});
  });
}

// Any kernel size: taps at run time, four outputs along w at a time.
template <int WB, int M, typename T, typename A>
inline void conv_block_rt(const A* const* r, int64_t kh, int64_t kw, const A* wt,
                          const Vec<A>& b, int64_t w0, int64_t C, int64_t n, T* out) {
  constexpr int64_t V = Vec<A>::size();
  constexpr bool FULL = M != kPartial;
  Vec<A> acc[WB];
#pragma GCC unroll 16
  for (int q = 0; q < WB; ++q) acc[q] = b;
  for (int64_t i = 0; i < kh; ++i) {
    const A* ri = r[i] + w0 * V;
    for (int64_t j = 0; j < kw; ++j) {
      const Vec<A> wij = ld<FULL>(wt + (i * kw + j) * C, n);
#pragma GCC unroll 16
      for (int q = 0; q < WB; ++q) {
        acc[q] = at::vec::fmadd(wij, Vec<A>::loadu(ri + (q + j) * V), acc[q]);
      }
    }
    if (i == kh / 2) {
#pragma GCC unroll 16
      for (int q = 0; q < WB; ++q) acc[q] = acc[q] + Vec<A>::loadu(ri + (q + kw / 2) * V);
    }
  }
  T* o = out + w0 * C;
#pragma GCC unroll 16
  for (int q = 0; q < WB; ++q, o += C) store_out<M>(acc[q], o, n);
}

template <int M, typename T, typename A>
void conv_cols_rt(const A* const* r, int64_t kh, int64_t kw, const A* wt, const A* bias,
                  int64_t W, int64_t C, int64_t n, T* out) {
  constexpr bool FULL = M != kPartial;
  const Vec<A> b = ld<FULL>(bias, n);
  int64_t w0 = 0;
  for (; w0 + 4 <= W; w0 += 4) conv_block_rt<4, M>(r, kh, kw, wt, b, w0, C, n, out);
  for (; w0 < W; ++w0) conv_block_rt<1, M>(r, kh, kw, wt, b, w0, C, n, out);
}

// RB (1 or 2) consecutive output rows, all channel blocks. rows[i] are padded ring rows (kh +
// RB - 1 of them), block_stride the distance between their channel blocks; wt is (kh*kw, C),
// bias (C,); out is the first row's W tokens, row_stride the distance to the next row's. With
// stream, full vectors are stored with a non-temporal hint (out and C must keep them aligned).
// One prefetch step per channel block.
template <int K, int RB, typename T, typename A>
void conv_row(const A* const* rows, int64_t block_stride, int64_t kh, int64_t kw, const A* wt,
              const A* bias, int64_t W, int64_t C, bool stream, int64_t row_stride, T* out,
              RowPrefetch& pf) {
  constexpr int64_t V = Vec<A>::size();
  const A* r[K > 0 ? K + RB - 1 : kMaxKernelSize];
  for (int64_t c0 = 0, blk = 0; c0 < C; c0 += V, ++blk) {
    pf.step();
    for (int64_t i = 0; i < (K > 0 ? K + RB - 1 : kh); ++i) r[i] = rows[i] + blk * block_stride;
    const int64_t n = std::min<int64_t>(V, C - c0);
    const A* w = wt + c0;
    const A* b = bias + c0;
    T* o = out + c0;
    if constexpr (K > 0) {
      if (n < V) conv_cols_k<K, RB, kPartial>(r, w, b, W, C, n, row_stride, o);
      else if (stream) conv_cols_k<K, RB, kStream>(r, w, b, W, C, n, row_stride, o);
      else conv_cols_k<K, RB, kFull>(r, w, b, W, C, n, row_stride, o);
    } else {
      if (n < V) conv_cols_rt<kPartial>(r, kh, kw, w, b, W, C, n, o);
      else if (stream) conv_cols_rt<kStream>(r, kh, kw, w, b, W, C, n, o);
      else conv_cols_rt<kFull>(r, kh, kw, w, b, W, C, n, o);
    }
  }
}

// The kernel sizes with an unrolled path (the square ones PEG uses); those also compute two
// output rows per pass.
inline bool pairs_rows(int64_t kh, int64_t kw) {
  return kh == kw && (kw == 1 || kw == 3 || kw == 5 || kw == 7);
}

// Output rows of the pass that starts at grid row r (of all B * H) in a thread's range [.., end):
// two where the kernel has a two-row path and both rows are in the range and in one image.
inline int64_t pass_rows(bool pairs, int64_t r, int64_t end, int64_t H) {
  return (pairs && r + 1 < end && r % H + 1 < H) ? 2 : 1;
}

// Grid rows per parallel task: enough elements (32K) to pay for the task's row ring.
inline int64_t row_grain(const Geometry& g) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.W * g.C));
}

template <int RB, typename T, typename A>
void conv_rows_unrolled(const A* const* rows, int64_t block_stride, int64_t k, const A* wt,
                        const A* bias, int64_t W, int64_t C, bool stream, int64_t row_stride,
                        T* out, RowPrefetch& pf) {
  switch (k) {
    case 1: return conv_row<1, RB>(rows, block_stride, k, k, wt, bias, W, C, stream, row_stride, out, pf);
    case 3: return conv_row<3, RB>(rows, block_stride, k, k, wt, bias, W, C, stream, row_stride, out, pf);
    case 5: return conv_row<5, RB>(rows, block_stride, k, k, wt, bias, W, C, stream, row_stride, out, pf);
    default: return conv_row<7, RB>(rows, block_stride, k, k, wt, bias, W, C, stream, row_stride, out, pf);
  }
}

// nrows (1, or 2 when pairs_rows) consecutive output rows from the padded ring rows
// rows[0 .. kh + nrows - 2].
template <typename T, typename A>
void conv_row_dispatch(const A* const* rows, int64_t block_stride, int64_t kh, int64_t kw,
                       const A* wt, const A* bias, int64_t W, int64_t C, bool stream,
                       T* out, int64_t nrows, int64_t row_stride, RowPrefetch& pf) {
  if (!pairs_rows(kh, kw)) {
    TORCH_INTERNAL_ASSERT(nrows == 1);
    return conv_row<0, 1>(rows, block_stride, kh, kw, wt, bias, W, C, stream, 0, out, pf);
  }
  if (nrows == 2) {
    return conv_rows_unrolled<2>(rows, block_stride, kw, wt, bias, W, C, stream, row_stride, out,
                                 pf);
  }
  return conv_rows_unrolled<1>(rows, block_stride, kw, wt, bias, W, C, stream, 0, out, pf);
}

// The size of the last-level cache in bytes, 0 where it is unknown: the kernel's description
// of it (glibc's sysconf figure for it can be a multiple of the real size on virtual machines).
inline int64_t llc_bytes() {
  static const int64_t bytes = [] {
    int64_t llc = 0;
    int best_level = 0;
    for (int index = 0; index < 8; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
      int level = 0;
      long long kib = 0;
      if (std::FILE* f = std::fopen((dir + "/level").c_str(), "r")) {
        if (std::fscanf(f, "%d", &level) != 1) level = 0;
        std::fclose(f);
      }
      if (std::FILE* f = std::fopen((dir + "/size").c_str(), "r")) {
        if (std::fscanf(f, "%lldK", &kib) != 1) kib = 0;
        std::fclose(f);
      }
      if (level > best_level && kib > 0) {
        best_level = level;
        llc = kib * 1024;
      }
    }
    return llc;
  }();
  return bytes;
}

// The width of the column blocks of the backward's grad_x convolution over rows read in place.
template <typename T>
constexpr int direct_block_cols() {
  return sizeof(T) >= 4 ? 2 : 4;
}

// The same from source rows read in place (reads_in_place: k = 1 or 3), column stride cs.
template <typename T, typename A, typename S>
void conv_row_dispatch_direct(const S* const* rows, int64_t k, const A* wt, const A* bias,
                              int64_t W, int64_t C, bool stream, T* out, int64_t nrows,
                              int64_t row_stride, RowPrefetch& pf, int64_t cs) {
  TORCH_INTERNAL_ASSERT(k == 1 || k == 3);
  constexpr int WB = direct_block_cols<T>();
  if (k == 1) {
    if (nrows == 2) return conv_row_direct<1, 2, WB>(rows, wt, bias, W, C, stream, row_stride, out, pf, cs);
    return conv_row_direct<1, 1, WB>(rows, wt, bias, W, C, stream, 0, out, pf, cs);
  }
  if (nrows == 2) return conv_row_direct<3, 2, WB>(rows, wt, bias, W, C, stream, row_stride, out, pf, cs);
  return conv_row_direct<3, 1, WB>(rows, wt, bias, W, C, stream, 0, out, pf, cs);
}

// The forward's passes over rows read in place: up to forward_block_rows<T>(narrow) output rows
// at a time (fewer where an image or a thread's range ends), in column blocks of
// forward_block_cols<T>(narrow). Taller blocks than the backward's grad_x (2 rows x
// direct_block_cols<T>()): each input row is read by fewer passes.
// The block's accumulators, its nine taps (k = 3), the zero vector of the padding and the input
// vector must fit the vector registers: 32 with AVX-512, 16 with AVX2.
// AVX-512: alternating processes on a 2-core Xeon, B=32, C=192, 14x14 / 24x24 / 32x32, a copy of
// the loop outside torch (bitwise the same outputs): float32 with 4 x 2 blocks (rows x columns)
// 0.18 / 0.52-0.54 / 0.95 ms against 0.21-0.23 / 0.64-0.69 / 1.18 ms for 2 x 8 (x 1 and 4 x 4
// within 5% of 4 x 2); bfloat16 with 4 x 4 0.13-0.14 / 0.40-0.41 / 0.72 ms against 0.14-0.15 /
// 0.41-0.44 / 0.77-0.79 (where the conversions make the loop bound by the vector units, and the
// wider block shares each converted vector among more outputs; 5 or more rows of 4 columns spill
// registers). float32 and float64 now take 8 x 1 blocks (8 accumulators): each input row is read
// by fewer passes again, and fewer rows and columns are in flight at once. In the op (builds
// alternating in separate processes, 16 rounds, 2 threads, same 2-core Emerald Rapids Xeon,
// bitwise the same outputs) 0.176 / 0.499 ms at 14x14 / 24x24 against 0.185 / 0.532 for 4 x 2
// (medians; 5% / 7% faster); other shapes within 4% either way (B=8 and 4, B=16 32x32, B=128
// C=384 14x14), 16x192x32 the worst at 1-8% slower.
// AVX2 (a 2-core Zen 1 EPYC with 8 MB of L3, builds of the op alternating in separate
// processes, fastest sample, C=192; bench/results/2026-12-04_cpu-amd-epyc-zen1): bfloat16 3 x 2,
// one thread, B=32, 14x14 / 24x24: 1.59-1.82 / 4.82-5.23 ms against 1.78-2.68 / 5.41-8.13 for
// 4 x 4, 1.89-1.96 / 5.33-7.44 for 4 x 1 and 1.75-2.19 / 5.10-6.56 for 2 x 2. float32 keeps 4 x 2
// (which spills a little: 8 accumulators + 9 taps) while the input fits in the last-level
// cache and takes 4 x 1 (narrow) beyond it, 2 threads: B=8, 24x24 (3.5 MB) 0.35-0.37 ms with
// 4 x 2 against 0.40-0.41 with 4 x 1, and B=32, 14x14 (4.8 MB) 0.50-0.53 against 0.58-0.60; but
// B=96, 14x14 (14.5 MB) 2.66-2.83 against 2.15-2.21, B=32, 24x24 (14 MB) 2.49-2.67 against
// 1.85-1.88, B=32, 32x32 (25 MB) 4.44-4.65 against 3.22-3.24 (streaming stores on or off alike).
// 3 x 2 and 2 x 2 were no better in cache and slower beyond it.
// The narrow blocks are now 6 x 1 (6 accumulators): 4 x 1 leaves each FMA pipe waiting on the
// latency of 4 dependent chains (a 2-core Zen 3 guest, one thread, B=1 in cache: 0.062 ms at
// 24x24 against 0.041-0.043 for 4 x 2 and 6 x 1). Beyond the cache, 2 threads, C=192, medians
// of 6 alternating rounds' fastest samples, 6 x 1 against 4 x 1: B=32 at 24x24 (14 MB) 1.17
// against 1.36 ms, B=24 (10.6 MB) 0.67 against 1.03, B=96 at 14x14 1.13 against 1.60, B=32
// at 32x32 2.56 against 2.89; 5 x 1 and 8 x 1 within the noise of 6 x 1; below 10 MB the wide
// 4 x 2 blocks stay the faster (B=16 at 24x24: 0.32 against 0.36;
// bench/results/2026-12-07_cpu-amd-epyc-zen3/ab/block_rows_*).
template <typename T>
constexpr int forward_block_cols(bool narrow) {
  if constexpr (sizeof(Vec<float>) >= 64) return sizeof(T) >= 4 ? 1 : 4;
  return sizeof(T) >= 4 ? (narrow ? 1 : 2) : 2;
}
template <typename T>
constexpr int64_t forward_block_rows(bool narrow) {
  if constexpr (sizeof(Vec<float>) >= 64) return sizeof(T) >= 4 ? 8 : 4;
  return sizeof(T) >= 4 ? (narrow ? 6 : 4) : 3;
}
// Whether the narrow and wide blocks differ in shape (AVX2, float and double).
template <typename T>
constexpr bool forward_blocks_differ() {
  return forward_block_cols<T>(true) != forward_block_cols<T>(false) ||
         forward_block_rows<T>(true) != forward_block_rows<T>(false);
}
// Whether the forward of g takes the narrow column blocks: the input is larger than the
// last-level cache or than 10 MiB, whichever is less, or CPVT_CPU_NARROW_BLOCKS=1 (0: never).
// Only where the two shapes differ (AVX2, float and double). The 10 MiB: on a 2-core Zen 3
// guest with 32 MiB of L3 (shared with other guests' cores) the narrow blocks (4 x 1 then) were
// the faster from 10.6 MB of input up (B=24..32 at 24x24: 1.0-1.4 against 1.3-2.1 ms, B=96 at
// 14x14; medians of the fastest samples of 5 alternating rounds, 2 threads, no streaming stores),
// the wide ones up to 9.7 MB (B=16..20 at 24x24, B=64 at 14x14; 8 rounds), as in the Zen 1 runs
// above, whose 8 MB of L3 set the limit there (bench/results/2026-12-07_cpu-amd-epyc-zen3).
template <typename T>
bool forward_narrow_blocks(const Geometry& g) {
  if constexpr (!forward_blocks_differ<T>()) return false;
  if (const std::optional<bool> on = env_flag("CPVT_CPU_NARROW_BLOCKS")) return *on;
  constexpr int64_t kMostWide = int64_t(10) << 20;
  const int64_t llc = llc_bytes();
  const int64_t limit = llc > 0 ? std::min(llc, kMostWide) : kMostWide;
  return g.B * g.N * g.C * static_cast<int64_t>(sizeof(T)) > limit;
}
// The most rows of any forward pass over rows read in place (float's narrow blocks are the
// tallest).
constexpr int64_t kDirectRows = forward_block_rows<float>(true);
static_assert(kDirectRows >= forward_block_rows<float>(false) &&
              kDirectRows >= forward_block_rows<double>(true) &&
              kDirectRows >= forward_block_rows<double>(false) &&
              kDirectRows >= forward_block_rows<at::Half>(true) &&
              kDirectRows >= forward_block_rows<at::Half>(false));

template <typename T>
int64_t direct_pass_rows(int64_t r, int64_t end, int64_t H, bool narrow) {
  return std::min<int64_t>({forward_block_rows<T>(narrow), end - r, H - r % H});
}

template <typename T, typename A, typename S>
void conv_rows_direct_forward(const S* const* rows, int64_t k, const A* wt, const A* bias,
                              int64_t W, int64_t C, bool stream, T* out, int64_t nrows,
                              int64_t row_stride, RowPrefetch& pf, int64_t cs, bool narrow) {
  constexpr int64_t kWideRows = forward_block_rows<T>(false);
  constexpr int64_t RB = std::max(forward_block_rows<T>(true), kWideRows);
  TORCH_INTERNAL_ASSERT((k == 1 || k == 3) && nrows >= 1 &&
                        nrows <= forward_block_rows<T>(narrow));
  constexpr int kWide = forward_block_cols<T>(false);
  auto go = [&](auto kc, auto rc) {
    constexpr int R = decltype(rc)::value;
    if constexpr (forward_blocks_differ<T>()) {
      constexpr int kNarrow = forward_block_cols<T>(true);
      if (narrow) {
        return conv_row_direct<decltype(kc)::value, R, kNarrow>(rows, wt, bias, W, C, stream,
                                                                 row_stride, out, pf, cs);
      }
    }
    if constexpr (R <= kWideRows) {  // (taller passes are narrow ones: asserted above)
      conv_row_direct<decltype(kc)::value, R, kWide>(rows, wt, bias, W, C, stream, row_stride,
                                                     out, pf, cs);
    }
  };
  // The pass heights up to RB, each a compile-time constant.
  auto rows_of = [&](auto kc) {
    if constexpr (RB >= 8) {
      if (nrows == 8) return go(kc, std::integral_constant<int, 8>{});
      if (nrows == 7) return go(kc, std::integral_constant<int, 7>{});
    }
    if constexpr (RB >= 6) {
      if (nrows == 6) return go(kc, std::integral_constant<int, 6>{});
      if (nrows == 5) return go(kc, std::integral_constant<int, 5>{});
    }
    if constexpr (RB >= 4) {
      if (nrows == 4) return go(kc, std::integral_constant<int, 4>{});
    }
    if constexpr (RB >= 3) {
      if (nrows == 3) return go(kc, std::integral_constant<int, 3>{});
    }
    if constexpr (RB >= 2) {
      if (nrows == 2) return go(kc, std::integral_constant<int, 2>{});
    }
    return go(kc, std::integral_constant<int, 1>{});
  };
  if (k == 1) rows_of(std::integral_constant<int, 1>{});
  else rows_of(std::integral_constant<int, 3>{});
}

// The width of the column blocks of the even/odd loop below.
constexpr int kEvenOddCols = 2;

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// The bfloat16 3x3 forward over rows read in place, 32 channels at a time: one 64-byte load of
// 32 bfloat16 values gives the float vectors of the even and of the odd channels with one
// instruction each (shift left by 16; clear the low 16 bits), where the float path converts 16
// channels with two (zero-extend, shift); the taps and the bias are laid out the same way
// (eo::layout), and two accumulators are rounded and re-interleaved into one 64-byte store
// (vcvtne2ps2bf16, vpermw) instead of two conversions. Per output channel it does the float
// path's operations in the same order (bias, the taps row by row, the residual after the
// centre tap), so the results are bitwise the same. Blocks of 2 columns x up to 4 rows x 32
// channels (16 accumulators; the taps are read from L1). On a 2-core Xeon (B=32, C=192, 2
// threads, a copy of the loop outside torch, bitwise the same outputs): 0.125 / 0.38-0.40 / 0.67
// ms at 14x14 / 24x24 / 32x32 against 0.14 / 0.40-0.41 / 0.72 for the float path's 4 x 4 blocks.
// In the op on that Xeon (one thread, rows in L2) a block of 32 outputs takes 6.5-7.0 ns, about
// 21 cycles, where its two vector ports need about 15 (18 FMAs, 2 adds, 6 conversions, and the
// rounding, which issues once per 2 cycles, with its permutation). Neither of two variants was
// faster in the op (B=32, C=192, alternating processes; bench/results/2026-12-02_cpu-intel-xeon/
// 42164a1/ab): each half's nine taps held in registers (two passes over 4 x 4 blocks, the even
// sums parked in the output's 64 bytes) 5-13% slower with 2 threads, and GCC's scheduling before
// register allocation within 5% either way. On an Emerald Rapids Xeon, outside torch, a sliding
// window along the row (one half at a time, its taps in registers, 3-row bands) was within 3%
// and a float32 scratch of each band's rows 1.45x slower; llvm-mca puts this loop at 15.9 cycles
// per 32 outputs and the window at 14.9, both bound by ports 0 and 5
// (bench/results/2026-12-05_cpu-intel-xeon-emr/c2f8e56/ab).
namespace eo {

constexpr int64_t kChannels = 32;

// taps (kk, C) and bias (C,) in the even/odd order of each block of 32 channels: the 16 even
// channels, then the 16 odd ones.
inline std::vector<float> layout(const float* src, int64_t rows, int64_t C) {
  std::vector<float> out(static_cast<size_t>(rows * C));
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t c0 = 0; c0 < C; c0 += kChannels) {
      for (int64_t i = 0; i < 16; ++i) {
        out[t * C + c0 + i] = src[t * C + c0 + 2 * i];
        out[t * C + c0 + 16 + i] = src[t * C + c0 + 2 * i + 1];
      }
    }
  }
  return out;
}

// NB columns from w0 x RB output rows of one block of 32 channels. r[i]: input row i (RB + 2 of
// them) at the block's first channel, columns cs apart; L, R: the block starts / ends the row.
template <int NB, int RB, bool L, bool R>
CPVT_ALWAYS_INLINE void block(const uint16_t* const* r, const float* wt, const float* bias,
                              int64_t w0, int64_t C, int64_t cs, uint16_t* out,
                              int64_t row_stride, __m512i interleave) {
  __m512 acc[RB][2][NB];
  const __m512 be = _mm512_loadu_ps(bias), bo = _mm512_loadu_ps(bias + 16);
#pragma GCC unroll 4
  for (int p = 0; p < RB; ++p) {
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) {
      acc[p][0][q] = be;
      acc[p][1][q] = bo;
    }
  }
  const __m512 zero = in_register_raw(_mm512_setzero_ps());
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
#pragma GCC unroll 8
  for (int i = 0; i < RB + 2; ++i) {
    const uint16_t* ri = r[i] + (w0 - 1) * cs;
#pragma GCC unroll 8
    for (int t = 0; t < NB + 2; ++t) {
      __m512 ve = zero, vo = zero;
      if (!((L && t < 1) || (R && t >= NB + 1))) {
        const __m512i raw = _mm512_loadu_si512(ri + t * cs);
        ve = in_register_raw(_mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)));
        vo = in_register_raw(_mm512_castsi512_ps(_mm512_and_si512(raw, high)));
      }
#pragma GCC unroll 4
      for (int p = 0; p < RB; ++p) {
        const int ki = i - p;  // the kernel row input row i is for output row p
        if (ki < 0 || ki >= 3) continue;
#pragma GCC unroll 3
        for (int j = 0; j < 3; ++j) {
          const int q = t - j;
          if (q >= 0 && q < NB) {
            const float* w = wt + (ki * 3 + j) * C;
            acc[p][0][q] = _mm512_fmadd_ps(_mm512_loadu_ps(w), ve, acc[p][0][q]);
            acc[p][1][q] = _mm512_fmadd_ps(_mm512_loadu_ps(w + 16), vo, acc[p][1][q]);
          }
        }
        if (ki == 1) {
          const int q = t - 1;
          if (q >= 0 && q < NB) {
            acc[p][0][q] = _mm512_add_ps(acc[p][0][q], ve);
            acc[p][1][q] = _mm512_add_ps(acc[p][1][q], vo);
          }
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < RB; ++p) {
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) {
      // [even channels | odd channels] as bfloat16, then back to channel order.
      const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(acc[p][1][q], acc[p][0][q]));
      _mm512_storeu_si512(out + p * row_stride + (w0 + q) * C,
                          _mm512_permutexvar_epi16(interleave, h));
    }
  }
}

// RB consecutive output rows (rows[0 .. RB + 1] the input rows), columns outermost.
template <int RB>
void conv_rows(const uint16_t* const* rows, const float* wt, const float* bias, int64_t W,
               int64_t C, int64_t row_stride, uint16_t* out, RowPrefetch& pf, int64_t cs) {
  alignas(64) uint16_t order[32];
  for (int i = 0; i < 16; ++i) {
    order[2 * i] = static_cast<uint16_t>(i);
    order[2 * i + 1] = static_cast<uint16_t>(16 + i);
  }
  const __m512i interleave = _mm512_load_si512(order);
  column_blocks<kEvenOddCols>(W, [&](auto nb, int64_t w0) {
    constexpr int NB = decltype(nb)::value;
    pf.step();
    auto channels = [&](auto lc, auto rc) {
      for (int64_t c0 = 0; c0 < C; c0 += kChannels) {
        const uint16_t* r[RB + 2];
#pragma GCC unroll 8
        for (int i = 0; i < RB + 2; ++i) r[i] = rows[i] + c0;
        block<NB, RB, decltype(lc)::value, decltype(rc)::value>(
            r, wt + c0, bias + c0, w0, C, cs, out + c0, row_stride, interleave);
      }
    };
    using t_ = std::true_type;
    using f_ = std::false_type;
    const bool left = w0 == 0, right = w0 + NB == W;
    if (left && right) channels(t_{}, t_{});
    else if (left) channels(t_{}, f_{});
    else if (right) channels(f_{}, t_{});
    else channels(f_{}, f_{});
  });
}

inline void conv_rows_forward(const at::BFloat16* const* rows, const float* wt, const float* bias,
                              int64_t W, int64_t C, at::BFloat16* out, int64_t nrows,
                              int64_t row_stride, RowPrefetch& pf, int64_t cs) {
  TORCH_INTERNAL_ASSERT(nrows >= 1 && nrows <= 4 && C % kChannels == 0);
  const auto* r = reinterpret_cast<const uint16_t* const*>(rows);
  auto* o = reinterpret_cast<uint16_t*>(out);
  switch (nrows) {
    case 1: return conv_rows<1>(r, wt, bias, W, C, row_stride, o, pf, cs);
    case 2: return conv_rows<2>(r, wt, bias, W, C, row_stride, o, pf, cs);
    case 3: return conv_rows<3>(r, wt, bias, W, C, row_stride, o, pf, cs);
    default: return conv_rows<4>(r, wt, bias, W, C, row_stride, o, pf, cs);
  }
}

}  // namespace eo
#define CPVT_BF16_EVEN_ODD 1
#endif

// Output size from which the grid rows are written with non-temporal stores:
// CPVT_CPU_STREAM_BYTES if set (0: always, a huge value: never), else a quarter of the
// last-level cache (8 MiB where its size is unknown). Below it the output stays in cache for
// whatever reads it next; above it, it would not, and streaming saves the read-for-ownership of
// every line (a third of the traffic).
// That holds where a vector is a whole cache line (AVX-512): each non-temporal store then writes
// a line at once. A narrower vector (AVX2's 32 bytes) fills a line in two stores, and the
// passes interleave the stores of RB x WB output tokens between them, so as many lines wait
// half written in the core's write-combining buffers; where there are fewer buffers than that,
// they are flushed half full. On a 2-core Zen 3 (AVX2, 32 MiB of L3) a copy with non-temporal
// stores ran 7x slower with 8 lines open at once than with 4 (2.9 against 0.4 ms for 14 MB),
// and the float32 forward was 1.1-1.9x slower streamed than cached from 7 to 113 MB of output
// (B=8..256, 24x24 and 32x32, 2 threads; bench/results/2026-12-07_cpu-amd-epyc-zen3). So builds
// with narrower vectors never stream unless told to.
inline int64_t stream_threshold() {
  constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
  const int64_t llc = llc_bytes();
  const int64_t fallback = sizeof(Vec<float>) < 64 ? kNever
                           : llc > 0                ? llc / 4
                                                    : int64_t(8) << 20;
  return env_bytes("CPVT_CPU_STREAM_BYTES", fallback);
}

// Whether the grid rows of a freshly allocated (B, N, C) output are streamed: every full vector
// store must be aligned, and half types (which store half a vector) never are.
template <typename T>
bool stream_output(const T* grid, const Geometry& g) {
  if (!std::is_same_v<T, acc_t<T>>) return false;
  constexpr size_t align = sizeof(Vec<acc_t<T>>);
  const int64_t bytes = g.B * g.N * g.C * static_cast<int64_t>(sizeof(T));
  return bytes >= stream_threshold() && reinterpret_cast<uintptr_t>(grid) % align == 0 &&
         (g.C * sizeof(T)) % align == 0;
}

// Weight and bias gradients of one grid row, for one block of channels:
//   part[(i*kw + j)*C + c] += sum_w g[w, c] * x[i][w + j, c];   part_b[c] += sum_w g[w, c]
// g is the block of the (padded) grad_out row, x[i] the blocks of the padded input rows
// h + i - ph. RB kernel rows are done per pass over w (all of them for K <= 3, so grad_out is
// read once): RB*K accumulators and WB grad_out vectors stay in registers while x slides past.
// acc[i][j] += g * x[i][w + j] for the one column w of grad_out whose value is g, i < R.
template <int K, int R, typename A>
CPVT_ALWAYS_INLINE void weight_grad_column(const Vec<A>& g, const A* const* x, int64_t w,
                                           Vec<A> (&acc)[R][K]) {
  constexpr int64_t V = Vec<A>::size();
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    const A* xi = x[i] + w * V;
#pragma GCC unroll 8
    for (int j = 0; j < K; ++j) acc[i][j] = at::vec::fmadd(g, Vec<A>::loadu(xi + j * V), acc[i][j]);
  }
}

// part[(i*K + j)*C ..] += acc[i][j], i < R (n lanes).
template <int K, int R, bool FULL, typename A>
CPVT_ALWAYS_INLINE void add_to_partials(const Vec<A> (&acc)[R][K], A* part, int64_t C,
                                        int64_t n) {
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < K; ++j) {
      A* p = part + (i * K + j) * C;
      (ld<FULL>(p, n) + acc[i][j]).store(p, n);
    }
  }
}

template <int K, int RB, bool FULL, typename A>
CPVT_ALWAYS_INLINE void weight_grad_rows_k(const A* const* x, const A* gc, int64_t gs,
                                           int64_t W, int64_t C, int64_t n, A* part,
                                           A* part_b) {
  constexpr int64_t V = Vec<A>::size();
  constexpr int WB = 4;
  if (part == nullptr) {  // the bias gradient alone: the columns in order, as below
    Vec<A> accb(A(0));
    for (int64_t w = 0; w < W; ++w) accb = accb + Vec<A>::loadu(gc + w * gs);
    (ld<FULL>(part_b, n) + accb).store(part_b, n);
    return;
  }
#pragma GCC unroll 1
  for (int i0 = 0; i0 < K; i0 += RB) {
    const bool with_bias = part_b != nullptr && i0 == 0;
    Vec<A> acc[RB][K];
    Vec<A> accb(A(0));
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j < K; ++j) acc[i][j] = Vec<A>(A(0));
    }
    int64_t w0 = 0;
    for (; w0 + WB <= W; w0 += WB) {
      Vec<A> gv[WB];
#pragma GCC unroll 8
      for (int q = 0; q < WB; ++q) gv[q] = Vec<A>::loadu(gc + (w0 + q) * gs);
      if (with_bias) {
#pragma GCC unroll 8
        for (int q = 0; q < WB; ++q) accb = accb + gv[q];
      }
#pragma GCC unroll 8
      for (int i = 0; i < RB; ++i) {
        const A* xi = x[i0 + i] + w0 * V;
#pragma GCC unroll 16
        for (int t = 0; t < WB + K - 1; ++t) {
          const Vec<A> v = in_register<A>(Vec<A>::loadu(xi + t * V));
#pragma GCC unroll 8
          for (int j = 0; j < K; ++j) {
            const int q = t - j;
            if (q >= 0 && q < WB) acc[i][j] = at::vec::fmadd(gv[q], v, acc[i][j]);
          }
        }
      }
    }
    for (; w0 < W; ++w0) {
      const Vec<A> gv = Vec<A>::loadu(gc + w0 * gs);
      if (with_bias) accb = accb + gv;
      weight_grad_column<K, RB>(gv, x + i0, w0, acc);
    }
    add_to_partials<K, RB, FULL>(acc, part + i0 * K * C, C, n);
    if (with_bias) (ld<FULL>(part_b, n) + accb).store(part_b, n);
  }
}

// The weight and bias gradients of two consecutive grid rows at once, for K <= 3 (all kernel
// rows per pass over w): x[0 .. K] are the blocks of the K + 1 padded input rows the two rows
// read, g[0], g[1] the blocks of their grad_out rows. The K - 1 input rows the two share are
// loaded once for both, and the partial sums are read and written once per pair of rows.
// DIRECT: x[r] are unpadded source rows read in place (column c at x[r] + c * xs, element type
// SX, converted as it loads); the columns outside the grid are a vector of zeros, multiplied as
// the ring's padding is, so both give the same operations in the same order. grad_out rows have
// element type SG (converted as they load) and column stride gs.
template <int K, bool FULL, typename A, bool DIRECT = false, typename SX = A, typename SG = A>
CPVT_ALWAYS_INLINE void weight_grad_pair_k(const SX* const* x, const SG* const* gc, int64_t gs,
                                           int64_t W, int64_t C, int64_t n, A* part,
                                           A* part_b, int64_t xs = 0) {
  static_assert(K <= 3, "K * K accumulators and two rows of grad_out stay in registers");
  constexpr int64_t V = Vec<A>::size();
  constexpr int WB = 4;
  Vec<A> acc[K][K];
  Vec<A> accb(A(0));
#pragma GCC unroll 8
  for (int i = 0; i < K; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < K; ++j) acc[i][j] = Vec<A>(A(0));
  }
  const Vec<A> zero = in_register<A>(Vec<A>(A(0)));
  // Column block [w0, w0 + WB); L, R: its input columns start before column 0 or end past W - 1.
  auto block = [&](int64_t w0, auto lc, auto rc) {
    constexpr bool L = decltype(lc)::value, R = decltype(rc)::value;
    Vec<A> gv[2][WB];
#pragma GCC unroll 2
    for (int p = 0; p < 2; ++p) {
#pragma GCC unroll 8
      for (int q = 0; q < WB; ++q) gv[p][q] = load_row<A>(gc[p] + (w0 + q) * gs);
    }
    if (part_b != nullptr) {
#pragma GCC unroll 8
      for (int q = 0; q < WB; ++q) accb = accb + (gv[0][q] + gv[1][q]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < K + 1; ++r) {  // input row r is kernel row r of the first output row,
                                       // r - 1 of the second
#pragma GCC unroll 16
      for (int t = 0; t < WB + K - 1; ++t) {
        const bool pad = DIRECT && ((L && t < K / 2) || (R && t >= WB + K / 2));
        const Vec<A> v =
            pad ? zero
                : in_register<A>(DIRECT ? load_row<A>(x[r] + (w0 + t - K / 2) * xs)
                                        : load_row<A>(x[r] + (w0 + t) * V));
#pragma GCC unroll 2
        for (int p = 0; p < 2; ++p) {
          const int i = r - p;
          if (i < 0 || i >= K) continue;
#pragma GCC unroll 8
          for (int j = 0; j < K; ++j) {
            const int q = t - j;
            if (q >= 0 && q < WB) acc[i][j] = at::vec::fmadd(gv[p][q], v, acc[i][j]);
          }
        }
      }
    }
  };
  using t_ = std::true_type;
  using f_ = std::false_type;
  int64_t w0 = 0;
  for (; w0 + WB <= W; w0 += WB) {
    if constexpr (DIRECT && K > 1) {
      const bool left = w0 == 0, right = w0 + WB == W;
      if (left && right) block(w0, t_{}, t_{});
      else if (left) block(w0, t_{}, f_{});
      else if (right) block(w0, f_{}, t_{});
      else block(w0, f_{}, f_{});
    } else {
      block(w0, f_{}, f_{});
    }
  }
  for (; w0 < W; ++w0) {
#pragma GCC unroll 2
    for (int p = 0; p < 2; ++p) {
      const Vec<A> gv = load_row<A>(gc[p] + w0 * gs);
      if (part_b != nullptr) accb = accb + gv;
      if constexpr (DIRECT) {
#pragma GCC unroll 8
        for (int i = 0; i < K; ++i) {
#pragma GCC unroll 8
          for (int j = 0; j < K; ++j) {
            const int64_t col = w0 + j - K / 2;
            const Vec<A> v = col < 0 || col >= W ? zero : load_row<A>(x[i + p] + col * xs);
            acc[i][j] = at::vec::fmadd(gv, v, acc[i][j]);
          }
        }
      } else {
        weight_grad_column<K, K>(gv, x + p, w0, acc);
      }
    }
  }
  add_to_partials<K, K, FULL>(acc, part, C, n);
  if (part_b != nullptr) (ld<FULL>(part_b, n) + accb).store(part_b, n);
}

// Whether weight_grad_pair covers this kernel.
inline bool weight_grad_pairs(int64_t kh, int64_t kw) {
  return kh == kw && (kw == 1 || kw == 3);
}

// Where the weight-gradient sweeps find grad_out: ring rows (channel blocks block_stride apart,
// column 0 at col0 = pw * V, columns V apart) or rows read in place (blocks V apart, column 0 at
// 0, columns the token stride apart).
struct GradOutRows {
  int64_t block_stride, col0, col_stride;
};

// part (kh*kw, C) (not null) and part_b (C,) (may be null) += the gradients of the two grid
// rows whose grad_out rows are g_rows[0], g_rows[1]; x_rows[0 .. kh] as for weight_grad_row.
template <typename A>
void weight_grad_pair(const A* const* x_rows, const A* const* g_rows, int64_t block_stride,
                      const GradOutRows& gl, int64_t k, int64_t W, int64_t C, A* part,
                      A* part_b, RowPrefetch& pf) {
  constexpr int64_t V = Vec<A>::size();
  const A* x[4];
  const int64_t gs = gl.col_stride;
  for (int64_t c0 = 0, blk = 0; c0 < C; c0 += V, ++blk) {
    pf.step();
    const int64_t off = blk * block_stride, goff = blk * gl.block_stride + gl.col0;
    for (int64_t i = 0; i <= k; ++i) x[i] = x_rows[i] + off;
    const A* g[2] = {g_rows[0] + goff, g_rows[1] + goff};
    A* p = part + c0;
    A* pb = part_b == nullptr ? nullptr : part_b + c0;
    const int64_t n = std::min<int64_t>(V, C - c0);
    if (k == 3) {
      if (n == V) weight_grad_pair_k<3, true>(x, g, gs, W, C, n, p, pb);
      else weight_grad_pair_k<3, false>(x, g, gs, W, C, n, p, pb);
    } else {
      if (n == V) weight_grad_pair_k<1, true>(x, g, gs, W, C, n, p, pb);
      else weight_grad_pair_k<1, false>(x, g, gs, W, C, n, p, pb);
    }
  }
}

// part_b (C,) += the bias gradient of the two grid rows whose grad_out rows are g_rows[0] and
// g_rows[1], without the weight's: the additions of weight_grad_pair_k in the same order, so that
// grad_bias has the same bits whether grad_weight is wanted or not.
template <typename A>
void bias_grad_pair(const A* const* g_rows, const GradOutRows& gl, int64_t W, int64_t C,
                    A* part_b, RowPrefetch& pf) {
  constexpr int64_t V = Vec<A>::size();
  constexpr int WB = 4;  // weight_grad_pair_k's column block
  const int64_t gs = gl.col_stride;
  for (int64_t c0 = 0, blk = 0; c0 < C; c0 += V, ++blk) {
    pf.step();
    const int64_t goff = blk * gl.block_stride + gl.col0;
    const A* g0 = g_rows[0] + goff;
    const A* g1 = g_rows[1] + goff;
    Vec<A> accb(A(0));
    int64_t w = 0;
    for (; w + WB <= W; w += WB) {
#pragma GCC unroll 4
      for (int q = 0; q < WB; ++q) {
        accb = accb + (Vec<A>::loadu(g0 + (w + q) * gs) + Vec<A>::loadu(g1 + (w + q) * gs));
      }
    }
    for (; w < W; ++w) {
      accb = accb + Vec<A>::loadu(g0 + w * gs);
      accb = accb + Vec<A>::loadu(g1 + w * gs);
    }
    const int64_t n = std::min<int64_t>(V, C - c0);
    (Vec<A>::loadu(part_b + c0, n) + accb).store(part_b + c0, n);
  }
}

// The same from source rows read in place (whole vectors of channels, k = 1 or 3): x_rows[0 ..
// k] the input rows (rows outside the grid: zeros), g_rows the two grad_out rows, of element type
// T (converted as they load), column strides xs and gs.
template <typename A, typename T>
void weight_grad_pair_direct(const T* const* x_rows, const T* const* g_rows, int64_t xs,
                             int64_t gs, int64_t k, int64_t W, int64_t C, A* part, A* part_b,
                             RowPrefetch& pf) {
  constexpr int64_t V = Vec<A>::size();
  const T* x[4];
  for (int64_t c0 = 0; c0 < C; c0 += V) {
    pf.step();
    for (int64_t i = 0; i <= k; ++i) x[i] = x_rows[i] + c0;
    const T* g[2] = {g_rows[0] + c0, g_rows[1] + c0};
    A* p = part + c0;
    A* pb = part_b == nullptr ? nullptr : part_b + c0;
    if (k == 3) weight_grad_pair_k<3, true, A, true>(x, g, gs, W, C, V, p, pb, xs);
    else weight_grad_pair_k<1, true, A, true>(x, g, gs, W, C, V, p, pb, xs);
  }
}

// Any kernel size: one tap at a time.
template <typename A>
void weight_grad_rows_rt(const A* const* x, const A* gc, int64_t gs, int64_t kh, int64_t kw,
                         int64_t W, int64_t C, int64_t n, A* part, A* part_b) {
  constexpr int64_t V = Vec<A>::size();
  if (part_b != nullptr) {
    Vec<A> acc(A(0));
    for (int64_t w = 0; w < W; ++w) acc = acc + Vec<A>::loadu(gc + w * gs);
    (Vec<A>::loadu(part_b, n) + acc).store(part_b, n);
  }
  if (part == nullptr) return;
  for (int64_t i = 0; i < kh; ++i) {
    for (int64_t j = 0; j < kw; ++j) {
      Vec<A> acc(A(0));
      for (int64_t w = 0; w < W; ++w) {
        acc = at::vec::fmadd(Vec<A>::loadu(gc + w * gs), Vec<A>::loadu(x[i] + (w + j) * V), acc);
      }
      A* p = part + (i * kw + j) * C;
      (Vec<A>::loadu(p, n) + acc).store(p, n);
    }
  }
}

// part (kh*kw, C) and part_b (C,) (either may be null) += the gradients of one grid row.
template <typename A>
void weight_grad_row(const A* const* x_rows, const A* g_row, int64_t block_stride,
                     const GradOutRows& gl, int64_t kh, int64_t kw, int64_t W, int64_t C,
                     A* part, A* part_b, RowPrefetch& pf) {
  constexpr int64_t V = Vec<A>::size();
  const A* x[kMaxKernelSize];
  const int64_t gs = gl.col_stride;
  for (int64_t c0 = 0, blk = 0; c0 < C; c0 += V, ++blk) {
    pf.step();
    const int64_t off = blk * block_stride;
    if (part != nullptr) {
      for (int64_t i = 0; i < kh; ++i) x[i] = x_rows[i] + off;
    }
    const A* g = g_row + blk * gl.block_stride + gl.col0;
    A* p = part == nullptr ? nullptr : part + c0;
    A* pb = part_b == nullptr ? nullptr : part_b + c0;
    const int64_t n = std::min<int64_t>(V, C - c0);
    const bool full = n == V;
    if (kh == kw && kw == 3) {
      if (full) weight_grad_rows_k<3, 3, true>(x, g, gs, W, C, n, p, pb);
      else weight_grad_rows_k<3, 3, false>(x, g, gs, W, C, n, p, pb);
    } else if (kh == kw && kw == 5) {
      if (full) weight_grad_rows_k<5, 1, true>(x, g, gs, W, C, n, p, pb);
      else weight_grad_rows_k<5, 1, false>(x, g, gs, W, C, n, p, pb);
    } else if (kh == kw && kw == 7) {
      if (full) weight_grad_rows_k<7, 1, true>(x, g, gs, W, C, n, p, pb);
      else weight_grad_rows_k<7, 1, false>(x, g, gs, W, C, n, p, pb);
    } else if (kh == kw && kw == 1) {
      if (full) weight_grad_rows_k<1, 1, true>(x, g, gs, W, C, n, p, pb);
      else weight_grad_rows_k<1, 1, false>(x, g, gs, W, C, n, p, pb);
    } else {
      weight_grad_rows_rt(x, g, gs, kh, kw, W, C, n, p, pb);
    }
  }
}

// (C, 1, kh, kw) -> (kh*kw [+ extra], C) in the accumulation type, flipped for the input
// gradient; `extra` rows of zeros follow the taps. A plain loop: the weight is small, and the
// handful of ATen ops this would otherwise take cost more than the loop on small inputs.
template <typename T>
std::vector<acc_t<T>> taps_by_channel(const at::Tensor& weight, bool flip, int64_t extra = 0) {
  const at::Tensor w = weight.contiguous();
  const T* src = w.const_data_ptr<T>();
  const int64_t C = w.size(0), kh = w.size(2), kw = w.size(3), kk = kh * kw;
  std::vector<acc_t<T>> taps(static_cast<size_t>((kk + extra) * C), acc_t<T>(0));
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < kk; ++t) {
      taps[(flip ? kk - 1 - t : t) * C + c] = static_cast<acc_t<T>>(src[c * kk + t]);
    }
  }
  return taps;
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

#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
// bfloat16 forward with bfloat16 dot products (AVX512-BF16 `vdpbf16ps`): one instruction
// multiplies 16 pairs of bfloat16 values by 16 pairs of taps and adds both products to 16 float
// accumulators. The rows of the grid are held in pairs (a, a + 1), interleaved channel by
// channel, so that a pair of taps of one kernel column (rows i and i + 1) is one operand:
// a k x k kernel takes (k + 1) / 2 * k instructions per output vector instead of k * k fused
// multiply-adds (3x3: 6 instead of 9), and the rows stay bfloat16 in cache (half the bytes).
// For two output rows y and y + 1 the same pair rows serve both, with the taps shifted by one
// row: row y uses pairs (w[2m], w[2m + 1]), row y + 1 uses (w[2m - 1], w[2m]), a missing tap
// being 0. A product of bfloat16 values is exact in float, so each step rounds like a fused
// multiply-add; inputs and results below float's normal range are flushed to zero.
//
// A tap of 0 meets an input row that lies outside that output row's window, which is exact
// only while the input is finite (0 * Inf = NaN): the rows are checked as they are loaded, and
// if any is not finite the caller recomputes the output with the float path, whose NaN and Inf
// follow the reference exactly. Taps that are not finite never take this path.
namespace dot {

constexpr int64_t kV = 16;  // channels per block: one float accumulator vector

// Pair rows (a, a + 1) of the grid, interleaved: element (column w, channel c, half e) of a
// padded pair row is at [((c / 16) * Wp + w + pw) * 16 + c % 16] * 2 + e, Wp = W + 2 * pw; rows
// outside the grid are zeros. A ring of them per thread, tagged by (image, a).
class PairRing {
 public:
  PairRing(const Geometry& g, const at::BFloat16* base, int64_t slots)
      : g_(g), base_(reinterpret_cast<const uint16_t*>(base)), nblk_((g.C + kV - 1) / kV),
        wp_(g.W + 2 * g.pw), width_(nblk_ * wp_ * 2 * kV), slots_(slots),
        storage_(new uint16_t[static_cast<size_t>((slots + 1) * width_ + kAlign / 2)]),
        buf_(align_up(storage_.get())),
        tag_(slots, -1), zero_src_(static_cast<size_t>(g.C), 0) {
    for (int64_t s = 0; s < slots; ++s) {
      for (int64_t blk = 0; blk < nblk_; ++blk) {
        uint16_t* b = buf_ + s * width_ + blk * wp_ * 2 * kV;
        std::fill_n(b, g.pw * 2 * kV, uint16_t(0));
        std::fill_n(b + (g.pw + g.W) * 2 * kV, g.pw * 2 * kV, uint16_t(0));
      }
    }
    std::fill_n(buf_ + slots * width_, width_, uint16_t(0));
  }

  int64_t block_stride() const { return wp_ * 2 * kV; }

  // Pair row (a, a + 1) of image b, for -ph <= a < H.
  const uint16_t* get(int64_t b, int64_t a) {
    const bool lo_in = a >= 0 && a < g_.H, hi_in = a + 1 >= 0 && a + 1 < g_.H;
    if (!lo_in && !hi_in) return buf_ + slots_ * width_;  // the zero row
    const int64_t idx = a + g_.ph;
    const int64_t slot = (idx / 2) % slots_;
    const int64_t tag = b * (g_.H + g_.ph + 2) + idx;
    uint16_t* row = buf_ + slot * width_;
    if (tag_[slot] != tag) {
      fill(row, b, a, lo_in, hi_in);
      tag_[slot] = tag;
    }
    return row;
  }

  // Whether any loaded input element was Inf or NaN.
  bool nonfinite() const { return nonfinite_; }

 private:
  const uint16_t* source(int64_t b, int64_t hh) const {
    return base_ + b * g_.sb + (g_.P + hh * g_.W) * g_.st;
  }

  void fill(uint16_t* row, int64_t b, int64_t a, bool lo_in, bool hi_in) {
    // Lane 2i takes element i of the first row, lane 2i + 1 element i of the second.
    alignas(64) static constexpr uint16_t kInterleave[32] = {
        0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i perm = _mm512_load_si512(kInterleave);
    const __m512i magnitude = _mm512_set1_epi16(0x7FFF);
    // A row outside the grid reads a row of zeros (token stride 0).
    const uint16_t* lo = lo_in ? source(b, a) : zero_src_.data();
    const uint16_t* hi = hi_in ? source(b, a + 1) : zero_src_.data();
    const int64_t lo_st = lo_in ? g_.st : 0, hi_st = hi_in ? g_.st : 0;
    const int64_t C = g_.C, full = C / kV * kV, step = wp_ * 2 * kV;
    const __mmask16 tail = static_cast<__mmask16>((1u << (C - full)) - 1);
    // The largest |bits| seen: an Inf or NaN has all exponent bits set, so it is >= 0x7F80.
    __m512i largest = _mm512_setzero_si512();
    const auto put = [&](__m256i l, __m256i h, uint16_t* d) {
      const __m512i v =
          _mm512_permutex2var_epi16(_mm512_castsi256_si512(l), perm, _mm512_castsi256_si512(h));
      largest = _mm512_max_epu16(largest, _mm512_and_si512(v, magnitude));
      _mm512_store_si512(d, v);
    };
    for (int64_t w = 0; w < g_.W; ++w) {
      const uint16_t* l = lo + w * lo_st;
      const uint16_t* h = hi + w * hi_st;
      uint16_t* d = row + (w + g_.pw) * 2 * kV;
      int64_t c = 0;
      for (; c < full; c += kV, d += step) {
        put(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(l + c)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + c)), d);
      }
      if (c < C) put(_mm256_maskz_loadu_epi16(tail, l + c), _mm256_maskz_loadu_epi16(tail, h + c), d);
    }
    nonfinite_ = nonfinite_ || _mm512_cmpge_epu16_mask(largest, _mm512_set1_epi16(0x7F80)) != 0;
  }

  const Geometry& g_;
  const uint16_t* base_;
  int64_t nblk_, wp_, width_, slots_;
  std::unique_ptr<uint16_t[]> storage_;
  uint16_t* buf_;
  std::vector<int64_t> tag_;
  std::vector<uint16_t> zero_src_;  // C zeros
  bool nonfinite_ = false;
};

// WB outputs along w of RB output rows, one channel block. pr[m] is the block of pair row
// (y - K/2 + 2m, y - K/2 + 2m + 1); tap pairs are at wp[((p * NP) + m) * K + j] (registers for
// K <= 3, else memory). The residual input row y + p is half (K/2 + p) % 2 of pair (K/2 + p) / 2:
// the high half of a lane, masked, or the low half shifted up, is that bfloat16 as a float.
template <int K, int WB, int RB, bool FULL>
CPVT_ALWAYS_INLINE void conv_block(const uint16_t* const* pr, const __m512i* wreg,
                                   const uint16_t* wmem, __m512 bias, int64_t w0, __mmask16 mask,
                                   int64_t C, int64_t row_stride, uint16_t* out) {
  constexpr int NP = (K + 1) / 2, PH = K / 2;
  __m512 acc[RB][WB];
#pragma GCC unroll 2
  for (int p = 0; p < RB; ++p) {
#pragma GCC unroll 16
    for (int q = 0; q < WB; ++q) acc[p][q] = bias;
  }
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
#pragma GCC unroll 4
  for (int m = 0; m < NP; ++m) {
    const uint16_t* rm = pr[m] + w0 * 2 * kV;
#pragma GCC unroll 16
    for (int t = 0; t < WB + K - 1; ++t) {
      const __m512i v = in_register_raw(_mm512_load_si512(rm + t * 2 * kV));
#pragma GCC unroll 2
      for (int p = 0; p < RB; ++p) {
#pragma GCC unroll 8
        for (int j = 0; j < K; ++j) {
          const int q = t - j;
          if (q < 0 || q >= WB) continue;
          const int widx = (p * NP + m) * K + j;
          const __m512i wv =
              K <= 3 ? wreg[widx] : _mm512_load_si512(wmem + widx * 2 * kV);
          acc[p][q] = _mm512_dpbf16_ps(acc[p][q], (__m512bh)v, (__m512bh)wv);
        }
        if ((PH + p) / 2 == m) {
          const int q = t - PH;
          if (q >= 0 && q < WB) {
            const __m512i r = (PH + p) % 2 ? _mm512_and_si512(v, high) : _mm512_slli_epi32(v, 16);
            acc[p][q] = _mm512_add_ps(acc[p][q], _mm512_castsi512_ps(r));
          }
        }
      }
    }
  }
#pragma GCC unroll 2
  for (int p = 0; p < RB; ++p) {
    uint16_t* o = out + p * row_stride + w0 * C;
#pragma GCC unroll 16
    for (int q = 0; q < WB; ++q, o += C) {
      const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(acc[p][q]));
      if constexpr (FULL) _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), h);
      else _mm256_mask_storeu_epi16(o, mask, h);
    }
  }
}

// RB output rows, one channel block, all W columns.
template <int K, int RB, bool FULL>
void conv_cols(const uint16_t* const* pr, const uint16_t* wpairs, const float* bias, int64_t W,
               __mmask16 mask, int64_t C, int64_t row_stride, uint16_t* out) {
  constexpr int WB = 8, NP = (K + 1) / 2;
  __m512i wreg[K <= 3 ? RB * NP * K : 1];
  if constexpr (K <= 3) {
#pragma GCC unroll 16
    for (int i = 0; i < RB * NP * K; ++i) wreg[i] = _mm512_load_si512(wpairs + i * 2 * kV);
  }
  const __m512 b = _mm512_maskz_loadu_ps(mask, bias);
  column_blocks<WB>(W, [&](auto nb, int64_t w0) {
    conv_block<K, decltype(nb)::value, RB, FULL>(pr, wreg, wpairs, b, w0, mask, C, row_stride,
                                                 out);
  });
}

// Tap pairs of every channel block, laid out as conv_block reads them: for block blk, output
// row p (0: y, 1: y + 1), pair m and column j, 16 lanes (w[2m - p][j][c], w[2m + 1 - p][j][c]),
// a tap outside the kernel being 0. w is the (C, K*K) weight's bfloat16 bits. Sets finite to
// whether every tap is finite.
// One 64-byte vector of 32 bfloat16 lanes, aligned for vector loads.
struct alignas(64) Lanes {
  uint16_t v[2 * kV];
};

template <int K>
std::vector<Lanes> tap_pairs(const uint16_t* w, int64_t C, int64_t nblk, bool& finite) {
  constexpr int NP = (K + 1) / 2;
  const int64_t per_blk = 2 * NP * K * 2 * kV;
  std::vector<Lanes> vecs(static_cast<size_t>(nblk * 2 * NP * K), Lanes{});
  uint16_t* out = reinterpret_cast<uint16_t*>(vecs.data());
  uint16_t largest = 0;  // of the magnitude bits: Inf and NaN are >= 0x7F80
  for (int64_t c = 0; c < C; ++c) {
    const uint16_t* wc = w + c * K * K;
    for (int t = 0; t < K * K; ++t) largest = std::max<uint16_t>(largest, wc[t] & 0x7FFF);
    uint16_t* base = out + (c / kV) * per_blk + 2 * (c % kV);
    for (int p = 0; p < 2; ++p) {
      for (int m = 0; m < NP; ++m) {
        const int k0 = 2 * m - p, k1 = k0 + 1;
        for (int j = 0; j < K; ++j) {
          uint16_t* d = base + ((p * NP + m) * K + j) * 2 * kV;
          d[0] = k0 >= 0 ? wc[k0 * K + j] : uint16_t(0);
          d[1] = k1 < K ? wc[k1 * K + j] : uint16_t(0);
        }
      }
    }
  }
  finite = largest < 0x7F80;
  return vecs;
}

// The forward of a K x K kernel (K = 1, 3, 5, 7) for bfloat16, two output rows per pass.
// Returns false, with the grid rows of dst not yet valid, when a tap or an input is not finite.
template <int K>
bool forward(const at::BFloat16* src, const Geometry& g, const uint16_t* weight,
             const float* bias, at::BFloat16* dst) {
  constexpr int NP = (K + 1) / 2;
  const int64_t nblk = (g.C + kV - 1) / kV;
  bool finite_taps = true;
  const std::vector<Lanes> pair_vecs = tap_pairs<K>(weight, g.C, nblk, finite_taps);
  if (!finite_taps) return false;
  const uint16_t* pairs = reinterpret_cast<const uint16_t*>(pair_vecs.data());
  const int64_t per_blk = 2 * NP * K * 2 * kV;
  const int64_t rows = g.B * g.H;
  std::atomic<bool> finite{true};
  at::parallel_for(0, rows, row_grain(g), [&](int64_t begin, int64_t end) {
    PairRing ring(g, src, NP + 1);
    const uint16_t* pr[NP];
    const uint16_t* r[NP];
    uint16_t* out = reinterpret_cast<uint16_t*>(dst);
    RowPrefetch pf;
    for (int64_t row = begin; row < end;) {
      const int64_t b = row / g.H, h = row % g.H;
      const int64_t nr = pass_rows(true, row, end, g.H);
      for (int m = 0; m < NP; ++m) pr[m] = ring.get(b, h - K / 2 + 2 * m);
      // The source rows of the next pass's pairs that this pass did not read, into L2 while
      // this pass runs: 4-5% faster at 14x14 and 24x24 (B=8, C=192, one thread, 6 alternating
      // runs on a 2-core Zen 4).
      pf.clear();
      if (row + nr < end) {
        const int64_t r2 = row + nr, b2 = r2 / g.H, h2 = r2 % g.H;
        pf.add_unread(src, g, b, h - K / 2 + 2 * NP - 1, b2, h2 - K / 2, h2 - K / 2 + 2 * NP - 1);
        pf.spread(nblk);
      }
      uint16_t* o = out + (b * g.N + g.P + h * g.W) * g.C;
      for (int64_t blk = 0; blk < nblk; ++blk) {
        pf.step();
        for (int m = 0; m < NP; ++m) r[m] = pr[m] + blk * ring.block_stride();
        const int64_t c0 = blk * kV, n = std::min<int64_t>(kV, g.C - c0);
        const __mmask16 mask = n == kV ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
        // Row y's taps come first in a block's pairs; one output row uses only those.
        const uint16_t* wp = pairs + blk * per_blk;
        if (nr == 2) {
          if (n == kV) conv_cols<K, 2, true>(r, wp, bias + c0, g.W, mask, g.C, g.W * g.C, o + c0);
          else conv_cols<K, 2, false>(r, wp, bias + c0, g.W, mask, g.C, g.W * g.C, o + c0);
        } else {
          if (n == kV) conv_cols<K, 1, true>(r, wp, bias + c0, g.W, mask, g.C, 0, o + c0);
          else conv_cols<K, 1, false>(r, wp, bias + c0, g.W, mask, g.C, 0, o + c0);
        }
      }
      row += nr;
    }
    if (ring.nonfinite()) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

}  // namespace dot

// Whether the dot-product forward runs: CPVT_CPU_BF16_DOT=1 or 0 turns it on or off; by default
// it runs on AMD CPUs, where vdpbf16ps issues at the rate of an FMA (Zen 4: 3x3 forward 1.3x
// faster than the float path as it then was; Zen 5, 12 independent chains: 6.5 against 7.0 G
// instructions/s per core, and for k = 3 within noise of the even/odd loop, B=32, C=192, 14x14
// and 24x24, 2 threads, three series of 15 alternating rounds; for k = 7 1.65x faster than the
// float path), and not on others: a 2-core Xeon (Intel, AVX512-BF16) issues it
// at a quarter of its FMA rate (1.6 against 6.3 G instructions/s per core, 16 independent
// chains), so there its two products per lane are half as fast as two FMAs, and the float path
// reading the bfloat16 rows in place is 1.3-1.4x faster (B=32, C=192, 14x14 and 24x24, 1 and 2
// threads).
inline bool dot_enabled() {
  if (const std::optional<bool> on = env_flag("CPVT_CPU_BF16_DOT")) return *on;
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
}

// Forward of bfloat16 with dot products where it applies (see namespace dot); false where it
// does not, or where an input was not finite, and the float path must (re)compute the grid.
// weight is the (C, 1, kh, kw) weight, contiguous.
inline bool forward_bf16_dot(const at::BFloat16* src, const Geometry& g,
                             const at::BFloat16* weight, const float* bias, at::BFloat16* dst) {
  if (!dot_enabled() || !pairs_rows(g.kh, g.kw)) return false;
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight);
  switch (g.kh) {
    case 1: return dot::forward<1>(src, g, w, bias, dst);
    case 3: return dot::forward<3>(src, g, w, bias, dst);
    case 5: return dot::forward<5>(src, g, w, bias, dst);
    default: return dot::forward<7>(src, g, w, bias, dst);
  }
}
#endif

// CPVT_CPU_IN_PLACE=0 turns reading rows in place off, so the row rings serve all.
inline bool in_place_disabled() {
  const std::optional<bool> on = env_flag("CPVT_CPU_IN_PLACE");
  return on.has_value() && !*on;
}

// Whether the forward reads its input rows (the backward its grad_out rows, with this the
// geometry of grad_out) where they lie rather than through the row ring: k = 1 and 3, whole
// vectors of channels and contiguous tokens; the forward converts half types as it loads them,
// the backward reads only float and double in place. The ring's copy of each row costs about as
// much as the copy of a tensor would, and the two-row 3x3 pass needs only four input vectors per
// pair of output columns, so reading them at the token stride (with the columns of the padding
// as vectors of zeros, known at compile time at a block of columns that starts or ends the row)
// saves the copy: float32 forward 16-22% faster at B=32, C=192, 14x14 and 6-16% at 24x24 on a
// 2-core Zen 4 (alternating runs); bfloat16 forward 1.5-1.6x faster on a 2-core Xeon. The ring
// stays for k = 5 and 7 (more rows per pass, each vector read by more taps), for any other
// layout, and for the backward of half types (whose weight-gradient sweeps read grad_out from
// the ring).
inline bool in_place_geometry(const Geometry& g, int64_t vector_size) {
  return g.C % vector_size == 0 && g.st == g.C && g.kh == g.kw && (g.kh == 1 || g.kh == 3) &&
         !in_place_disabled();
}

template <typename T>
bool reads_in_place(const Geometry& g) {
  return std::is_same_v<T, acc_t<T>> && in_place_geometry(g, Vec<acc_t<T>>::size());
}

template <typename T>
bool forward_reads_in_place(const Geometry& g) {
  return in_place_geometry(g, Vec<acc_t<T>>::size());
}

// The prefix tokens of the images whose first grid row is in [begin, end) of all B * H rows:
// so that a parallel loop over the rows copies each image's prefix once, in the same pass.
template <typename T>
void copy_prefix_rows(const T* src, const Geometry& g, T* dst, int64_t begin, int64_t end) {
  if (g.P == 0) return;
  for (int64_t b = (begin + g.H - 1) / g.H; b * g.H < end; ++b) {
    for (int64_t p = 0; p < g.P; ++p) {
      std::copy_n(src + b * g.sb + p * g.st, g.C, dst + (b * g.N + p) * g.C);
    }
  }
}

// The forward pass: each pass of nr output rows (one or two from the row ring, up to
// kDirectRows read in place) convolved from its kh + nr - 1 input rows, which come from the row
// ring or, where forward_reads_in_place, from the source tensor itself (rows outside the grid
// from a row of zeros), and the prefix tokens copied in the same
// parallel loop. While a pass runs, the rows of the next pass that this one did not read are
// prefetched into L2 where they go through the ring (RowPrefetch: rows read in place are left to
// the hardware prefetchers unless CPVT_CPU_PREFETCH=1).
template <typename T>
void peg_conv_residual(const T* src, const Geometry& g, const acc_t<T>* wt,
                       const acc_t<T>* bias, T* dst) {
  using A = acc_t<T>;
  constexpr int64_t V = Vec<A>::size();
  const bool stream = stream_output(dst + g.P * g.C, g);
  const bool in_place = forward_reads_in_place<T>(g);
  const bool narrow = in_place && forward_narrow_blocks<T>(g);
  const bool pairs = pairs_rows(g.kh, g.kw);
  // bfloat16, k = 3, whole blocks of 32 channels read in place: the even/odd loop (eo).
  bool even_odd = false;
  std::vector<float> wt_eo, bias_eo;
#if defined(CPVT_BF16_EVEN_ODD)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    even_odd = in_place && g.kh == 3 && g.C % eo::kChannels == 0;
    if (even_odd) {
      wt_eo = eo::layout(wt, g.kh * g.kw, g.C);
      bias_eo = eo::layout(bias, 1, g.C);
    }
  }
#endif
  // The prefetch steps a pass takes: one per column block in place, per channel block from rings.
  const int64_t steps = even_odd   ? column_block_count<kEvenOddCols>(g.W)
                        : in_place ? (narrow ? column_block_count<forward_block_cols<T>(true)>(g.W)
                                             : column_block_count<forward_block_cols<T>(false)>(g.W))
                                   : (g.C + V - 1) / V;
  // Output rows of the pass that starts at grid row r of a thread's range [.., end).
  auto nrows = [&](int64_t r, int64_t end) {
    return in_place ? direct_pass_rows<T>(r, end, g.H, narrow)
                    : pass_rows(pairs, r, end, g.H);
  };
  at::parallel_for(0, g.B * g.H, row_grain(g), [&](int64_t begin, int64_t end) {
    copy_prefix_rows(src, g, dst, begin, end);
    PassRows<T> rows(g, src, in_place);
    std::vector<const A*> ring_rows(g.kh + 1);
    std::vector<const T*> src_rows(g.kh + kDirectRows - 1);
    RowPrefetch pf;
    for (int64_t r = begin; r < end;) {
      const int64_t b = r / g.H, h = r % g.H;
      const int64_t nr = nrows(r, end);
      for (int64_t i = 0; i < g.kh + nr - 1; ++i) {
        if (in_place) src_rows[i] = rows.source(b, h + i - g.ph);
        else ring_rows[i] = rows.get(b, h + i - g.ph);
      }
      pf.clear();
      if (r + nr < end) {
        const int64_t r2 = r + nr, b2 = r2 / g.H, h2 = r2 % g.H;
        rows.prefetch(pf, b, h + nr - 1 + g.ph, b2, h2 - g.ph,
                      h2 + nrows(r2, end) - 1 + g.ph);
        pf.spread(steps);
      }
      T* out_row = dst + (b * g.N + g.P + h * g.W) * g.C;
      if (even_odd) {
#if defined(CPVT_BF16_EVEN_ODD)
        if constexpr (std::is_same_v<T, at::BFloat16>) {
          eo::conv_rows_forward(src_rows.data(), wt_eo.data(), bias_eo.data(), g.W, g.C, out_row,
                                nr, g.W * g.C, pf, g.st);
        }
#endif
      } else if (in_place) {
        conv_rows_direct_forward(src_rows.data(), g.kh, wt, bias, g.W, g.C, stream, out_row, nr,
                                 g.W * g.C, pf, g.st, narrow);
      } else {
        conv_row_dispatch(ring_rows.data(), rows.block_stride(), g.kh, g.kw, wt, bias, g.W, g.C,
                          stream, out_row, nr, g.W * g.C, pf);
      }
      r += nr;
    }
    if (stream) store_fence();
  });
}


// grad_x at the grid's border band, recomputed with the taps that fall outside the grid
// skipped. The fused pass treats grad_out as zero-padded, which is exact for finite taps
// (t * 0 = 0) but not for an Inf or NaN tap (Inf * 0 = NaN): the padding stands for outputs that
// do not exist, and the reference's gradient has no term for them. Run only when a tap is not
// finite; the band is a small part of the grid.
template <typename T>
void fix_grad_x_border(const T* g_ptr, const Geometry& gg, const acc_t<T>* wt_flip,
                       const Geometry& gx, T* grad_x) {
  using A = acc_t<T>;
  const int64_t H = gx.H, W = gx.W, C = gx.C, kh = gx.kh, kw = gx.kw, ph = gx.ph, pw = gx.pw;
  const auto token = [&](int64_t b, int64_t hh, int64_t ww) {
    return g_ptr + b * gg.sb + (gg.P + hh * W + ww) * gg.st;
  };
  at::parallel_for(0, gx.B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, h = r % H;
      const bool border_row = h < ph || h >= H - ph;
      for (int64_t w = 0; w < W; ++w) {
        if (!border_row && w >= pw && w < W - pw) continue;
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t hh = h + i - ph;
          if (hh < 0 || hh >= H) continue;
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t ww = w + j - pw;
            if (ww < 0 || ww >= W) continue;
            const T* gs = token(b, hh, ww);
            const A* t = wt_flip + (i * kw + j) * C;
            for (int64_t c = 0; c < C; ++c) acc[c] += t[c] * static_cast<A>(gs[c]);
          }
        }
        const T* gc = token(b, h, w);
        T* o = grad_x + (b * gx.N + gx.P + h * W + w) * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(acc[c] + static_cast<A>(gc[c]));
      }
    }
  });
}

// How many of the backward's row chunks run at once, each with its own partial sums of
// chunk_bytes: all of them unless their partial sums together pass CPVT_CPU_PARTIALS_BYTES
// (default 64 MiB; k = 31 with C = 4096 takes 15 MiB a chunk), else as many as fit beside the
// running sums (one chunk's size), rounded down to a multiple of the thread count, and at least
// one per thread. The chunks and the order in which their sums are added do not depend on it,
// so neither do the gradients' bits.
inline int64_t chunks_per_wave(int64_t nchunks, int64_t chunk_bytes) {
  if (chunk_bytes == 0) return nchunks;  // grad_x alone: no partial sums
  const int64_t budget = env_bytes("CPVT_CPU_PARTIALS_BYTES", int64_t(64) << 20);
  if (nchunks * chunk_bytes <= budget) return nchunks;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t fit = std::max<int64_t>(0, budget - chunk_bytes) / chunk_bytes / threads * threads;
  return std::min(nchunks, std::max(threads, fit));
}

// One pass over grad_out and x: grad_x rows (flipped taps over grad_out, plus grad_out) and
// per-chunk partial sums of grad_weight and grad_bias, then a fixed-order reduction that writes
// grad_weight as (C, kh*kw) and grad_bias as (C,) in T.
template <typename T>
void peg_backward_fused(const T* g_ptr, const T* x_ptr, const Geometry& gg, const Geometry& gx,
                        const acc_t<T>* wt_flip, std::array<bool, 3> mask, T* grad_x,
                        T* gw_out, T* gb_out) {
  using A = acc_t<T>;
  const bool want_x = mask[0], want_w = mask[1], want_b = mask[2];
  if (want_x) copy_prefix(g_ptr, gg, grad_x);
  const int64_t rows = gx.B * gx.H;
  const int64_t nchunks = std::min<int64_t>(rows, kMaxChunks);
  const int64_t kk = gx.kh * gx.kw, C = gx.C, W = gx.W;
  if (nchunks == 0 || C == 0) {
    if (want_w) std::fill_n(gw_out, C * kk, T(0));
    if (want_b) std::fill_n(gb_out, C, T(0));
    return;
  }
  const int64_t per = (rows + nchunks - 1) / nchunks;
  // The chunks run in waves of `wave` (all at once unless their partial sums would pass the
  // budget); each chunk zeroes its own slot, in the thread that fills it.
  const int64_t chunk_sums = ((want_w ? kk : 0) + (want_b ? 1 : 0)) * C;
  const int64_t wave = chunks_per_wave(nchunks, chunk_sums * static_cast<int64_t>(sizeof(A)));
  std::unique_ptr<A[]> part_w(want_w ? new A[wave * kk * C] : nullptr);
  std::unique_ptr<A[]> part_b(want_b ? new A[wave * C] : nullptr);
  // The sums of the waves so far (the weight's taps, then the bias), where there is more than
  // one wave.
  std::unique_ptr<A[]> kept(wave < nchunks ? new A[chunk_sums] : nullptr);
  const bool stream = want_x && stream_output(grad_x + gx.P * C, gx);
  // grad_out is read in place where the forward would read x in place (reads_in_place): its rows
  // need no padding for the weight gradients, and the grad_x convolution pads them as the
  // forward does. x stays in the ring, padded for the weight-gradient sweeps. B=32, C=192 on a
  // 2-core Zen 4 (two series of 8 and 4 alternating rounds): backward 6-11% faster at 14x14,
  // 3-6% at 24x24; grad_x alone 17-26% at 14x14.
  constexpr int64_t V = Vec<A>::size();
  const bool g_in_place = reads_in_place<T>(gg);
  // Passes of two rows with k = 1 or 3 read x and grad_out in place, for every dtype (half types
  // converted as they load), where both tensors allow it and the weight gradients are wanted or
  // only grad_x is: the x ring's copy of every row is saved, and the weight-gradient sweep
  // (weight_grad_pair_direct) does what the ring's does in the same order, so both paths agree
  // bit for bit. B=32, C=192 on a 2-core Xeon (FusedPEG, 3 alternating rounds): forward+backward
  // float32 9-12% faster at 14x14 and 24x24, bfloat16 4-5%.
  const bool direct_pairs = forward_reads_in_place<T>(gg) && forward_reads_in_place<T>(gx) &&
                            (want_w || !want_b);
  for (int64_t first = 0; first < nchunks; first += wave) {
    const int64_t last = std::min(nchunks, first + wave);
    at::parallel_for(first, last, 1, [&](int64_t cbeg, int64_t cend) {
      RowRing<T> xring(gx, x_ptr, gx.kh + 1);
      PassRows<T> grows(gg, g_ptr, g_in_place);
      // Source rows for the direct passes (grad_out's from grows where it reads them in place).
      std::optional<SourceRows<T>> xsrc, gsrc;
      if (direct_pairs) {
        xsrc.emplace(gx, x_ptr);
        if (!g_in_place) gsrc.emplace(gg, g_ptr);
      }
      const GradOutRows gl{grows.block_stride(), grows.col0(), grows.col_stride()};
      std::vector<const A*> x_rows(gx.kh + 1), g_rows(gx.kh + 1);
      std::vector<const T*> x_src(gx.kh + 1), g_src(gx.kh + 1);
      const bool pairs = pairs_rows(gx.kh, gx.kw);
      const A* zero_bias = wt_flip + kk * C;  // a row of zeros after the taps
      const int64_t nblk = (C + V - 1) / V;
      const bool pair_w = weight_grad_pairs(gx.kh, gx.kw);
      // The prefetch steps of the grad_x convolution: per column block in place, else per block.
      const int64_t col_blocks = column_block_count<direct_block_cols<T>()>(W);
      RowPrefetch pf(/*in_place_rows=*/true);
      const int64_t thread_end = std::min(rows, cend * per);
      for (int64_t k = cbeg; k < cend; ++k) {
        A* pw = want_w ? part_w.get() + (k - first) * kk * C : nullptr;
        A* pb = want_b ? part_b.get() + (k - first) * C : nullptr;
        if (pw != nullptr) std::fill_n(pw, kk * C, A(0));
        if (pb != nullptr) std::fill_n(pb, C, A(0));
        const int64_t r_end = std::min(rows, (k + 1) * per);
        for (int64_t r = k * per; r < r_end;) {
          const int64_t b = r / gx.H, h = r % gx.H;
          // grad_x of two rows at a time where the kernel allows; the weight gradients row by row.
          const int64_t nr = pass_rows(pairs, r, r_end, gx.H);
          const bool direct = direct_pairs && nr == 2;
          for (int64_t i = 0; i < gx.kh + nr - 1; ++i) {
            const int64_t hh = h + i - gx.ph;
            const bool centre = i >= gx.ph && i < gx.ph + nr;
            if (direct) {
              x_src[i] = want_w ? xsrc->get(b, hh) : nullptr;
              g_src[i] = !(want_x || centre) ? nullptr
                         : g_in_place          ? grows.source(b, hh)
                                               : gsrc->get(b, hh);
            } else {
              const bool valid = hh >= 0 && hh < gx.H;
              x_rows[i] = !want_w ? nullptr : valid ? xring.get(b, hh) : xring.zeros();
              g_rows[i] = !(want_x || centre) ? nullptr : grows.get(b, hh);
            }
          }
          // The weight gradients of a pair of rows in one sweep where the kernel allows (the
          // bias's alone in the same order, so its bits do not depend on the mask).
          const bool pair = (want_w || want_b) && nr == 2 && pair_w;
          pf.clear();
          if (r + nr < thread_end) {  // the next pass, in this chunk or the next
            const int64_t r2 = r + nr, b2 = r2 / gx.H, h2 = r2 % gx.H;
            const int64_t nr2 = pass_rows(pairs, r2, std::min(rows, (r2 / per + 1) * per), gx.H);
            // The grad_out rows of the next pass (with the halo where grad_x is wanted).
            const int64_t halo = want_x ? gx.ph : 0;
            const int64_t g_hi = h + nr - 1 + halo, x_hi = h + nr - 1 + gx.ph;
            if (direct) {
              pf.add_unread(g_ptr, gg, b, g_hi, b2, h2 - halo, h2 + nr2 - 1 + halo);
              if (want_w) pf.add_unread(x_ptr, gx, b, x_hi, b2, h2 - gx.ph, h2 + nr2 - 1 + gx.ph);
            } else {
              grows.prefetch(pf, b, g_hi, b2, h2 - halo, h2 + nr2 - 1 + halo);
              if (want_w) pf.add(xring, gx, b2, h2 - gx.ph, h2 + nr2 - 1 + gx.ph);
            }
            const int64_t wg_sweeps = !(want_w || want_b) ? 0 : pair ? 1 : nr;
            const int64_t conv_steps = direct || g_in_place ? col_blocks : nblk;
            pf.spread((want_x ? conv_steps : 0) + nblk * wg_sweeps);
          }
          if (want_x) {
            T* out_row = grad_x + (b * gx.N + gx.P + h * W) * C;
            if (direct) {
              conv_row_dispatch_direct(g_src.data(), gx.kh, wt_flip, zero_bias, W, C, stream,
                                       out_row, nr, W * C, pf, gg.st);
            } else if (g_in_place) {
              conv_row_dispatch_direct(g_rows.data(), gx.kh, wt_flip, zero_bias, W, C, stream,
                                       out_row, nr, W * C, pf, gg.st);
            } else {
              conv_row_dispatch(g_rows.data(), gl.block_stride, gx.kh, gx.kw, wt_flip, zero_bias,
                                W, C, stream, out_row, nr, W * C, pf);
            }
          }
          if (pair && !want_w) {
            bias_grad_pair<A>(g_rows.data() + gx.ph, gl, W, C, pb, pf);
          } else if (pair && direct) {
            weight_grad_pair_direct<A>(x_src.data(), g_src.data() + gx.ph, gx.st, gg.st, gx.kw, W,
                                       C, pw, pb, pf);
          } else if (pair) {
            weight_grad_pair<A>(x_rows.data(), g_rows.data() + gx.ph, xring.block_stride(), gl,
                                gx.kw, W, C, pw, pb, pf);
          } else if (want_w || want_b) {
            for (int64_t p = 0; p < nr; ++p) {
              weight_grad_row<A>(x_rows.data() + p, g_rows[gx.ph + p], xring.block_stride(), gl,
                                 gx.kh, gx.kw, W, C, pw, pb, pf);
            }
          }
          r += nr;
        }
      }
      if (stream) store_fence();
    });
    // The wave's partial sums added to the earlier waves' in chunk order, one tap (or the bias)
    // per task: the same sums in the same order for any wave size.
    at::parallel_for(0, kk + 1, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> sum(C);
      for (int64_t t = begin; t < end; ++t) {
        const bool is_bias = t == kk;
        if (is_bias ? !want_b : !want_w) continue;
        const A* src = is_bias ? part_b.get() : part_w.get() + t * C;
        const int64_t step = is_bias ? C : kk * C;
        A* keep = kept ? kept.get() + (is_bias && !want_w ? 0 : t * C) : nullptr;
        std::copy_n(first == 0 ? src : keep, C, sum.data());
        for (int64_t k = first == 0 ? 1 : 0; k < last - first; ++k) {
          const A* s = src + k * step;
          for (int64_t c = 0; c < C; ++c) sum[c] += s[c];
        }
        if (last < nchunks) {
          std::copy_n(sum.data(), C, keep);
        } else if (is_bias) {
          for (int64_t c = 0; c < C; ++c) gb_out[c] = static_cast<T>(sum[c]);
        } else {
          for (int64_t c = 0; c < C; ++c) gw_out[c * kk + t] = static_cast<T>(sum[c]);
        }
      }
    });
  }
  if (want_x && !std::all_of(wt_flip, wt_flip + kk * C, [](A v) { return std::isfinite(v); })) {
    fix_grad_x_border(g_ptr, gg, wt_flip, gx, grad_x);
  }
}

}  // namespace

template <typename T>
void forward_typed(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const Geometry& g, at::Tensor& out) {
  using A = acc_t<T>;
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  // The bias in the accumulation type (zeros without one), for either path.
  std::vector<A> bt(g.C, A(0));
  if (bias.has_value() && bias->defined()) {
    const at::Tensor b = bias->contiguous();
    const T* bp = b.const_data_ptr<T>();
    for (int64_t c = 0; c < g.C; ++c) bt[c] = static_cast<A>(bp[c]);
  }
#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const at::Tensor w = weight.contiguous();
    if (forward_bf16_dot(reinterpret_cast<const at::BFloat16*>(xp), g,
                         reinterpret_cast<const at::BFloat16*>(w.const_data_ptr<T>()),
                         reinterpret_cast<const float*>(bt.data()),
                         reinterpret_cast<at::BFloat16*>(op))) {
      copy_prefix(xp, g, op);
      return;
    }
  }
#endif
  const std::vector<A> wt = taps_by_channel<T>(weight, /*flip=*/false);
  peg_conv_residual<T>(xp, g, wt.data(), bt.data(), op);
}

template <typename T>
void backward_typed(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                    const Geometry& gg, const Geometry& gx, std::array<bool, 3> mask,
                    at::Tensor& grad_x, at::Tensor& grad_w, at::Tensor& grad_b) {
  // Flipped taps (kh*kw, C) followed by one row of zeros that serves as the (absent) bias.
  const auto wt = taps_by_channel<T>(weight, /*flip=*/true, /*extra=*/1);
  peg_backward_fused<T>(grad_out.const_data_ptr<T>(), x.const_data_ptr<T>(), gg, gx, wt.data(),
                        mask, mask[0] ? grad_x.mutable_data_ptr<T>() : nullptr,
                        mask[1] ? grad_w.mutable_data_ptr<T>() : nullptr,
                        mask[2] ? grad_b.mutable_data_ptr<T>() : nullptr);
}

}  // namespace cpu
}  // namespace cpvt

// The kernels of one dtype, compiled in the file that expands this.
#define CPVT_CPU_INSTANTIATE(T)                                                                \
  namespace cpvt {                                                                             \
  namespace cpu {                                                                              \
  template void forward_typed<T>(const at::Tensor&, const at::Tensor&,                         \
                                 const std::optional<at::Tensor>&, const Geometry&,            \
                                 at::Tensor&);                                                 \
  template void backward_typed<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&,     \
                                  const Geometry&, const Geometry&, std::array<bool, 3>,       \
                                  at::Tensor&, at::Tensor&, at::Tensor&);                      \
  }                                                                                            \
  }
