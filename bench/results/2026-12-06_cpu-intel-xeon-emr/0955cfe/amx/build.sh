#!/bin/bash
# Builds the AMX experiments here. hybrid.cpp takes the op's even/odd block (and its helpers)
# from the copy in ../../../2026-12-05_cpu-intel-xeon-emr/c2f8e56/ab/bf16_loops.cpp.
set -e
cd "$(dirname "$0")"
sed -n 11,104p ../../../2026-12-05_cpu-intel-xeon-emr/c2f8e56/ab/bf16_loops.cpp > common.h
gcc -O2 -march=sapphirerapids amx.c -o amx
gcc -O2 -march=sapphirerapids mix2.c -o mix2
g++ -O3 -march=native -std=c++17 hybrid.cpp -o hybrid
