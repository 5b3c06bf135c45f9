// The float32 forward's 24x24 tokens (32 x 577 x 192 floats, 14.2 MB) read and written again
// (+1), 2 threads, the buffers in the last-level cache between calls as in bench_peg.py: which
// way of writing the output moves the bytes fastest? Median of 200 calls, 3 rounds.
//   g++ -O3 -march=native -mcldemote -fopenmp stores.cpp -o stores && ./stores [bytes] [chunk]
// stores.log: that run, after a header line naming the CPU, g++ and the commit (echo'd by the
// shell from /proc/cpuinfo, g++ -dumpversion and git rev-parse).
// Modes: AVX-512 stores (as the cpu backend's forward and torch's copy_ write); rep movsb
// (fast strings: a full-line protocol that could skip the read for ownership); the values
// computed into an L1 scratch row and moved out by rep movsb; non-temporal stores; memcpy;
// cached stores with each line pushed to the LLC by cldemote as written, or a row later.
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>

static inline void rep_movsb(void* d, const void* s, size_t n) {
  asm volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
}

int main(int argc, char** argv) {
  size_t bytes = argc > 1 ? atol(argv[1]) : 32ul * 577 * 192 * 4;
  size_t chunk = argc > 2 ? atol(argv[2]) : 24 * 192 * 4;  // a row of the grid
  size_t n = bytes / 4;
  float* src = (float*)aligned_alloc(4096, bytes);
  float* dst = (float*)aligned_alloc(4096, bytes);
  for (size_t i = 0; i < n; ++i) src[i] = float(i % 1000), dst[i] = 1.f;
  const int reps = 200;
  auto run = [&](int mode) {
    std::vector<double> ts;
    for (int r = 0; r < reps; ++r) {
      auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(2)
      {
        int t = omp_get_thread_num();
        size_t nchunks = n * 4 / chunk;
        size_t c0 = nchunks * t / 2, c1 = nchunks * (t + 1) / 2;
        alignas(64) static thread_local float scratch[65536];
        for (size_t c = c0; c < c1; ++c) {
          float* s = src + c * chunk / 4;
          float* d = dst + c * chunk / 4;
          size_t m = chunk / 4;
          if (mode == 0) {  // vector loop, cached stores
            for (size_t i = 0; i < m; i += 16) _mm512_store_ps(d + i, _mm512_add_ps(_mm512_load_ps(s + i), _mm512_set1_ps(1.f)));
          } else if (mode == 1) {  // rep movsb straight
            rep_movsb(d, s, chunk);
          } else if (mode == 2) {  // compute into L1 scratch, rep movsb out
            for (size_t i = 0; i < m; i += 16) _mm512_store_ps(scratch + i, _mm512_add_ps(_mm512_load_ps(s + i), _mm512_set1_ps(1.f)));
            rep_movsb(d, scratch, chunk);
          } else if (mode == 3) {  // NT stores
            for (size_t i = 0; i < m; i += 16) _mm512_stream_ps(d + i, _mm512_add_ps(_mm512_load_ps(s + i), _mm512_set1_ps(1.f)));
          } else if (mode == 5) {  // cached stores, each line demoted to LLC once written
            for (size_t i = 0; i < m; i += 16) { _mm512_store_ps(d + i, _mm512_add_ps(_mm512_load_ps(s + i), _mm512_set1_ps(1.f))); _cldemote(d + i); }
          } else if (mode == 6) {  // cached stores, demoted a row later
            for (size_t i = 0; i < m; i += 16) { _mm512_store_ps(d + i, _mm512_add_ps(_mm512_load_ps(s + i), _mm512_set1_ps(1.f))); if (c > c0) _cldemote(d + i - m); }
          } else if (mode == 4) {  // memcpy
            memcpy(d, s, chunk);
          }
        }
        if (mode == 3) _mm_sfence();
      }
      auto t1 = std::chrono::steady_clock::now();
      ts.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2];
  };
  const char* names[] = {"vec cached", "rep movsb", "vec->L1->movsb", "vec NT", "memcpy", "vec+cldemote", "vec+cldemote-1"};
  for (int round = 0; round < 3; ++round) {
    for (int m = 0; m < 7; ++m) {
      double us = run(m);
      printf("%-16s %8.1f us  %6.1f GB/s\n", names[m], us, 2.0 * bytes / us / 1e3);
    }
    printf("\n");
  }
  // the read side after: sum dst (is it in cache?)
  return 0;
}
