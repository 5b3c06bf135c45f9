#!/usr/bin/env python
"""Plots of bench_peg.py results: achieved GB/s per shape and implementation, one panel per
pass and dtype, with the measured copy bandwidth drawn as a dashed line.

    python bench/plot.py bench/results/<run>/peg.csv        # writes peg.png beside the CSV

bench_peg.py calls ``plot_peg`` itself; this entry point redraws a plot from a saved CSV.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path


def plot_peg(rows: list[dict], path: Path) -> Path | None:
    """Draw ``rows`` (bench_peg.py's CSV rows) to ``path``; None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rows if r.get("gbps") not in ("", None)]
    if not rows:
        return None
    passes = list(dict.fromkeys(r["pass"] for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))

    def shape(r):
        hw = r["H"] if r["H"] == r["W"] else f"{r['H']}x{r['W']}"
        return f"{r['B']}x{r['C']}x{hw} P{r['P']} k{r['k']}"

    shapes = list(dict.fromkeys(shape(r) for r in rows))
    width = max(6.0, 0.45 * len(shapes) * max(1, len(impls)) / 2 + 2)
    fig, axes = plt.subplots(len(passes), len(dtypes), figsize=(width * len(dtypes) / 1.5,
                                                                3.2 * len(passes) + 1.0),
                             squeeze=False, sharey="row")
    bar = 0.8 / len(impls)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, p in enumerate(passes):
        for j, dt in enumerate(dtypes):
            ax = axes[i][j]
            sel = [r for r in rows if r["pass"] == p and r["dtype"] == dt]
            for n, impl in enumerate(impls):
                vals = {shape(r): float(r["gbps"]) for r in sel if r["impl"] == impl}
                xs = [s + (n - (len(impls) - 1) / 2) * bar for s in range(len(shapes))]
                ax.bar(xs, [vals.get(s, 0.0) for s in shapes], bar, label=impl,
                       color=colors[n % len(colors)])
            copy_gbps = {float(r["copy_gbps"]) for r in sel if r.get("copy_gbps")}
            for c in copy_gbps:
                ax.axhline(c, color="black", linestyle="--", linewidth=1)
            ax.set_title(f"{p} {dt}", fontsize=10)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=60, ha="right", fontsize=7)
            if j == 0:
                ax.set_ylabel("GB/s (dashed: copy)")
            ax.grid(axis="y", alpha=0.3)
    first = rows[0]
    fig.suptitle(f"Fused PEG: {first.get('device', '')}, torch {first.get('torch', '')}, "
                 f"commit {first.get('commit', '')}", fontsize=11)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.9, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: python bench/plot.py PATH/peg.csv   (writes PATH/peg.png beside it)"
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) != 1:
        print(usage, file=sys.stderr)
        return 2
    src = Path(argv[0])
    try:
        with open(src, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        print(f"plot: cannot read {src}: {e.strerror}", file=sys.stderr)
        return 2
    out = plot_peg(rows, src.with_suffix(".png"))
    if out is None:
        print("nothing plotted: matplotlib is not installed (`pip install matplotlib`) or the "
              "CSV has no timed rows", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
