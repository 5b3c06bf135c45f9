#!/usr/bin/env bash
# Builds bench/cuda_micro/peg_micro, the standalone microbenchmark of the CUDA PEG kernels, for
# sm_90 (or $ARCH). Needs nvcc and the torch headers (only c10's BFloat16 is used; nothing links
# torch, so the binary runs on a GPU machine with any torch, or none). OUT: the binary's path
# (default peg_micro; a relative path is taken from bench/cuda_micro).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$(command -v python || command -v python3)}
TORCH_INC=$("$PY" -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])")
NVCC=${NVCC:-${CUDA_HOME:+$CUDA_HOME/bin/}nvcc}
ARCH=${ARCH:-90}
OUT=${OUT:-peg_micro}
"$NVCC" -O3 -std=c++17 -gencode arch=compute_$ARCH,code=sm_$ARCH -I"$TORCH_INC" \
    --expt-relaxed-constexpr -lineinfo -Xptxas -warn-spills ${NVCC_FLAGS:-} -o "$OUT" peg_micro.cu
echo "built $(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"
