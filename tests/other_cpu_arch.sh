#!/usr/bin/env bash
# The CPU kernels hold code for AVX-512 with and without AVX512-BF16, for AVX2 and for neither,
# and a build compiles one of them (CPVT_CPU_ARCH; native, the default, picks this machine's), so
# the test suite checks only that one. This builds the CPU kernels again for other x86-64 levels,
# each in a scratch copy of the source tree (no CUDA kernels), and runs the cpu backend's tests
# against each build.
#
# Usage: bash tests/other_cpu_arch.sh [arch ...]
#   arch: CPVT_CPU_ARCH values. By default, on a CPU with AVX-512: x86-64-v3 (AVX2), and
#   x86-64-v4 (AVX-512 without AVX512-BF16) where the CPU has AVX512-BF16; on other CPUs nothing
#   (their native build is the AVX2 or the plain one). About 2.5 minutes each on 2 cores;
#   generic takes longer to compile (7 minutes). PYTHON: the interpreter (default: python),
#   whose torch the builds compile against.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
archs=("$@")
if [ ${#archs[@]} -eq 0 ]; then
  flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
  if [[ " $flags " == *" avx512f "* && " $flags " == *" avx2 "* ]]; then
    archs=(x86-64-v3)
    [[ " $flags " == *" avx512_bf16 "* ]] && archs+=(x86-64-v4)
  else
    echo "other_cpu_arch: this CPU has no AVX-512, so the native build the tests ran is the" \
         "AVX2 or the plain one; nothing else to check here"
    exit 0
  fi
fi
root=$PWD
work_dirs=()
trap 'rm -rf "${work_dirs[@]}"' EXIT

check_arch() {
  local arch=$1 start work
  start=$(date +%s)
  work=$(mktemp -d "${TMPDIR:-/tmp}/cpvt-arch-XXXXXX")
  work_dirs+=("$work")
  cd "$root"
  cp -r setup.py pyproject.toml README.md csrc cpvt_kernels tests "$work"/
  rm -rf "$work"/cpvt_kernels/_C*.so "$work"/cpvt_kernels/_build_info.py
  find "$work" -name __pycache__ -prune -exec rm -rf {} +
  echo "other_cpu_arch: building the CPU kernels with CPVT_CPU_ARCH=$arch in $work"
  if ! (cd "$work" && CPVT_BUILD_CUDA=0 CPVT_CPU_ARCH="$arch" MAX_JOBS=${MAX_JOBS:-2} \
        "$py" setup.py build_ext --inplace > build.log 2>&1); then
    tail -n 60 "$work/build.log"
    echo "other_cpu_arch: the build with CPVT_CPU_ARCH=$arch failed" >&2
    return 1
  fi
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
# The instruction sets the build records: those of the level, none beyond it.
has, lacks = {"x86-64-v3": ({"avx2", "fma", "f16c"}, {"avx512f"}),
              "x86-64-v4": ({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
                            {"avx512_bf16"}),
              "generic": (set(), {"avx", "avx2"})}.get(arch, (set(), set()))
features = set(_build_info.CPU_FEATURES or ())
assert has <= features and not lacks & features, (arch, sorted(features))
print(f"other_cpu_arch: testing {cpvt_kernels.__file__}, CPU kernels for "
      f"{' '.join(_build_info.CPU_FEATURES or ()) or 'any CPU'}")
PY
  "$py" -m pytest -q -p no:cacheprovider tests/test_peg.py tests/test_fuzz.py tests/test_errors.py \
    -k "not triton"
  echo "other_cpu_arch: CPVT_CPU_ARCH=$arch done in $(( $(date +%s) - start )) s"
  cd "$root"
  rm -rf "$work"
}

for arch in "${archs[@]}"; do
  check_arch "$arch"
done
