// Copies of S MB with 2 OpenMP threads, best and median of R: AVX2 cached stores (vec),
// non-temporal stores in address order (nt_seq), and non-temporal stores interleaved over L
// streams 32 bytes at a time, as a kernel storing RB x WB output tokens per channel block does
// (nt_ilvL; also cached: vec_ilvL). gcc -O2 -march=native -fopenmp nt_avx2.c; ./a.out S R
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
// token = 768 bytes (192 floats). Interleave L tokens: for each 32-byte chunk c of a token, store chunk c of tokens 0..L-1.
#define ILV(L) static __attribute__((noinline)) void ilv##L(float*d,const float*s,size_t n,int nt){ \
  const size_t tok=192; size_t ntok=n/tok; \
  for(size_t t0=0;t0+L<=ntok;t0+=L) \
    for(size_t c=0;c<tok;c+=8) { \
      _Pragma("GCC unroll 16") for(int l=0;l<L;l++){ __m256 v=_mm256_loadu_ps(s+(t0+l)*tok+c); \
        if(nt)_mm256_stream_ps(d+(t0+l)*tok+c,v); else _mm256_storeu_ps(d+(t0+l)*tok+c,v);}} \
  if(nt)_mm_sfence(); }
ILV(1) ILV(2) ILV(4) ILV(8) ILV(16)
static void ilv(float*d,const float*s,size_t n,int L,int nt){
  switch(L){case 1: ilv1(d,s,n,nt);break; case 2: ilv2(d,s,n,nt);break; case 4: ilv4(d,s,n,nt);break; case 8: ilv8(d,s,n,nt);break; default: ilv16(d,s,n,nt);}
}
int main(int argc,char**argv){ size_t bytes=(size_t)atof(argv[1])*1e6; int reps=atoi(argv[2]);
 size_t n=bytes/4/(192*16)*(192*16);
 float*s=aligned_alloc(64,n*4),*d=aligned_alloc(64,n*4); for(size_t i=0;i<n;i++){s[i]=i;d[i]=0;}
 int Ls[]={1,2,4,8,16}; double*ts=malloc(reps*sizeof(double));
 for(int round=0;round<2;round++) for(int nt=0;nt<2;nt++) for(int li=0;li<5;li++){ int L=Ls[li];
  for(int r=0;r<reps;r++){ double t0=now();
   #pragma omp parallel
   { int t=omp_get_thread_num(),T=omp_get_num_threads(); size_t chunk=n/T/(192*16)*(192*16); size_t a=chunk*t,b=(t==T-1)?n:a+chunk;
     ilv(d+a,s+a,b-a,L,nt);}
   ts[r]=now()-t0;}
  qsort(ts,reps,sizeof(double),cmp);
  printf("%s L=%-2d %6.1f MB  best %8.1f us  %6.1f GB/s  median %8.1f us\n",nt?"nt ":"vec",L,n*4/1e6,ts[0]*1e6,2*n*4/ts[0]/1e9,ts[reps/2]*1e6);}
}
