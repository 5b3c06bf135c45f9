#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <time.h>
typedef struct { uint8_t palette, start_row, r[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg_t;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  syscall(SYS_arch_prctl, 0x1023, 18);
  int NF = atoi(argv[1]), nload = atoi(argv[2]), ntdp = atoi(argv[3]);
  cfg_t c; memset(&c,0,sizeof c); c.palette=1;
  for(int i=0;i<8;i++){c.colsb[i]=64;c.rows[i]=16;}
  _tile_loadconfig(&c);
  static uint16_t a[64*384] __attribute__((aligned(64))), b[2][16*32] __attribute__((aligned(64)));
  for(int i=0;i<64*384;i++)a[i]=0x3f80; for(int i=0;i<2*16*32;i++)((uint16_t*)b)[i]=0;
  _tile_zero(0);_tile_zero(1);
  __m512 a0=_mm512_set1_ps(1),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0,a7=a0,a8=a0,a9=a0,a10=a0,a11=a0; __m512 w=_mm512_set1_ps(0.5f);
  static float wm[64*16] __attribute__((aligned(64))); for(int q=0;q<64*16;q++) wm[q]=0.5f; int st = argc>4?atoi(argv[4]):0; static float sink[64*16] __attribute__((aligned(64)));
  long n=2000000; double t=now();
  for(long i=0;i<n;i++){
    const uint16_t* ap = a + (i & 7) * 32;
    if (i & 1) {
      if (nload>0) _tile_loadd(5, ap, 384);
      if (nload>1) { _tile_loadd(6, b[0], 64); _tile_loadd(7, b[1], 64);} 
      if (ntdp) {_tile_dpbf16ps(0, 5, 6); _tile_dpbf16ps(1, 5, 7);}
    } else {
      if (nload>0) _tile_loadd(2, ap, 384);
      if (nload>1) { _tile_loadd(3, b[0], 64); _tile_loadd(4, b[1], 64);} 
      if (ntdp) {_tile_dpbf16ps(0, 2, 3); _tile_dpbf16ps(1, 2, 4);}
    }
    for (int k=0;k<NF;k++){
#define F(x) x=_mm512_fmadd_ps(x,_mm512_load_ps(wm + ((k*12 + __LINE__) & 63)*16),w);
    F(a0)F(a1)F(a2)F(a3)F(a4)F(a5)F(a6)F(a7)F(a8)F(a9)F(a10)F(a11)
    if (st) { _mm512_store_ps(sink + (k&31)*16, a0); _mm512_store_ps(sink + ((k+1)&31)*16, a1); }
    __asm__ volatile(""::"v"(a0),"v"(a1),"v"(a2),"v"(a3),"v"(a4),"v"(a5),"v"(a6),"v"(a7),"v"(a8),"v"(a9),"v"(a10),"v"(a11));
    }
  }
  t=now()-t; printf("loads %d tdp %d + %d fma: %.3f ns per iter (2 tdp)\n", nload, ntdp, 12*NF, t/n*1e9);
  _tile_release();
}
