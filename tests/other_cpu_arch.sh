#!/usr/bin/env bash
# The CPU kernels hold code for AVX-512 and for AVX2 (and a plain fallback), and a build compiles
# one of them (CPVT_CPU_ARCH; native, the default, picks this machine's), so the test suite checks
# only that one. This builds the CPU kernels again, for another x86-64 level, in a scratch copy of
# the source tree (no CUDA kernels), and runs the cpu backend's tests against that build.
#
# Usage: bash tests/other_cpu_arch.sh [arch]
#   arch: a CPVT_CPU_ARCH value; by default x86-64-v3 (AVX2) on a CPU with AVX-512, and nothing
#   to do on others (their native build is the AVX2 or plain one). PYTHON: the interpreter
#   (default: python), whose torch the build compiles against.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
arch=${1:-}
if [ -z "$arch" ]; then
  if grep -qw avx512f /proc/cpuinfo 2>/dev/null && grep -qw avx2 /proc/cpuinfo; then
    arch=x86-64-v3
  else
    echo "other_cpu_arch: this CPU has no AVX-512, so the native build the tests ran is the" \
         "AVX2 or plain one; nothing else to check here"
    exit 0
  fi
fi
start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/cpvt-arch-XXXXXX")
trap 'rm -rf "$work"' EXIT
cp -r setup.py pyproject.toml README.md csrc cpvt_kernels tests "$work"/
rm -rf "$work"/cpvt_kernels/_C*.so "$work"/cpvt_kernels/_build_info.py
find "$work" -name __pycache__ -prune -exec rm -rf {} +
echo "other_cpu_arch: building the CPU kernels with CPVT_CPU_ARCH=$arch in $work"
if ! (cd "$work" && CPVT_BUILD_CUDA=0 CPVT_CPU_ARCH="$arch" MAX_JOBS=${MAX_JOBS:-2} \
      "$py" setup.py build_ext --inplace > build.log 2>&1); then
  tail -n 60 "$work/build.log"
  echo "other_cpu_arch: the build failed" >&2
  exit 1
fi
grep "cpvt_kernels build: wrote" "$work/build.log" || true
echo "other_cpu_arch: built in $(( $(date +%s) - start )) s"
cd "$work"
# The copy's package, not an installed one, and the build asked for.
"$py" - "$work" "$arch" <<'PY'
import os, sys
import cpvt_kernels
from cpvt_kernels import _build_info, ops
work, arch = sys.argv[1:]
assert os.path.realpath(cpvt_kernels.__file__).startswith(os.path.realpath(work)), cpvt_kernels.__file__
assert _build_info.CPU_ARCH == arch and ops.HAS_CPU_KERNELS, (_build_info.CPU_ARCH, ops._EXT_ERROR)
print(f"other_cpu_arch: testing {cpvt_kernels.__file__}, CPU kernels for "
      f"{' '.join(_build_info.CPU_FEATURES or ()) or 'any CPU'}")
PY
"$py" -m pytest -q -p no:cacheprovider tests/test_peg.py tests/test_fuzz.py tests/test_errors.py \
  -k "not triton"
echo "other_cpu_arch: done in $(( $(date +%s) - start )) s"
