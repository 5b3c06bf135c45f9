#!/usr/bin/env bash
# Builds the op library and its C++ test with CMake against the active Python's torch, then
# runs ctest. Usage: bash tests/cpp/build_and_test.sh [build-dir]   (default: build-cmake)
#
# A CUDA build of torch makes its CMake config look for the CUDA toolkit even for a CPU-only
# build of this library: point it at the toolkit (CUDA_HOME, else /usr/local/cuda*), and at the
# NVRTC library shipped in pip's nvidia packages when the toolkit has none.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build-cmake}
py=${PYTHON:-python}
prefix=$($py -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release)
if [ "$($py -c 'import torch; print(torch.version.cuda is not None)')" = "True" ]; then
  cuda=${CUDA_HOME:-}
  if [ -z "$cuda" ]; then
    for d in /usr/local/cuda /usr/local/cuda-*; do
      if [ -x "$d/bin/nvcc" ]; then cuda=$d; break; fi
    done
  fi
  if [ -n "$cuda" ]; then
    args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda" -DCMAKE_CUDA_COMPILER="$cuda/bin/nvcc")
    if ! ls "$cuda"/lib64/libnvrtc.so* >/dev/null 2>&1; then
      nvrtc=$($py - <<'PY'
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
hits = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
print(hits[0] if hits else "")
PY
)
      [ -n "$nvrtc" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
    fi
  fi
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
fi
echo "cmake configure: ${args[*]}"
cmake -S . -B "$build" "${args[@]}" > "$build.configure.log" 2>&1 || { cat "$build.configure.log"; exit 1; }
grep "cpvt_kernels:" "$build.configure.log" || true
cmake --build "$build" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
ctest --test-dir "$build" --output-on-failure
