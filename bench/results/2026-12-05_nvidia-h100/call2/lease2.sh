#!/usr/bin/env bash
# Second lease call: build, the bad-input crash alone, micro, benchmark alone, then the test suite,
# the streaming test run, selfcheck and the sanitizer side by side.
set -u
export PYTHONUNBUFFERED=1 PYTHON=python3 MAX_JOBS=16 CPVT_BUILD_CPU=0
LIMIT=${LIMIT:-430}
R=$OUT/r; mkdir -p "$R"; export CPVT_RESULTS_DIR=$R
T0=$(date +%s); el() { echo "[t+$(( $(date +%s) - T0 ))s] $*" | tee -a "$R/timeline.txt"; }
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv > "$R/nvidia_smi_start.csv"
( NVCC=$(command -v nvcc) ARCH=90 PYTHON=python3 bash bench/cuda_micro/build.sh > "$R/micro_build.log" 2>&1 ) & MB=$!
el build; bash bench/gpu_suite.sh build > /dev/null; tail -2 "$R/build.log"
el diag; timeout 60 python3 -X faulthandler .gpu/diag_bad_inputs.py > "$R/diag.log" 2>&1; rc=$?; echo "diag rc $rc" >> "$R/diag.log"
if [ $rc -ne 0 ]; then
  CG=$(command -v cuda-gdb || ls /usr/local/cuda*/bin/cuda-gdb 2>/dev/null | head -1)
  timeout 120 "$CG" -batch -ex run -ex bt -ex "info sharedlibrary" --args python3 .gpu/diag_bad_inputs.py > "$R/diag_gdb.log" 2>&1
  grep -E "^#[0-9]+|signal|case" "$R/diag_gdb.log" | head -40
fi
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py::test_bad_inputs_raise > "$R/diag_pytest.log" 2>&1; echo "pytest alone rc $?" >> "$R/diag_pytest.log"
wait $MB; el micro; timeout 60 bench/cuda_micro/peg_micro 20 > "$R/micro.log" 2>&1; echo "micro rc $?" >> "$R/micro.log"
el bench; timeout 150 python3 bench/bench_peg.py --device cuda --out "$R" --dtypes bfloat16 \
    --shapes 128x192x14 128x384x14 128x768x14 64x384x24 32x768x32 --passes fwd,fwdbwd --no-plot \
    > "$R/bench.log" 2>&1; echo "bench rc $?" >> "$R/bench.log"
el "parallel phase ($(left)s)"
( SANITIZE_TOOLS="memcheck racecheck" SANITIZE_BACKENDS=cuda SANITIZE_TIMEOUT=150 bash bench/gpu_suite.sh sanitize > "$R/sanitize_driver.log" 2>&1 ) & SZ=$!
( timeout 150 python3 -m cpvt_kernels.selfcheck --device cuda > "$R/selfcheck.log" 2>&1; echo "selfcheck rc $?" >> "$R/selfcheck.log" ) & SC=$!
( CPVT_CUDA_KERNELS=stream timeout -s INT -k 10 $(( $(left) - 15 )) python3 -m pytest -q -ra -p no:cacheprovider -n 4 \
    --junitxml="$R/pytest_stream.xml" tests/test_cuda.py > "$R/test_stream.log" 2>&1; echo "test-stream rc $?" >> "$R/test_stream.log" ) & TS=$!
timeout -s INT -k 10 $(( $(left) - 15 )) python3 -m pytest -q -ra -p no:cacheprovider -n 10 --durations=30 \
    --junitxml="$R/pytest.xml" tests > "$R/test.log" 2>&1; echo "test rc $?" >> "$R/test.log"
el "test done"
for p in $TS $SC $SZ; do while kill -0 $p 2>/dev/null && [ "$(left)" -gt -5 ]; do sleep 1; done; done
pkill -f compute-sanitizer 2>/dev/null; pkill -f pytest 2>/dev/null
el done
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$R/nvidia_smi_end.csv"
tar czf "$OUT/r2.tgz" -C "$OUT" r
cat "$R/timeline.txt"; cat "$R/diag.log"; tail -2 "$R/diag_pytest.log"
tail -3 "$R/test.log"; tail -2 "$R/test_stream.log"; tail -2 "$R/selfcheck.log"
grep -E "no errors|FAILED" "$R/sanitize_driver.log"
grep -E "^(fwd|bwd|gx|copy)" "$R/micro.log" | grep -E "tile|sl1|copy" | cut -c1-120
sed -n '/^| impl/,/^$/p' "$R/bench.log"
