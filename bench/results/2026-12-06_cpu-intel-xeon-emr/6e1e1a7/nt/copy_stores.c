// Copies of S MB with 2 OpenMP threads, best and mean of R: AVX-512 loads and stores (vec),
// glibc memcpy, rep movsb, AVX-512 non-temporal stores (nt), and a 16 KB L1 staging buffer
// copied out with rep movsb (staged). gcc -O2 -march=native -fopenmp copy_stores.c; ./a.out S R
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static void vec_copy(float*d,const float*s,size_t n){for(size_t i=0;i<n;i+=16)_mm512_storeu_ps(d+i,_mm512_loadu_ps(s+i));}
static void nt_copy(float*d,const float*s,size_t n){for(size_t i=0;i<n;i+=16)_mm512_stream_ps(d+i,_mm512_loadu_ps(s+i));_mm_sfence();}
static void movsb(void*d,const void*s,size_t n){__asm__ volatile("rep movsb":"+D"(d),"+S"(s),"+c"(n)::"memory");}
// compute into an L1 scratch of 'chunk' bytes, then rep movsb to dest
static void staged(float*d,const float*s,size_t n){ float buf[4096] __attribute__((aligned(64)));
  for(size_t i=0;i<n;i+=4096){size_t m=n-i<4096?n-i:4096; for(size_t j=0;j<m;j+=16)_mm512_store_ps(buf+j,_mm512_add_ps(_mm512_loadu_ps(s+i+j),_mm512_set1_ps(1.f))); movsb(d+i,buf,m*4);} }
int main(int argc,char**argv){ size_t bytes=(size_t)atof(argv[1])*1e6; size_t n=bytes/4/1024*1024; int reps=atoi(argv[2]);
 float*s=aligned_alloc(64,n*4),*d=aligned_alloc(64,n*4); for(size_t i=0;i<n;i++){s[i]=i;d[i]=0;}
 const char*names[]={"vec","memcpy","movsb","nt","staged"};
 for(int round=0;round<3;round++) for(int m=0;m<5;m++){ double best=1e9, tot=0;
  for(int r=0;r<reps;r++){ double t0=now();
   #pragma omp parallel
   { int t=omp_get_thread_num(),T=omp_get_num_threads(); size_t a=n*t/T/16*16,b=(t==T-1)?n:n*(t+1)/T/16*16;
     if(m==0)vec_copy(d+a,s+a,b-a); else if(m==1)memcpy(d+a,s+a,(b-a)*4); else if(m==2)movsb(d+a,s+a,(b-a)*4); else if(m==3)nt_copy(d+a,s+a,b-a); else staged(d+a,s+a,b-a);}
   double t=now()-t0; if(t<best)best=t; tot+=t;}
  printf("%-7s %6.1f MB  best %7.1f us  %6.1f GB/s  mean %7.1f us\n",names[m],n*4/1e6,best*1e6,2*n*4/best/1e9,tot/reps*1e6);}
}
