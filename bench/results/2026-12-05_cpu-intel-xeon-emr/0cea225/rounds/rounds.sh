#!/usr/bin/env bash
# --rounds 5 (the default) against --rounds 1, alternating runs of the fused cpu forward and the
# eager PEG at B=32, C=192, 14x14 and 24x24, float32 and bfloat16: the speedups' medians and ranges.
# Usage: bash rounds.sh [pairs] [out dir]   (from the repository root)
set -euo pipefail
pairs=${1:-6}
out=${2:-/tmp/rounds_ab}
rm -rf "$out" && mkdir -p "$out"
echo "# commit $(git rev-parse --short HEAD); $(python -c 'import platform, torch; print(f"torch {torch.__version__}, python {platform.python_version()}, {torch.get_num_threads()} threads")'); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for i in $(seq "$pairs"); do
  for r in 5 1; do
    python bench/bench_peg.py --shapes 32x192x14 32x192x24 --passes fwd --impls eager cpu \
      --dtypes float32 bfloat16 --rounds "$r" --no-plot --out "$out/r$r-$i" > /dev/null 2>&1
  done
done
python - "$out" <<'PY'
import collections, csv, glob, statistics, sys
res = collections.defaultdict(lambda: collections.defaultdict(list))
for f in sorted(glob.glob(f"{sys.argv[1]}/*/peg.csv")):
    mode = f.split("/")[-2].split("-")[0]
    for row in csv.DictReader(open(f)):
        key = (row["dtype"], row["H"])
        res[key][(mode, row["impl"])].append(float(row["median_ms"]))
        if row["impl"] == "cpu":
            res[key][(mode, "x")].append(float(row["speedup_vs_eager"]))
for key in sorted(res):
    for m in ("r5", "r1"):
        x, e, c = res[key][(m, "x")], res[key][(m, "eager")], res[key][(m, "cpu")]
        print(f"{key[0]} {key[1]}x{key[1]} rounds {m[1:]}: x eager " + " ".join(f"{v:.2f}" for v in x)
              + f"  median {statistics.median(x):.2f} range {max(x) - min(x):.2f}"
              + f"  | median ms eager {statistics.median(e):.3f} cpu {statistics.median(c):.3f}")
PY
