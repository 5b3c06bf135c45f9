// The bfloat16 3x3 forward over rows read in place (bias, taps, residual), one image of H x W x
// 192 channels, one thread, the rows in L2: four loops timed alternately (30 rounds, min and
// median ns per 32 outputs), each checked against a float64 sum and against `cur`.
//   cur    the op's even/odd loop at c2f8e56 (eo::block: 4 rows x 2 columns x 32 channels)
//   slide  a sliding window along the row, one half (even / odd channels) at a time, its nine
//          taps in registers, 4-row bands; the even sums parked as float32, rounded with the odd
//   slid3  the same in 3-row bands (fewer registers live)
//   pre4   each band's rows converted once into an L1 scratch of float32, then cur's blocks
// Build: g++ -O3 -march=native -std=c++17 bf16_loops.cpp -o bf16_loops; run: ./bf16_loops 24 300
// (H a multiple of 12: the bands do not clip the last rows).
#include <immintrin.h>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
#include <chrono>
#include <cmath>
#include <algorithm>
#define AI inline __attribute__((always_inline))
template <typename R> AI R reg(R v) { asm("" : "+v"(v)); return v; }
static float bf2f(uint16_t h){ uint32_t u=uint32_t(h)<<16; float f; memcpy(&f,&u,4); return f; }
static uint16_t f2bf(float f){ uint32_t u; memcpy(&u,&f,4); u += 0x7FFF + ((u>>16)&1); return u>>16; }

static AI __m512i even_mask() {
  // per dword [b0 b1 b2 b3] -> [0 0 b0 b1]: the even channel's bfloat16 in the high half
  return _mm512_broadcast_i32x4(_mm_set_epi32(0x0D0C8080, 0x09088080, 0x05048080, 0x01008080));
}
// ---------------- current: eo block (copy of the op's) ----------------
template <int NB, int RB, bool L, bool R>
AI void block(const uint16_t* const* r, const float* wt, const float* bias, int64_t w0, int64_t C,
              int64_t cs, uint16_t* out, int64_t row_stride, __m512i interleave) {
  __m512 acc[RB][2][NB];
  const __m512 be = _mm512_loadu_ps(bias), bo = _mm512_loadu_ps(bias + 16);
#pragma GCC unroll 4
  for (int p = 0; p < RB; ++p)
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) { acc[p][0][q] = be; acc[p][1][q] = bo; }
  const __m512 zero = reg(_mm512_setzero_ps());
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
#pragma GCC unroll 8
  for (int i = 0; i < RB + 2; ++i) {
    const uint16_t* ri = r[i] + (w0 - 1) * cs;
#pragma GCC unroll 8
    for (int t = 0; t < NB + 2; ++t) {
      __m512 ve = zero, vo = zero;
      if (!((L && t < 1) || (R && t >= NB + 1))) {
        const __m512i raw = _mm512_loadu_si512(ri + t * cs);
        ve = reg(_mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)));
        vo = reg(_mm512_castsi512_ps(_mm512_and_si512(raw, high)));
      }
#pragma GCC unroll 4
      for (int p = 0; p < RB; ++p) {
        const int ki = i - p;
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
  for (int p = 0; p < RB; ++p)
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) {
      const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(acc[p][1][q], acc[p][0][q]));
      _mm512_storeu_si512(out + p * row_stride + (w0 + q) * C, _mm512_permutexvar_epi16(interleave, h));
    }
}
static __m512i interleave_idx() {
  alignas(64) uint16_t order[32];
  for (int i = 0; i < 16; ++i) { order[2*i] = i; order[2*i+1] = 16 + i; }
  return _mm512_load_si512(order);
}
template <int RB>
__attribute__((noinline)) void cur_rows(const uint16_t* const* rows, const float* wt, const float* bias, int64_t W, int64_t C,
              int64_t row_stride, uint16_t* out, int64_t cs) {
  const __m512i il = interleave_idx();
  for (int64_t w0 = 0; w0 < W; w0 += 2) {
    auto ch = [&](auto lc, auto rc) {
      for (int64_t c0 = 0; c0 < C; c0 += 32) {
        const uint16_t* r[RB + 2];
        for (int i = 0; i < RB + 2; ++i) r[i] = rows[i] + c0;
        block<2, RB, decltype(lc)::value, decltype(rc)::value>(r, wt + c0, bias + c0, w0, C, cs, out + c0, row_stride, il);
      }
    };
    using t_ = std::true_type; using f_ = std::false_type;
    bool left = w0 == 0, right = w0 + 2 == W;
    if (left) ch(t_{}, f_{}); else if (right) ch(f_{}, t_{}); else ch(f_{}, f_{});
  }
}

// ---------------- sliding window: one half at a time, taps in registers ----------------
// HALF 0: even channels (shift), park fp32 sums; HALF 1: odd (and), combine and store.
template <int RB, int HALF, bool SHUF>
AI void slide_half(const uint16_t* const* r, const float* wt, const float* bias, int64_t W,
                   int64_t C, int64_t cs, uint16_t* out, int64_t row_stride, float* park,
                   __m512i il) {
  __m512 w[9];
#pragma GCC unroll 9
  for (int t = 0; t < 9; ++t) w[t] = _mm512_loadu_ps(wt + t * C + HALF * 16);
  const float* bptr = bias + HALF * 16;
  auto bload = [&]() { __m512 v; asm volatile("vmovups (%1), %0" : "=v"(v) : "r"(bptr)); return v; };
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i emask = even_mask();
  // acc[s][p]: the column in slot s (column q uses slot q % 3)
  __m512 acc[3][RB];
  auto conv = [&](const uint16_t* p) {
    const __m512i raw = _mm512_loadu_si512(p);
    return HALF == 0 ? (SHUF ? _mm512_castsi512_ps(_mm512_shuffle_epi8(raw, emask)) : _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)))
                     : _mm512_castsi512_ps(_mm512_and_si512(raw, high));
  };
  auto finish = [&](int s, int64_t q) {
#pragma GCC unroll 8
    for (int p = 0; p < RB; ++p) {
      float* pk = park + (q * RB + p) * 16;
      if (HALF == 0) _mm512_store_ps(pk, acc[s][p]);
      else {
        const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(acc[s][p], _mm512_load_ps(pk)));
        _mm512_storeu_si512(out + p * row_stride + q * C, _mm512_permutexvar_epi16(il, h));
      }
    }
  };
  // input column t feeds output columns t+1 (tap j=0), t (j=1, + residual), t-1 (j=2)
  auto step = [&](int64_t t, auto s_prev, auto s_cur, auto s_next, bool first, bool last) {
    constexpr int P_ = decltype(s_prev)::value, C_ = decltype(s_cur)::value, N_ = decltype(s_next)::value;
    if (!last) {
#pragma GCC unroll 8
      for (int p = 0; p < RB; ++p) acc[N_][p] = bload();
    }
    __m512 v[RB + 2];
#pragma GCC unroll 8
    for (int i = 0; i < RB + 2; ++i) v[i] = reg(conv(r[i] + t * cs));
    if (!first) {
#pragma GCC unroll 8
      for (int p = 0; p < RB; ++p)
#pragma GCC unroll 3
        for (int ki = 0; ki < 3; ++ki) acc[P_][p] = _mm512_fmadd_ps(w[ki * 3 + 2], v[p + ki], acc[P_][p]);
      finish(P_, t - 1);
    }
#pragma GCC unroll 8
    for (int p = 0; p < RB; ++p)
#pragma GCC unroll 3
      for (int ki = 0; ki < 3; ++ki) {
        acc[C_][p] = _mm512_fmadd_ps(w[ki * 3 + 1], v[p + ki], acc[C_][p]);
        if (ki == 1) acc[C_][p] = _mm512_add_ps(acc[C_][p], v[p + ki]);
      }
    if (!last) {
#pragma GCC unroll 8
      for (int p = 0; p < RB; ++p)
#pragma GCC unroll 3
        for (int ki = 0; ki < 3; ++ki) acc[N_][p] = _mm512_fmadd_ps(w[ki * 3 + 0], v[p + ki], acc[N_][p]);
    }
  };
  using I0 = std::integral_constant<int, 0>; using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  // column 0: slot 0 starts with the bias and the taps j=0 of column -1 (zero): just the bias.
#pragma GCC unroll 8
  for (int p = 0; p < RB; ++p) acc[0][p] = bload();
  // t = 0: prev slot 2 (column -1: none), cur slot 0, next slot 1
  step(0, I2{}, I0{}, I1{}, true, W == 1);
  int64_t t = 1;
  // steady state in threes: cur slots 1, 2, 0
  for (; t + 3 <= W - 1; t += 3) {
    step(t, I0{}, I1{}, I2{}, false, false);
    step(t + 1, I1{}, I2{}, I0{}, false, false);
    step(t + 2, I2{}, I0{}, I1{}, false, false);
  }
  for (; t < W; ++t) {
    const bool last = t == W - 1;
    switch (t % 3) {
      case 1: step(t, I0{}, I1{}, I2{}, false, last); break;
      case 2: step(t, I1{}, I2{}, I0{}, false, last); break;
      default: step(t, I2{}, I0{}, I1{}, false, last); break;
    }
  }
  // the last column: its taps j=2 would read column W (zero)
  const int s = (W - 1) % 3;
  if (s == 0) finish(0, W - 1); else if (s == 1) finish(1, W - 1); else finish(2, W - 1);
}
template <int RB, bool SHUF = false>
__attribute__((noinline)) void slide_rows(const uint16_t* const* rows, const float* wt, const float* bias, int64_t W, int64_t C,
                int64_t row_stride, uint16_t* out, int64_t cs, float* park) {
  const __m512i il = interleave_idx();
  for (int64_t c0 = 0; c0 < C; c0 += 32) {
    const uint16_t* r[RB + 2];
    for (int i = 0; i < RB + 2; ++i) r[i] = rows[i] + c0;
    slide_half<RB, 0, SHUF>(r, wt + c0, bias + c0, W, C, cs, out + c0, row_stride, park, il);
    slide_half<RB, 1, SHUF>(r, wt + c0, bias + c0, W, C, cs, out + c0, row_stride, park, il);
  }
}


// ---------------- pre-split: the band's rows of one 32-channel block converted once into an L1 scratch ----------------
template <int NB, int RB, bool L, bool R>
AI void block_pre(const float* S, int64_t W, const float* wt, const float* bias, int64_t w0, int64_t C,
                  uint16_t* out, int64_t row_stride, __m512i interleave) {
  __m512 acc[RB][2][NB];
  const __m512 be = _mm512_loadu_ps(bias), bo = _mm512_loadu_ps(bias + 16);
#pragma GCC unroll 4
  for (int p = 0; p < RB; ++p)
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) { acc[p][0][q] = be; acc[p][1][q] = bo; }
#pragma GCC unroll 8
  for (int i = 0; i < RB + 2; ++i) {
    const float* si = S + (i * W + (w0 - 1)) * 32;
#pragma GCC unroll 8
    for (int t = 0; t < NB + 2; ++t) {
      if ((L && t < 1) || (R && t >= NB + 1)) continue;
      const __m512 ve = _mm512_load_ps(si + t * 32), vo = _mm512_load_ps(si + t * 32 + 16);
#pragma GCC unroll 4
      for (int p = 0; p < RB; ++p) {
        const int ki = i - p;
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
  for (int p = 0; p < RB; ++p)
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) {
      const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(acc[p][1][q], acc[p][0][q]));
      _mm512_storeu_si512(out + p * row_stride + (w0 + q) * C, _mm512_permutexvar_epi16(interleave, h));
    }
}
template <int RB>
__attribute__((noinline)) void pre_rows(const uint16_t* const* rows, const float* wt, const float* bias, int64_t W, int64_t C,
              int64_t row_stride, uint16_t* out, int64_t cs, float* S) {
  const __m512i il = interleave_idx();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t c0 = 0; c0 < C; c0 += 32) {
    for (int i = 0; i < RB + 2; ++i) {
      const uint16_t* ri = rows[i] + c0;
      float* si = S + i * W * 32;
      for (int64_t t = 0; t < W; ++t) {
        const __m512i raw = _mm512_loadu_si512(ri + t * cs);
        _mm512_store_ps(si + t * 32, _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)));
        _mm512_store_ps(si + t * 32 + 16, _mm512_castsi512_ps(_mm512_and_si512(raw, high)));
      }
    }
    for (int64_t w0 = 0; w0 < W; w0 += 2) {
      const bool left = w0 == 0, right = w0 + 2 == W;
      if (left) block_pre<2, RB, true, false>(S, W, wt + c0, bias + c0, w0, C, out + c0, row_stride, il);
      else if (right) block_pre<2, RB, false, true>(S, W, wt + c0, bias + c0, w0, C, out + c0, row_stride, il);
      else block_pre<2, RB, false, false>(S, W, wt + c0, bias + c0, w0, C, out + c0, row_stride, il);
    }
  }
}

int main(int argc, char** argv) {
  const int H = argc > 1 ? atoi(argv[1]) : 24, W = H, C = 192;
  const int iters = argc > 2 ? atoi(argv[2]) : 2000;
  std::vector<uint16_t> x(H * W * C), zero(W * C, 0), o1(H * W * C), o2(H * W * C);
  std::vector<float> wt(9 * C), bias(C), wte(9 * C), be(C);
  uint32_t s = 12345; auto rnd = [&]() { s = s * 1664525 + 1013904223; return (s >> 8) / 16777216.0f - 0.5f; };
  for (auto& v : x) v = f2bf(rnd() * 4);
  for (auto& v : wt) v = bf2f(f2bf(rnd()));
  for (auto& v : bias) v = bf2f(f2bf(rnd()));
  for (int t = 0; t < 9; ++t) for (int c0 = 0; c0 < C; c0 += 32) for (int i = 0; i < 16; ++i) {
    wte[t*C+c0+i] = wt[t*C+c0+2*i]; wte[t*C+c0+16+i] = wt[t*C+c0+2*i+1]; }
  for (int c0 = 0; c0 < C; c0 += 32) for (int i = 0; i < 16; ++i) { be[c0+i] = bias[c0+2*i]; be[c0+16+i] = bias[c0+2*i+1]; }
  float* park = (float*)aligned_alloc(64, W * 8 * 16 * 4);
  float* scratch = (float*)aligned_alloc(64, 8 * W * 32 * 4);
  auto row = [&](int h) { return (h < 0 || h >= H) ? zero.data() : x.data() + h * W * C; };
  auto run = [&](int which, uint16_t* out) {
    const int RBm = which == 2 ? 3 : 4;
    for (int h = 0; h < H; h += RBm) {
      const uint16_t* rows[6];
      for (int i = 0; i < RBm + 2; ++i) rows[i] = row(h - 1 + i);
      if (which == 0) cur_rows<4>(rows, wte.data(), be.data(), W, C, W * C, out + h * W * C, C);
      else if (which == 1) slide_rows<4>(rows, wte.data(), be.data(), W, C, W * C, out + h * W * C, C, park);
      else if (which == 2) slide_rows<3>(rows, wte.data(), be.data(), W, C, W * C, out + h * W * C, C, park);
      else pre_rows<4>(rows, wte.data(), be.data(), W, C, W * C, out + h * W * C, C, scratch);
    }
  };
  std::fill(o1.begin(), o1.end(), 0xFFFF); std::fill(o2.begin(), o2.end(), 0xFFFF);
  std::vector<uint16_t> o3(H * W * C, 0xFFFF);
  std::vector<uint16_t> o4(H * W * C, 0xFFFF);
  run(0, o1.data()); run(1, o2.data()); run(2, o3.data()); run(3, o4.data());
  long d4 = 0; for (size_t k = 0; k < o1.size(); ++k) d4 += o1[k] != o4[k];
  printf("pre4 differing %ld\n", d4);
  long d3 = 0; for (size_t k = 0; k < o1.size(); ++k) d3 += o1[k] != o3[k];
  printf("slide3 differing %ld\n", d3);
  // check against scalar reference (fp64)
  double maxerr = 0; long diff = 0;
  for (int h = 0; h < H; ++h) for (int w = 0; w < W; ++w) for (int c = 0; c < C; ++c) {
    double acc = bias[c];
    for (int i = 0; i < 3; ++i) for (int j = 0; j < 3; ++j) {
      int hh = h + i - 1, ww = w + j - 1;
      if (hh >= 0 && hh < H && ww >= 0 && ww < W) acc += (double)wt[(i*3+j)*C+c] * bf2f(x[(hh*W+ww)*C+c]);
    }
    acc += bf2f(x[(h*W+w)*C+c]);
    size_t k = (h*W+w)*C+c;
    double e = std::fabs(bf2f(o2[k]) - acc) / (1 + std::fabs(acc));
    maxerr = std::max(maxerr, std::max(e, std::fabs(bf2f(o1[k]) - acc) / (1 + std::fabs(acc))));
    diff += o1[k] != o2[k];
  }
  printf("H=%d maxrel %.3g, differing %ld of %d\n", H, maxerr, diff, H*W*C);
  const char* names[4] = {"cur  ", "slide", "slid3", "pre4 "};
  uint16_t* outs[4] = {o1.data(), o2.data(), o3.data(), o4.data()};
  std::vector<double> best(4, 1e30); std::vector<std::vector<double>> all(4);
  for (int rep = 0; rep < 30; ++rep) for (int which = 0; which < 4; ++which) {
    auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < iters; ++it) run(which, outs[which]);
    double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / iters / (H * W * C / 32.0);
    best[which] = std::min(best[which], ns); all[which].push_back(ns);
  }
  for (int w = 0; w < 4; ++w) { std::sort(all[w].begin(), all[w].end());
    printf("%s: min %.2f  median %.2f ns per 32 outputs\n", names[w], best[w], all[w][all[w].size()/2]); }
}
