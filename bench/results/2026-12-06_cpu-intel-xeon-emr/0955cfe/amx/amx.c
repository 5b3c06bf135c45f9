#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <time.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
typedef struct { uint8_t palette, start_row, r[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg_t;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  long r = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
  printf("perm %ld\n", r);
  int K = argc>1? atoi(argv[1]):32; int M = argc>2?atoi(argv[2]):16;
  cfg_t c; memset(&c,0,sizeof c); c.palette=1;
  for(int i=0;i<8;i++){c.colsb[i]=64;c.rows[i]=16;}
  // tiles 0-3: C (16 x 16 fp32), 4,5: A (M x K bf16), 6,7: B (K/2 x 16 pairs)
  for(int i=0;i<4;i++){c.rows[i]=M;c.colsb[i]=64;}
  for(int i=4;i<6;i++){c.rows[i]=M;c.colsb[i]=K*2;}
  for(int i=6;i<8;i++){c.rows[i]=K/2;c.colsb[i]=64;}
  _tile_loadconfig(&c);
  static uint16_t a[16*64], b[16*64]; static float out[16*16];
  for(int i=0;i<16*64;i++){a[i]=0x3f80;b[i]=0x3f80;}
  _tile_loadd(4,a,128); _tile_loadd(5,a,128); _tile_loadd(6,b,64); _tile_loadd(7,b,64);
  _tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3);
  long n=20000000; double t=now();
  for(long i=0;i<n;i++){ _tile_dpbf16ps(0,4,6); _tile_dpbf16ps(1,4,7); _tile_dpbf16ps(2,5,6); _tile_dpbf16ps(3,5,7);}
  t=now()-t; printf("K=%d M=%d: %.3f ns per tdp\n",K,M,t/(4.0*n)*1e9);
  // FMA throughput
  __m512 acc[12]; for(int i=0;i<12;i++)acc[i]=_mm512_set1_ps(i); __m512 w=_mm512_set1_ps(1.0001f);
  t=now(); for(long i=0;i<n;i++){ for(int j=0;j<12;j++) acc[j]=_mm512_fmadd_ps(acc[j],w,w);} t=now()-t;
  float s=0; for(int j=0;j<12;j++) s+=_mm512_reduce_add_ps(acc[j]);
  printf("fma: %.3f ns per fma (%g)\n", t/(12.0*n)*1e9, s);
  // interleaved: 1 tdp per 12 fma... vary
  int per = argc>3?atoi(argv[3]):8;
  t=now(); for(long i=0;i<n/4;i++){ _tile_dpbf16ps(0,4,6); for(int j=0;j<12;j++) acc[j]=_mm512_fmadd_ps(acc[j],w,w); _tile_dpbf16ps(1,4,7); for(int j=0;j<12;j++) acc[j]=_mm512_fmadd_ps(acc[j],w,w);} t=now()-t;
  s=0; for(int j=0;j<12;j++) s+=_mm512_reduce_add_ps(acc[j]);
  printf("mixed 2 tdp + 24 fma per iter: %.3f ns per iter (%g)\n", t/(n/4)*1e9, s);
  _tile_stored(0,out,64); _tile_release();
  return 0;
}
