#!/bin/bash
# usage: VARIANTS="O T" blocks.sh ROUNDS DTYPE SHAPES...: rounds of blocks.py, alternating between
# builds /tmp/ab<v>/cpvt_kernels; then per shape the median and fastest of the round medians,
# the speedup over the first variant, and whether the output sums agree.
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
R=$1; DT=$2; shift 2
for i in $(seq $R); do for v in $VARIANTS; do echo "$v $(PYTHONPATH=/tmp/ab$v $PY $HERE/blocks.py $DT "$@")"; done; done > /tmp/ab_out.txt
python3 - <<'P'
import statistics, collections
d=collections.defaultdict(lambda: collections.defaultdict(list)); sums=collections.defaultdict(set)
for line in open('/tmp/ab_out.txt'):
    v,*rest=line.split()
    for r in rest:
        s,t,c=r.split(':'); d[s][v].append(float(t)); sums[s].add(c)
for s in d:
    vs=list(d[s]); base=statistics.median(d[s][vs[0]])
    print(s, "  ".join(f"{v} {statistics.median(d[s][v]):.4f} (min {min(d[s][v]):.4f}) x{base/statistics.median(d[s][v]):.3f}" for v in vs), "same-sums" if len(sums[s])==1 else "SUMS DIFFER")
P
