"""The open issues' goals against bench_peg.py's results: a table a run, a line a goal.

    python bench/goals.py bench/results/<run>/peg.csv [more/peg.csv ...] [--strict]

Each CSV is checked against the goals for its device type:

- CPU (issue #5; the cpu backend at B=32, C=192, P=1, 14x14 and 24x24, as `--quick` runs it):
  forward x eager >= 5 in float32 and in bfloat16 (k=3), forward+backward x eager >= 3 (both
  dtypes, k=3), forward x eager >= 1 at k=7 (both dtypes), forward >= 50% of the run's copy
  bandwidth (k=3, both dtypes). Shown beside them, not a goal: the forward's fraction of the
  speed of a copy of the same tokens (`x.clone()`, the run's `copy` rows), which stays in cache as
  the op's tokens do, where the bandwidth above is that of a 256 MiB copy.
- GPU (CPVT-S and CPVT-B at 224 px: B=128, C=384 and 768, H=W=14, P=1, k=3, bfloat16):
  #4, the cuda backend's forward >= 90% of the run's copy bandwidth and forward+backward >= 75%
  at both, and cuda at least as fast as triton on every row the run has of both; #3, the triton
  backend's forward >= 85% and forward+backward >= 70% at CPVT-S.

A value is the worst of its rows, a cell per shape; '*' marks a miss and '-' where the run lacks
a row of one of the goal's dtypes, or has it failed (a goal with a missing row is not met; so is
"cuda at least as fast as triton" where triton has a row that cuda lacks). The benchmark's
variants of a backend (`cuda-tile`, `cuda-stream`, `cuda-pipe`, `triton-stream`) are listed under
each of its goals as candidates, not counted: a variant that meets a goal the default misses is
one to make the default. Exit status 0, or with --strict 1 when a goal of any run is not met.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Goal:
    issue: str
    text: str
    impl: str
    pas: str
    dtypes: tuple
    shapes: tuple  # ((B, C, H), ...): a cell each
    k: int
    col: str  # "speedup_vs_eager", "frac_copy" or "frac_size_copy"
    least: float
    variants: tuple = field(default=())
    shown_only: bool = False  # printed beside the goals, not one

    def cell(self, value: float | None) -> str:
        if value is None:
            return "-"
        s = f"{value * 100:.0f}%" if self.col.startswith("frac") else f"{value:.2f}"
        return s + ("" if value >= self.least or self.shown_only else "*")

    def need(self) -> str:
        if self.shown_only:
            return "(shown)"
        return (f">= {self.least * 100:.0f}%" if self.col.startswith("frac")
                else f">= {self.least:g}")


CPU_SHAPES = ((32, 192, 14), (32, 192, 24))
GPU_SB = ((128, 384, 14), (128, 768, 14))
CUDA_VARIANTS = ("cuda-tile", "cuda-stream", "cuda-pipe")
TRITON_VARIANTS = ("triton-stream",)

GOALS = {
    "cpu": [
        Goal("#5", "forward float32, x eager", "cpu", "fwd", ("fp32",), CPU_SHAPES, 3,
             "speedup_vs_eager", 5.0),
        Goal("#5", "forward bfloat16, x eager", "cpu", "fwd", ("bf16",), CPU_SHAPES, 3,
             "speedup_vs_eager", 5.0),
        Goal("#5", "forward+backward, x eager", "cpu", "fwdbwd", ("fp32", "bf16"), CPU_SHAPES, 3,
             "speedup_vs_eager", 3.0),
        Goal("#5", "forward k=7, x eager", "cpu", "fwd", ("fp32", "bf16"), CPU_SHAPES, 7,
             "speedup_vs_eager", 1.0),
        Goal("#5", "forward, of copy bandwidth", "cpu", "fwd", ("fp32", "bf16"), CPU_SHAPES, 3,
             "frac_copy", 0.5),
        Goal("#5", "forward, of a copy of the same tokens", "cpu", "fwd", ("fp32", "bf16"),
             CPU_SHAPES, 3, "frac_size_copy", 0.0, shown_only=True),
    ],
    "cuda": [
        Goal("#4", "cuda forward, of copy bandwidth", "cuda", "fwd", ("bf16",), GPU_SB, 3,
             "frac_copy", 0.90, CUDA_VARIANTS),
        Goal("#4", "cuda forward+backward, of copy bandwidth", "cuda", "fwdbwd", ("bf16",),
             GPU_SB, 3, "frac_copy", 0.75, CUDA_VARIANTS),
        Goal("#3", "triton forward, of copy bandwidth", "triton", "fwd", ("bf16",), GPU_SB[:1],
             3, "frac_copy", 0.85, TRITON_VARIANTS),
        Goal("#3", "triton forward+backward, of copy bandwidth", "triton", "fwdbwd", ("bf16",),
             GPU_SB[:1], 3, "frac_copy", 0.70, TRITON_VARIANTS),
    ],
}


def shape_name(shape) -> str:
    b, c, h = shape
    return f"{b}x{c}x{h}"


def worst(rows, goal: Goal, impl: str, shape) -> float | None:
    """The lowest value of ``impl``'s rows at ``shape`` over the goal's dtypes; None unless every
    one of those dtypes has a row that ran (status ok) with a value."""
    b, c, h = shape
    vals = {}
    for r in rows:
        if (r["impl"] == impl and r["pass"] == goal.pas and r["dtype"] in goal.dtypes
                and int(r["B"]) == b and int(r["C"]) == c and int(r["H"]) == h
                and int(r["W"]) == h and int(r["P"]) == 1 and int(r["k"]) == goal.k
                and r.get("status", "ok") == "ok" and r.get(goal.col, "") != ""):
            vals.setdefault(r["dtype"], []).append(float(r[goal.col]))
    if set(vals) != set(goal.dtypes):
        return None
    return min(min(v) for v in vals.values())


def cuda_vs_triton(rows):
    """(worst triton / cuda time, its row's key, rows compared, triton's rows that cuda lacks or
    failed) over the rows run by both."""
    def key(r):
        return (r["pass"], r["dtype"], r["B"], r["C"], r["H"], r["W"], r["P"], r["k"])
    cuda = {key(r): float(r["median_ms"]) for r in rows
            if r["impl"] == "cuda" and r.get("status", "ok") == "ok"}
    triton = {key(r): float(r["median_ms"]) for r in rows
              if r["impl"] == "triton" and r.get("status", "ok") == "ok"}
    both = sorted(set(cuda) & set(triton))
    lacking = len(set(triton) - set(cuda))
    if not both:
        return None, None, 0, lacking
    ratio, at = min((triton[k] / cuda[k], k) for k in both)
    return ratio, at, len(both), lacking


def report(path: str, out=None) -> bool:
    """Prints the goals of the run in ``path`` to ``out`` (default: sys.stdout at the call);
    True when every one is met."""
    out = sys.stdout if out is None else out
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"goals: {path} has no rows")
    kind = rows[0]["device_type"]
    if kind not in GOALS:
        raise SystemExit(f"goals: {path}: no goals for device type {kind!r}")
    first = rows[0]
    print(f"## {path}\n", file=out)
    print(f"{first['device']}, commit {first['commit']}, {first['date']}\n", file=out)
    print("| issue | goal | shapes | need | value | met |", file=out)
    print("|---|---|---|--:|--:|---|", file=out)
    all_met = True
    for goal in GOALS[kind]:
        vals = [worst(rows, goal, goal.impl, s) for s in goal.shapes]
        met = all(v is not None and v >= goal.least for v in vals)
        if not goal.shown_only:
            all_met &= met
        shapes = " / ".join(shape_name(s) for s in goal.shapes)
        cells = " / ".join(goal.cell(v) for v in vals)
        verdict = "" if goal.shown_only else "yes" if met else "no"
        print(f"| {goal.issue} | {goal.text} | {shapes} | {goal.need()} | {cells} | "
              f"{verdict} |", file=out)
        for v in goal.variants:
            vv = [worst(rows, goal, v, s) for s in goal.shapes]
            if any(x is not None for x in vv):
                print(f"|  | candidate `{v}` |  |  | {' / '.join(goal.cell(x) for x in vv)} |  |",
                      file=out)
    if kind == "cuda":
        ratio, at, n, lacking = cuda_vs_triton(rows)
        met = ratio is not None and ratio >= 1.0 and not lacking
        all_met &= met
        cell = "-" if ratio is None else f"{ratio:.2f}" + ("" if ratio >= 1.0 else "*")
        where = "" if at is None else f" (worst: {at[0]} {at[1]} {at[2]}x{at[3]}x{at[4]}x{at[5]} " \
                                      f"P{at[6]} k{at[7]})"
        rows_text = f"{n} rows" + (f", {lacking} of triton's without cuda*" if lacking else "")
        print(f"| #4 | cuda at least as fast as triton, triton time / cuda time{where} | "
              f"{rows_text} | >= 1 | {cell} | {'yes' if met else 'no'} |", file=out)
    if kind == "cpu":
        threads = sorted({r.get("threads", "") for r in rows} - {""})
        if threads and threads != ["2"]:
            print(f"\nNote: rows run with {', '.join(threads)} threads; #5's goals are for the "
                  f"2-core machine's 2.", file=out)
    print(f"\n{'every goal met' if all_met else 'not every goal met'}\n", file=out)
    return all_met


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", nargs="+", help="peg.csv files written by bench/bench_peg.py")
    ap.add_argument("--strict", action="store_true",
                    help="exit with status 1 when a goal of any run is not met")
    args = ap.parse_args(argv)
    for p in args.csv:
        if not os.path.isfile(p):
            ap.error(f"no such file: {p}")
    met = [report(p) for p in args.csv]
    print(f"every goal met in {sum(met)} of {len(met)} runs")
    return 1 if args.strict and not all(met) else 0


if __name__ == "__main__":
    sys.exit(main())
