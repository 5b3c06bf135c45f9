#!/usr/bin/env bash
# One lease call: build, micro, selfcheck, benchmark, then the test suite beside the sanitizer.
set -u
export PYTHONUNBUFFERED=1 PYTHON=python3 MAX_JOBS=16 PYTEST_WORKERS=${PYTEST_WORKERS:-14}
LIMIT=${LIMIT:-565}
R=$OUT/r; mkdir -p "$R"; export CPVT_RESULTS_DIR=$R
T0=$(date +%s); el() { echo "[t+$(( $(date +%s) - T0 ))s] $*" | tee -a "$R/timeline.txt"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv | tee "$R/nvidia_smi_start.csv"
git rev-parse --short HEAD 2>/dev/null
( NVCC=$(command -v nvcc) ARCH=90 PYTHON=python3 bash bench/cuda_micro/build.sh > "$R/micro_build.log" 2>&1 ) & MB=$!
( timeout -s INT -k 10 230 python3 -m pytest -q -ra -p no:cacheprovider -n 4 --durations=15 \
    tests/test_triton.py > "$R/test_triton_early.log" 2>&1; echo "rc $?" >> "$R/test_triton_early.log" ) & TT=$!
el build; bash bench/gpu_suite.sh build > /dev/null
tail -3 "$R/build.log"
wait $MB; el micro; timeout 150 bench/cuda_micro/peg_micro 20 > "$R/micro.log" 2>&1; echo "micro rc $?" | tee -a "$R/micro.log"
wait $TT; el "triton early: $(tail -2 "$R/test_triton_early.log" | tr '\n' ' ')"
el selfcheck; timeout 120 python3 -m cpvt_kernels.selfcheck --device cuda > "$R/selfcheck.log" 2>&1; echo "selfcheck rc $?" | tee -a "$R/selfcheck.log"
el bench; timeout 150 python3 bench/bench_peg.py --device cuda --out "$R" --shapes 128x384x14 128x768x14 \
    --dtypes bfloat16 --passes fwd,fwdbwd --no-plot > "$R/bench.log" 2>&1; echo "bench rc $?" | tee -a "$R/bench.log"
el sanitize; ( SANITIZE_TOOLS="memcheck racecheck" SANITIZE_TIMEOUT=200 bash bench/gpu_suite.sh sanitize > "$R/sanitize_driver.log" 2>&1 ) & SZ=$!
IGN=(); grep -q "^rc 0" "$R/test_triton_early.log" && IGN=(--ignore=tests/test_triton.py)
LEFT=$(( LIMIT - ($(date +%s) - T0) )); el "test (${LEFT}s)"
timeout -s INT -k 15 "$LEFT" python3 -m pytest -q -ra -p no:cacheprovider -n "$PYTEST_WORKERS" --durations=40 \
    --junitxml="$R/pytest.xml" "${IGN[@]}" tests > "$R/test.log" 2>&1; echo "test rc $?" | tee -a "$R/test.log"
while kill -0 $SZ 2>/dev/null && [ $(( $(date +%s) - T0 )) -lt $(( LIMIT + 8 )) ]; do sleep 1; done
kill -0 $SZ 2>/dev/null && { el "sanitize still running: stopped"; pkill -f compute-sanitizer; sleep 1; }
el done
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$R/nvidia_smi_end.csv"
tar czf "$OUT/r1.tgz" -C "$OUT" r
cat "$R/timeline.txt"; tail -4 "$R/test.log"; cat "$R/summary.txt" 2>/dev/null; grep -E "^(--- |.*no errors|.*FAILED)" "$R/sanitize_driver.log"
grep -E "copy|fwd|bwd|gx" "$R/micro.log" | cut -c1-150 | head -70
grep -A20 "^|" "$R/bench.log" | head -30
