#!/usr/bin/env bash
# The whole GPU check in one command, for a GPU machine with no network:
#
#   bash bench/gpu_suite.sh                 # every step
#   bash bench/gpu_suite.sh build test      # some steps, in the order given
#
# Steps:
#   build      compile the extension in place with the CUDA kernels, for this GPU's architecture
#              (without the CPU kernels unless CPVT_BUILD_CPU=1: they take minutes to compile and
#              CI tests them; the cpu backend's tests then skip)
#   selfcheck  python -m cpvt_kernels.selfcheck (gradcheck, opcheck, parity per backend)
#   micro      bench/cuda_micro: the tiled and streaming CUDA kernels alone, several variants,
#              checked and timed without torch (build with this machine's nvcc, then run)
#   profile    ncu (Nsight Compute, clocks left alone) over peg_micro's kernels, each launched
#              once: PROFILE_ONLY variants (default the tiled and the default streaming forward
#              and backward, and the cp.async ones) at PROFILE_SHAPES (default 0, CPVT-S bf16)
#   test       pytest -q tests on this machine (the CUDA and Triton tests run on CUDA tensors), in
#              PYTEST_WORKERS processes (pytest-xdist, default 8) when pytest-xdist is installed
#   test-stream  tests/test_cuda.py again with CPVT_CUDA_KERNELS=stream (the streaming kernels
#              wherever they apply), in the same processes
#   test-pipe  tests/test_cuda.py again with CPVT_CUDA_KERNELS=pipe (the experimental cp.async
#              kernels wherever they apply), in the same processes
#   test-triton-stream  tests/test_triton.py again with CPVT_TRITON_KERNELS=stream
#   sanitize   compute-sanitizer memcheck, racecheck and initcheck over bench/sanitize_small.py,
#              once per kernel family (SANITIZE_CUDA_KERNELS, default "tile stream pipe"; set
#              as CPVT_CUDA_KERNELS and CPVT_TRITON_KERNELS; "pipe", a cuda family only, runs the
#              cuda backend alone)
#   checks     selfcheck, test, test-stream, test-pipe, test-triton-stream and sanitize side by
#              side (none is timed), each with its own log and summary line
#   tune       bench/tune_triton.py for the tiled and the streaming Triton kernels (TUNE_ARGS,
#              default --quick: five candidates a pass; the streaming ones also with
#              TUNE_STREAM_ARGS, default "--prefetch 0 1": each block with its rows loaded as
#              they are used and an iteration ahead)
#   bench      bench/bench_peg.py --device cuda (the full grid; BENCH_ARGS=--quick for a short one),
#              then bench/goals.py over its peg.csv (goals.md: the open issues' goals, met or not)
#   model      bench/bench_model.py --device cuda
#
# Every log and result lands in one folder, bench/results/<date>_<gpu>/ (or $CPVT_RESULTS_DIR),
# with summary.txt listing each step's status and time. All steps run even when one fails; the
# exit status is non-zero if any failed.
#
# Environment: PYTHON (default: python, else python3), CPVT_RESULTS_DIR, BENCH_ARGS, MODEL_ARGS,
# TUNE_ARGS, TUNE_STREAM_ARGS, PYTEST_ARGS,
# MAX_JOBS (default 16), TORCH_CUDA_ARCH_LIST (default: the detected GPU's), CPVT_BUILD_CPU
# (default 0), PYTEST_WORKERS (default 8), SANITIZE_TOOLS (default "memcheck racecheck
# initcheck"), SANITIZE_BACKENDS (default "cuda,triton"), SANITIZE_TIMEOUT (seconds per tool,
# default 1200).
#
# On a lent GPU with little device time: the timed steps first, alone, then the checks side by
# side (on an H100 about 45 s build, 15 s micro, 50 s bench of five shapes, 170 s checks), e.g.
#   CPVT_RESULTS_DIR=$OUT/r PYTEST_WORKERS=12 BENCH_ARGS="--shapes 128x384x14 128x768x14 \
#       --dtypes bfloat16 --passes fwd,fwdbwd --no-plot" bash bench/gpu_suite.sh build micro bench checks
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-16}
# Exported, so that the test step knows the cpu backend was left out of the build.
export CPVT_BUILD_CPU=${CPVT_BUILD_CPU:-0}

STEPS=("$@")
if [ ${#STEPS[@]} -eq 0 ]; then
    STEPS=(build selfcheck test sanitize bench model)
fi
for s in "${STEPS[@]}"; do
    case "$s" in
        build|selfcheck|micro|profile|test|test-stream|test-pipe|test-triton-stream|sanitize|\
        checks|tune|bench|model) ;;
        *) echo "gpu_suite: unknown step '$s'; expected build selfcheck micro profile test" \
                "test-stream test-pipe test-triton-stream sanitize checks tune bench model" >&2
           exit 2 ;;
    esac
done

commit() {
    local head
    if head=$(git rev-parse --short HEAD 2>/dev/null); then
        git diff --quiet HEAD 2>/dev/null && echo "$head" || echo "$head-dirty"
    else
        echo unknown
    fi
}

if ! GPU_INFO=$("$PY" -c "import torch
assert torch.cuda.is_available(), 'no CUDA device'
cap = torch.cuda.get_device_capability()
print(torch.cuda.get_device_name()); print(f'{cap[0]}.{cap[1]}')" 2>&1); then
    echo "gpu_suite: this machine has no usable GPU for $PY: $GPU_INFO" >&2
    exit 2
fi
GPU_NAME=$(echo "$GPU_INFO" | sed -n 1p)
GPU_ARCH=$(echo "$GPU_INFO" | sed -n 2p)
GPU_SLUG=$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
OUT=${CPVT_RESULTS_DIR:-bench/results/$(date +%Y-%m-%d)_$GPU_SLUG}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"

{
    echo "== $(date -Iseconds) gpu_suite: ${STEPS[*]}"
    echo "gpu: $GPU_NAME (sm_${GPU_ARCH/./}), commit $(commit)"
} | tee -a "$SUMMARY"
{
    date -Iseconds
    nvidia-smi 2>&1 || echo "nvidia-smi not found"
    "$PY" -c "import sys, torch; print('python', sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
    command -v nvcc >/dev/null && nvcc --version
} > "$OUT/env.txt" 2>&1

FAILED=()
# Extra arguments, split on spaces.
read -r -a PYTEST_EXTRA <<< "${PYTEST_ARGS:-}"
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:-}"
read -r -a MODEL_EXTRA <<< "${MODEL_ARGS:-}"
read -r -a TUNE_EXTRA <<< "${TUNE_ARGS:---quick}"
read -r -a TUNE_STREAM_EXTRA <<< "${TUNE_STREAM_ARGS:---prefetch 0 1}"

# run_step NAME COMMAND...: runs COMMAND with its output in $OUT/NAME.log and on the terminal.
run_step() {
    local name=$1; shift
    local log="$OUT/$name.log" start rc
    start=$(date +%s)
    echo
    echo "=== [$name] $*"
    echo "\$ $*" > "$log"
    "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - start ))
    if [ "$rc" -eq 0 ]; then
        printf '%-22s ok      %5ds  %s\n' "$name" "$took" "$log" | tee -a "$SUMMARY"
    else
        printf '%-22s FAILED  %5ds  %s (exit %d)\n' "$name" "$took" "$log" "$rc" | tee -a "$SUMMARY"
        FAILED+=("$name")
    fi
    return 0
}

find_sanitizer() {
    local c site
    site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" 2>/dev/null)
    for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-}/bin/compute-sanitizer" \
             /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
             /opt/nvidia/*/compute-sanitizer/compute-sanitizer \
             "$site"/nvidia/*/bin/compute-sanitizer; do
        if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    return 1
}

step_build() {
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$GPU_ARCH}
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CPVT_BUILD_CUDA=1" \
         "CPVT_BUILD_CPU=$CPVT_BUILD_CPU"
    CPVT_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace || return 1
    "$PY" - <<'EOF'
import cpvt_kernels as ck
backends = ck.available_backends("cuda")
print("available on cuda:", backends)
missing = [b for b in ("cuda", "triton") if b not in backends]
for b in missing:
    print(f"missing backend {b}: {ck.ops._unavailable_reason(b, 'cuda')}")
raise SystemExit(1 if missing else 0)
EOF
}

step_sanitize() {
    local cs rc=0 tool
    if ! cs=$(find_sanitizer); then
        echo "compute-sanitizer not found (looked on PATH, in \$CUDA_HOME/bin, /usr/local/cuda*/bin and the nvidia wheels); install the CUDA toolkit's compute-sanitizer or put it on PATH"
        return 1
    fi
    "$cs" --version | head -n 3
    local kernels backends triton_kernels
    for kernels in ${SANITIZE_CUDA_KERNELS:-tile stream pipe}; do
        backends=${SANITIZE_BACKENDS:-cuda,triton}
        triton_kernels=$kernels
        if [ "$kernels" = pipe ]; then  # the cuda backend's family alone
            backends=cuda
            triton_kernels=tile  # not run
        fi
        for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck}; do
            echo "--- compute-sanitizer --tool $tool, kernels $kernels, $backends"
            # Without the caching allocator every tensor is its own allocation, so an access
            # past its end is out of bounds for memcheck instead of landing in a cached neighbour.
            CPVT_CUDA_KERNELS=$kernels CPVT_TRITON_KERNELS=$triton_kernels \
                PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
                timeout "${SANITIZE_TIMEOUT:-1200}" \
                "$cs" --tool "$tool" --error-exitcode 99 --print-limit 50 \
                "$PY" bench/sanitize_small.py --backends "$backends" 2>&1 \
                | tee "$OUT/sanitize_${tool}_$kernels.log"
            local r=${PIPESTATUS[0]}
            if [ "$r" -ne 0 ]; then
                echo "--- $tool, $kernels: FAILED (exit $r)"
                rc=1
            else
                echo "--- $tool, $kernels: no errors"
            fi
        done
    done
    return $rc
}

# Nsight Compute over peg_micro's kernels, each launched once (MICRO_PROFILE=1): the variants
# in PROFILE_ONLY (as MICRO_ONLY) at the shapes in PROFILE_SHAPES (default 0, CPVT-S bf16).
step_profile() {
    local ncu
    ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu \
          2>/dev/null | head -n 1)
    if [ -z "$ncu" ]; then echo "ncu not found"; return 1; fi
    if [ ! -x bench/cuda_micro/peg_micro ]; then
        NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc") \
            ARCH=${GPU_ARCH/./} PYTHON=$PY bash bench/cuda_micro/build.sh || return 1
    fi
    local only="fwd tile,fwd stream v4 rh8 sl1,fwd pipe cv4 ch64 ns6"
    only+=",bwd tile,bwd stream v2 rh8 sl1,bwd pipe cv4 ch64 ns6"
    MICRO_PROFILE=1 MICRO_SHAPES=${PROFILE_SHAPES:-0} MICRO_ONLY=${PROFILE_ONLY:-$only} \
        "$ncu" --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats -k regex:peg_ bench/cuda_micro/peg_micro
}

step_micro() {
    local nvcc
    nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
    NVCC=$nvcc ARCH=${GPU_ARCH/./} PYTHON=$PY bash bench/cuda_micro/build.sh || return 1
    bench/cuda_micro/peg_micro "${MICRO_REPS:-20}"
}

pytest_xdist() {
    if "$PY" -c "import xdist" 2>/dev/null && [ "${PYTEST_WORKERS:-8}" -gt 1 ]; then
        echo "-n ${PYTEST_WORKERS:-8}"
    fi
}

do_step() {
    local XDIST
    case "$1" in
        build) run_step build step_build ;;
        micro) run_step micro step_micro ;;
        profile) run_step profile step_profile ;;
        selfcheck) run_step selfcheck "$PY" -m cpvt_kernels.selfcheck --device cuda ;;
        test) read -r -a XDIST <<< "$(pytest_xdist)"
              run_step test "$PY" -m pytest -q -ra tests --junitxml="$OUT/pytest.xml" \
                  "${XDIST[@]}" "${PYTEST_EXTRA[@]}" ;;
        test-stream) read -r -a XDIST <<< "$(pytest_xdist)"
              run_step test-stream env CPVT_CUDA_KERNELS=stream "$PY" -m pytest -q -ra \
                  tests/test_cuda.py --junitxml="$OUT/pytest_stream.xml" "${XDIST[@]}" \
                  "${PYTEST_EXTRA[@]}" ;;
        test-pipe) read -r -a XDIST <<< "$(pytest_xdist)"
              run_step test-pipe env CPVT_CUDA_KERNELS=pipe "$PY" -m pytest -q -ra \
                  tests/test_cuda.py --junitxml="$OUT/pytest_pipe.xml" "${XDIST[@]}" \
                  "${PYTEST_EXTRA[@]}" ;;
        test-triton-stream) read -r -a XDIST <<< "$(pytest_xdist)"
              run_step test-triton-stream env CPVT_TRITON_KERNELS=stream "$PY" -m pytest -q \
                  -ra tests/test_triton.py --junitxml="$OUT/pytest_triton_stream.xml" \
                  "${XDIST[@]}" "${PYTEST_EXTRA[@]}" ;;
        sanitize) run_step sanitize step_sanitize ;;
        checks) step_checks ;;
        tune) run_step tune-tile "$PY" bench/tune_triton.py --out "$OUT/tune-tile" \
                  "${TUNE_EXTRA[@]}"
              run_step tune-stream "$PY" bench/tune_triton.py --kernels stream \
                  --out "$OUT/tune-stream" "${TUNE_EXTRA[@]}" "${TUNE_STREAM_EXTRA[@]}" ;;
        bench) run_step bench "$PY" bench/bench_peg.py --device cuda --out "$OUT" \
                   "${BENCH_EXTRA[@]}"
               if [ -f "$OUT/peg.csv" ]; then
                   "$PY" bench/goals.py "$OUT/peg.csv" 2>&1 | tee "$OUT/goals.md"
               fi ;;
        model) run_step model "$PY" bench/bench_model.py --device cuda --out "$OUT" \
                   "${MODEL_EXTRA[@]}" ;;
    esac
}

# The correctness steps side by side: none of them is timed, so they may share the GPU. The whole
# suite gets PYTEST_WORKERS processes, the three reruns a quarter of that each (at least 2). Their
# consoles go to <step>.console; their logs and summary lines are as when run alone.
CHECKS=(selfcheck test test-stream test-pipe test-triton-stream sanitize)
step_checks() {
    local s pids=() few=$(( ${PYTEST_WORKERS:-8} / 4 > 2 ? ${PYTEST_WORKERS:-8} / 4 : 2 ))
    for s in "${CHECKS[@]}"; do
        case "$s" in
            test-stream|test-pipe|test-triton-stream)
                ( PYTEST_WORKERS=$few do_step "$s" > "$OUT/$s.console" 2>&1 ) & ;;
            *) ( do_step "$s" > "$OUT/$s.console" 2>&1 ) & ;;
        esac
        pids+=($!)
    done
    echo "=== [checks] ${CHECKS[*]}, side by side (pids ${pids[*]})"
    wait "${pids[@]}"
    for s in "${CHECKS[@]}"; do
        grep -E "^$s[[:space:]]" "$SUMMARY" | tail -n 1
        if grep -qE "^$s[[:space:]]+FAILED" "$SUMMARY"; then FAILED+=("$s"); fi
    done
}

for s in "${STEPS[@]}"; do
    do_step "$s"
done

echo
echo "results in $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_suite: FAILED steps: ${FAILED[*]}" | tee -a "$SUMMARY"
    exit 1
fi
echo "gpu_suite: all steps passed (${STEPS[*]})" | tee -a "$SUMMARY"
