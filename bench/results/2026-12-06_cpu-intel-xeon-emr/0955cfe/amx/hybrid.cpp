// The bfloat16 3x3 forward of one H x W x 192 image (one thread, rows in L2) with part of the
// outputs on the AMX unit: tdpbf16ps with a diagonal B tile per tap and 16 channels (even or odd
// ones of a block of 32, as the op's even/odd loop orders them), 16 pixels of a row per A tile,
// the residual as a tenth tap with B = I, the bias preloaded into the accumulators: the taps in
// the op's order, so the outputs are bitwise those of the op's loop (`cur`, common.h). Tiles:
// 0/1 the even/odd accumulators, {2, 3, 4} and {5, 6, 7} (A, B even, B odd) for alternate taps.
// The AVX-512 part is the op's block (common.h). ./hybrid H ITERS FULL MODE RATIO NOLOAD DEFER
// (amx.log says what each argument does); build.sh builds it.
#include "common.h"
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdlib>
#include <functional>
struct TileCfg { uint8_t palette, start_row, r[14]; uint16_t colsb[16]; uint8_t rows[16]; };
// tiles: 0 Ce, 1 Co, {2 A, 3 Be, 4 Bo}, {5 A, 6 Be, 7 Bo}
struct Amx {
  int H, W, C;
  std::vector<uint16_t> B;  // [10][C/32][2 (e,o)][16 rows][32] : even/odd diagonal
  std::vector<float> bias_eo;
  float* scratch;  // [2][2][16][16]
  const uint16_t* x; uint16_t* out; __m512i il;
  long nan_blocks = 0;
  // current unit
  int h = 0, c0 = 0, tap = 0; bool active = false; int sbuf = 0; int pend_h = -1, pend_c0 = 0, pend_buf = 0;
  void build(const float* wt, const float* bias) {
    B.assign(10 * (C / 32) * 2 * 512, 0);
    for (int t = 0; t < 10; ++t) for (int g = 0; g < C / 32; ++g) for (int e = 0; e < 2; ++e) for (int n = 0; n < 16; ++n) {
      const int ch = g * 32 + 2 * n + e;
      float w = t < 9 ? wt[t * C + ch] : 1.0f;
      uint32_t u; memcpy(&u, &w, 4);
      B[(((t * (C / 32) + g) * 2 + e) * 16 + n) * 32 + 2 * n + e] = u >> 16;
    }
    bias_eo.resize(C);
    for (int g = 0; g < C / 32; ++g) for (int n = 0; n < 16; ++n) { bias_eo[g*32+n] = bias[g*32+2*n]; bias_eo[g*32+16+n] = bias[g*32+2*n+1]; }
    scratch = (float*)aligned_alloc(64, 2 * 2 * 256 * 4);
  }
  const uint16_t* b(int t, int g, int e) const { return B.data() + ((t * (C / 32) + g) * 2 + e) * 512; }
  void start(int h_, int c0_) {
    h = h_; c0 = c0_; tap = 0; active = true;
    _tile_loadd(0, bias_eo.data() + c0, 0); _tile_loadd(1, bias_eo.data() + c0 + 16, 0);
  }
  // one tap (order: rows 0,1 of the kernel, residual, row 2)
  int noload = 0; int defer = 0;
  AI void step() {
    static constexpr int order[10] = {0, 1, 2, 3, 4, 5, 9, 6, 7, 8};
    if (tap == 5 && defer) epilogue();
    const int t = order[tap];
    const int g = c0 / 32;
    const uint16_t* a = t == 9 ? x + ((long)h * W + 1) * C + c0 : x + ((long)(h - 1 + t / 3) * W + t % 3) * C + c0;
    if (noload == 1) { if (tap & 1) { _tile_dpbf16ps(0, 5, 6); _tile_dpbf16ps(1, 5, 7);} else { _tile_dpbf16ps(0, 2, 3); _tile_dpbf16ps(1, 2, 4);} }
    else if (noload == 2) { if (tap & 1) { _tile_loadd(5, a, 2L * C); _tile_dpbf16ps(0, 5, 6); _tile_dpbf16ps(1, 5, 7);} else { _tile_loadd(2, a, 2L * C); _tile_dpbf16ps(0, 2, 3); _tile_dpbf16ps(1, 2, 4);} }
    else if (tap & 1) {
      _tile_loadd(5, a, 2L * C); _tile_loadd(6, b(t, g, 0), 64); _tile_loadd(7, b(t, g, 1), 64);
      _tile_dpbf16ps(0, 5, 6); _tile_dpbf16ps(1, 5, 7);
    } else {
      _tile_loadd(2, a, 2L * C); _tile_loadd(3, b(t, g, 0), 64); _tile_loadd(4, b(t, g, 1), 64);
      _tile_dpbf16ps(0, 2, 3); _tile_dpbf16ps(1, 2, 4);
    }
    if (++tap == 10) {
      _tile_stored(0, scratch + sbuf * 512, 64); _tile_stored(1, scratch + sbuf * 512 + 256, 64);
      active = false; pend_h = h; pend_c0 = c0; pend_buf = sbuf; sbuf ^= 1;
    }
  }
  AI void epilogue() {
    if (pend_h < 0) return;
    const float* s = scratch + pend_buf * 512;
    __mmask16 bad = 0;
#pragma GCC unroll 16
    for (int m = 0; m < 16; ++m) {
      const __m512 e = _mm512_load_ps(s + m * 16), o = _mm512_load_ps(s + 256 + m * 16);
      bad |= _mm512_cmp_ps_mask(e, o, _CMP_UNORD_Q);
      const __m512i hh = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(o, e));
      _mm512_storeu_si512(out + ((long)pend_h * W + 1 + m) * C + pend_c0, _mm512_permutexvar_epi16(il, hh));
    }
    if (bad) ++nan_blocks;
    pend_h = -1;
  }
};

template <int NB, int RB>
AI void blk(const uint16_t* const* rows, const float* wte, const float* be, int W, int C, uint16_t* out, int w, int c0, __m512i il) {
  const uint16_t* r[RB + 2];
  for (int i = 0; i < RB + 2; ++i) r[i] = rows[i] + c0;
  const bool L = w == 0, R = w + NB == W;
  if (L && R) block<NB, RB, true, true>(r, wte + c0, be + c0, w, C, C, out + c0, (long)W * C, il);
  else if (L) block<NB, RB, true, false>(r, wte + c0, be + c0, w, C, C, out + c0, (long)W * C, il);
  else if (R) block<NB, RB, false, true>(r, wte + c0, be + c0, w, C, C, out + c0, (long)W * C, il);
  else block<NB, RB, false, false>(r, wte + c0, be + c0, w, C, C, out + c0, (long)W * C, il);
}

int main(int argc, char** argv) {
  const int H = argc > 1 ? atoi(argv[1]) : 24, W = H, C = 192;
  const int iters = argc > 2 ? atoi(argv[2]) : 300;
  const int full_rows = argc > 3 ? atoi(argv[3]) : 4;  // full AVX rows after each 4 AMX rows
  const int mode = argc > 4 ? atoi(argv[4]) : 0;        // 1: AMX only, 2: AVX only
  const int ratio = argc > 5 ? atoi(argv[5]) : 0; const int noload = argc > 6 ? atoi(argv[6]) : 0;       // AMX steps per AVX block (0: proportional)
  if (syscall(SYS_arch_prctl, 0x1023, 18)) { printf("no AMX permission\n"); return 1; }
  std::vector<uint16_t> x(H * W * C), zero(W * C, 0), o1(H * W * C, 0xFFFF), o2(H * W * C, 0xFFFF);
  std::vector<float> wt(9 * C), bias(C), wte(9 * C), be(C);
  uint32_t s = 12345; auto rnd = [&]() { s = s * 1664525 + 1013904223; return (s >> 8) / 16777216.0f - 0.5f; };
  for (auto& v : x) v = f2bf(rnd() * 4);
  for (auto& v : wt) v = bf2f(f2bf(rnd()));
  for (auto& v : bias) v = bf2f(f2bf(rnd()));
  for (int t = 0; t < 9; ++t) for (int c0 = 0; c0 < C; c0 += 32) for (int i = 0; i < 16; ++i) {
    wte[t*C+c0+i] = wt[t*C+c0+2*i]; wte[t*C+c0+16+i] = wt[t*C+c0+2*i+1]; }
  for (int c0 = 0; c0 < C; c0 += 32) for (int i = 0; i < 16; ++i) { be[c0+i] = bias[c0+2*i]; be[c0+16+i] = bias[c0+2*i+1]; }
  const __m512i il = interleave_idx();
  Amx amx{H, W, C}; amx.build(wt.data(), bias.data()); amx.x = x.data(); amx.il = il; amx.noload = noload; amx.defer = argc > 7 ? atoi(argv[7]) : 0;
  TileCfg cfg{}; cfg.palette = 1;
  for (int i = 0; i < 8; ++i) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
  _tile_loadconfig(&cfg);
  auto row = [&](int h) { return (h < 0 || h >= H) ? zero.data() : x.data() + (long)h * W * C; };
  auto run_cur = [&](uint16_t* out) {
    for (int h = 0; h < H; h += 4) {
      const uint16_t* rows[6];
      for (int i = 0; i < 6; ++i) rows[i] = row(h - 1 + i);
      cur_rows<4>(rows, wte.data(), be.data(), W, C, (long)W * C, out + (long)h * W * C, C);
    }
  };
  // AVX work of a band: list of (kind, rows ptr set, out row, w, c0)
  struct Job { int h0, nrows, w, nb, c0; };
  std::vector<Job> jobs; std::vector<std::pair<int,int>> units;  // AMX (h, c0)
  auto run_hyb = [&](uint16_t* out) {
    amx.out = out;
    auto do_job = [&](const Job& j) {
      const uint16_t* rows[6];
      for (int i = 0; i < j.nrows + 2; ++i) rows[i] = row(j.h0 - 1 + i);
      uint16_t* o = out + (long)j.h0 * W * C;
      switch (j.nrows * 10 + j.nb) {
        case 41: blk<1, 4>(rows, wte.data(), be.data(), W, C, o, j.w, j.c0, il); break;
        case 42: blk<2, 4>(rows, wte.data(), be.data(), W, C, o, j.w, j.c0, il); break;
        case 31: blk<1, 3>(rows, wte.data(), be.data(), W, C, o, j.w, j.c0, il); break;
        case 32: blk<2, 3>(rows, wte.data(), be.data(), W, C, o, j.w, j.c0, il); break;
        case 21: blk<1, 2>(rows, wte.data(), be.data(), W, C, o, j.w, j.c0, il); break;
        case 22: blk<2, 2>(rows, wte.data(), be.data(), W, C, o, j.w, j.c0, il); break;
        case 11: blk<1, 1>(rows, wte.data(), be.data(), W, C, o, j.w, j.c0, il); break;
        case 12: blk<2, 1>(rows, wte.data(), be.data(), W, C, o, j.w, j.c0, il); break;
      }
    };
    auto add_rows = [&](int h0, int n, int w0, int w1) {  // AVX jobs for rows h0.., columns [w0, w1)
      while (n > 0) {
        const int rb = std::min(n, 4);
        for (int c0 = 0; c0 < C; c0 += 32)
          for (int w = w0; w < w1;) { const int nb = w1 - w >= 2 ? 2 : 1; jobs.push_back({h0, rb, w, nb, c0}); w += nb; }
        h0 += rb; n -= rb;
      }
    };
    jobs.clear(); units.clear();
    int h = 0;
    add_rows(0, 1, 0, W); h = 1;
    while (h + 4 <= H - 1) {
      for (int c0 = 0; c0 < C; c0 += 32) for (int r = 0; r < 4; ++r) units.push_back({h + r, c0});
      add_rows(h, 4, 0, 1); add_rows(h, 4, 17, W);
      const int nf = std::min(full_rows, H - (h + 4));
      add_rows(h + 4, nf, 0, W);
      h += 4 + nf;
    }
    add_rows(h, H - h, 0, W);
    if (mode == 3 || mode == 4 || mode == 5) {
      // full AVX rows only (cur's loop, RB=4) over rows [0,H) except AMX rows, AMX units stepped inside
      const long total_steps = (long)units.size() * 10; long done = 0; size_t ui = 0;
      long nblocks = 0; for (int hh = 0; hh < H; hh += 4) nblocks += (W / 2) * (C / 32);
      long k = 0;
      for (int hh = 0; hh < H; hh += 4) {
        const uint16_t* rows[6];
        for (int i = 0; i < 6; ++i) rows[i] = row(hh - 1 + i);
        for (int w0 = 0; w0 < W; w0 += 2) for (int c0 = 0; c0 < C; c0 += 32) {
          if (mode != 5) {
          const uint16_t* r[6]; for (int i = 0; i < 6; ++i) r[i] = rows[i] + c0;
          uint16_t* o = out + (long)hh * W * C;
          if (w0 == 0) block<2, 4, true, false>(r, wte.data() + c0, be.data() + c0, w0, C, C, o + c0, (long)W * C, il);
          else if (w0 + 2 == W) block<2, 4, false, true>(r, wte.data() + c0, be.data() + c0, w0, C, C, o + c0, (long)W * C, il);
          else block<2, 4, false, false>(r, wte.data() + c0, be.data() + c0, w0, C, C, o + c0, (long)W * C, il);
          }
          ++k;
          if (mode != 4) while (done * nblocks < k * total_steps) {
            if (!amx.active) { if (ui == units.size()) break; amx.start(units[ui].first, units[ui].second); ++ui; }
            amx.step(); ++done; if (!amx.active && !amx.defer) amx.epilogue();
          }
        }
      }
      amx.epilogue();
      return;
    }
    if (mode == 2) { for (auto& j : jobs) do_job(j); return; }
    if (mode == 1) { for (auto& j : jobs) if (!(j.nrows == 4 && (j.w == 0 || j.w >= 17))) {} 
      for (auto& u : units) { amx.epilogue(); amx.start(u.first, u.second); while (amx.active) amx.step(); } amx.epilogue(); return; }
    const long total_steps = (long)units.size() * 10; long done_steps = 0; size_t ui = 0;
    auto amx_step = [&]() {
      if (!amx.active) { if (ui == units.size()) return false; amx.start(units[ui].first, units[ui].second); ++ui; }
      amx.step(); ++done_steps;
      if (!amx.active) amx.epilogue();
      return true;
    };
    for (size_t k = 0; k < jobs.size(); ++k) {
      do_job(jobs[k]);
      if (ratio > 0) { for (int q = 0; q < ratio; ++q) amx_step(); }
      else while (done_steps * (long)jobs.size() < (long)(k + 1) * total_steps) if (!amx_step()) break;
    }
    while (amx_step()) {}
    amx.epilogue();
  };
  run_cur(o1.data()); run_hyb(o2.data());
  long diff = 0; for (size_t k = 0; k < o1.size(); ++k) diff += o1[k] != o2[k];
  printf("H=%d full_rows %d mode %d ratio %d: differs from cur at %ld of %zu, nan blocks %ld, AMX share %.2f\n", H, full_rows, mode, ratio, diff, o1.size(), amx.nan_blocks, units.size() * 16.0 / 32 / (H * W * C / 32.0 / 32));
  std::vector<double> a[2];
  for (int rep = 0; rep < 30; ++rep) for (int which = 0; which < 2; ++which) {
    auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < iters; ++it) which ? run_hyb(o2.data()) : run_cur(o1.data());
    a[which].push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / iters / (H * W * C / 32.0));
  }
  for (int w = 0; w < 2; ++w) { std::sort(a[w].begin(), a[w].end());
    printf("%s: min %.2f  median %.2f ns per 32 outputs\n", w ? "hybrid" : "cur   ", a[w][0], a[w][15]); }
  _tile_release();
}
