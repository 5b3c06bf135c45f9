// Reciprocal throughput of single AVX-512 instructions, 12 independent chains of 4 unrolled
// repeats: TSC ticks per instruction divided by 0.5836 (TSC ticks per cycle of a dependent
// vfmadd chain, 4-cycle latency, measured alone: 2.1 GHz TSC, about 3.6 GHz core), so "cycles"
// at an unloaded clock; relative values are what matter (FMA: 2 per cycle at the AVX-512 clock).
// Build: gcc -O2 -march=native throughput.c -o throughput
#include <stdio.h>
#include <x86intrin.h>
#define N 50000000L
#define BODY(ins) __asm__ volatile( \
 ".rept 4\n\t" ins " %%zmm16,%%zmm17,%%zmm0\n\t" ins " %%zmm16,%%zmm17,%%zmm1\n\t" ins " %%zmm16,%%zmm17,%%zmm2\n\t" ins " %%zmm16,%%zmm17,%%zmm3\n\t" \
 ins " %%zmm16,%%zmm17,%%zmm4\n\t" ins " %%zmm16,%%zmm17,%%zmm5\n\t" ins " %%zmm16,%%zmm17,%%zmm6\n\t" ins " %%zmm16,%%zmm17,%%zmm7\n\t" \
 ins " %%zmm16,%%zmm17,%%zmm8\n\t" ins " %%zmm16,%%zmm17,%%zmm9\n\t" ins " %%zmm16,%%zmm17,%%zmm10\n\t" ins " %%zmm16,%%zmm17,%%zmm11\n\t.endr" ::: \
 "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11")
#define T(name, ins) { unsigned a; unsigned long long t0=__rdtscp(&a); for(long n=0;n<N;n++){BODY(ins);} \
  unsigned long long t1=__rdtscp(&a); printf("%-14s %.3f cyc/op\n",name,(double)(t1-t0)/(N*48.0)/0.5836); }
int main(){
 __asm__ volatile("vpxord %%zmm16,%%zmm16,%%zmm16\n\tvpxord %%zmm17,%%zmm17,%%zmm17":::"xmm16","xmm17");
 T("vfmadd231ps","vfmadd231ps")
 T("vdpbf16ps","vdpbf16ps")
 T("vaddps","vaddps")
 T("vpandd","vpandd")
 T("vpunpcklwd","vpunpcklwd")
 T("vpermw","vpermw")
 T("vcvtne2ps2bf16","vcvtne2ps2bf16")
 T("vpermt2w","vpermt2w")
 return 0;}
