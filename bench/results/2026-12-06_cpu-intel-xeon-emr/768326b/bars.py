"""The bars of issue #5 against bench_peg.py's CSVs: one line per run, one column per bar.

    python bars.py run*/peg.csv

Bars (cpu backend, B=32, C=192, P=1, at 14x14 and 24x24): forward x eager >= 5 (float32 and
bfloat16, k=3), forward+backward x eager >= 3 (both dtypes, k=3), forward x eager >= 1 at k=7,
forward >= 50% of the run's copy bandwidth (k=3). A cell shows the worst value of
its rows; '*' marks a miss.
"""
import csv
import sys

BARS = [
    # (name, pass, dtypes, k, column, least)
    ("fwd fp32 k3 x eager", "fwd", ("fp32",), "3", "speedup_vs_eager", 5.0),
    ("fwd bf16 k3 x eager", "fwd", ("bf16",), "3", "speedup_vs_eager", 5.0),
    ("fwdbwd k3 x eager", "fwdbwd", ("fp32", "bf16"), "3", "speedup_vs_eager", 3.0),
    ("fwd k7 x eager", "fwd", ("fp32", "bf16"), "7", "speedup_vs_eager", 1.0),
    ("fwd k3 % copy", "fwd", ("fp32", "bf16"), "3", "frac_copy", 0.5),
]


def main(paths):
    meta = set()
    for path in paths:
        for r in csv.DictReader(open(path)):
            meta.add(f"{r['device']}, {r['threads']} threads, torch {r['torch']}, "
                     f"python {r['python']}")
    for m in sorted(meta):
        print(f"# {m}")
    head = ["run", "commit"] + [f"{b[0]} 14 / 24" for b in BARS] + ["all met"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    met_runs = 0
    for path in paths:
        rows = [r for r in csv.DictReader(open(path))
                if r["impl"] == "cpu" and r["B"] == "32" and r["C"] == "192" and r["P"] == "1"]
        cells, ok_all = [], True
        for name, pas, dtypes, k, col, least in BARS:
            parts = []
            for hw in ("14", "24"):
                sel = [r for r in rows if r["pass"] == pas and r["dtype"] in dtypes
                       and r["H"] == hw and r["k"] == k]
                if not sel:
                    parts.append("-")
                    ok_all = False
                    continue
                worst = min(float(r[col]) for r in sel)
                ok = worst >= least
                ok_all &= ok
                parts.append(f"{worst * 100:.0f}%" if col == "frac_copy" else f"{worst:.2f}")
                parts[-1] += "" if ok else "*"
            cells.append(" / ".join(parts))
        met_runs += ok_all
        commit = rows[0]["commit"] if rows else "?"
        print(f"| {path} | {commit} | " + " | ".join(cells) + f" | {'yes' if ok_all else 'no'} |")
    print(f"\nall bars met in {met_runs} of {len(paths)} runs")


if __name__ == "__main__":
    main(sys.argv[1:])
