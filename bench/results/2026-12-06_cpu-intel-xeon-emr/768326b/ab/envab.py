"""A/B of a CPU kernel switch read at each call: the fused forward (or forward+backward) with the
environment variable NAME set to each of VALUES, alternating round by round in one process.

    python envab.py NAME VALUES [--rounds R] [--pass fwd|fwdbwd] [--shapes 32x14 32x24]

Prints per round the median ms of each value, then the medians of the round medians and B/A.
"""
import argparse, os, statistics, sys, time
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "../../../.."))  # bench/
import bench_peg  # noqa: E402
import cpvt_kernels  # noqa: E402,F401

ap = argparse.ArgumentParser()
ap.add_argument("name")
ap.add_argument("values", nargs="+")
ap.add_argument("--rounds", type=int, default=10)
ap.add_argument("--reps", type=int, default=40)
ap.add_argument("--pass", dest="pas", default="fwd", choices=["fwd", "fwdbwd"])
ap.add_argument("--shapes", nargs="+", default=["32x14", "32x24"])
ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
ap.add_argument("--k", type=int, default=3)
a = ap.parse_args()

bench_peg.keep_freed_memory()
torch.set_num_threads(2)
torch.manual_seed(0)
print("# " + ", ".join(f"{k} {v}" for k, v in bench_peg.run_metadata(torch.device("cpu")).items()))
print(f"# {a.name} in {a.values}, {a.pas}, k={a.k}, C=192, P=1, {a.rounds} rounds of {a.reps} calls")


def make(B, H, dtype):
    C = 192
    x = torch.randn(B, 1 + H * H, C, dtype=dtype, requires_grad=a.pas == "fwdbwd")
    w = torch.randn(C, 1, a.k, a.k, dtype=dtype, requires_grad=a.pas == "fwdbwd")
    b = torch.randn(C, dtype=dtype, requires_grad=a.pas == "fwdbwd")
    g = torch.randn(B, 1 + H * H, C, dtype=dtype)
    op = cpvt_kernels.fused_peg
    if a.pas == "fwd":
        def f():
            with torch.no_grad():
                op(x, w, b, (H, H), num_prefix_tokens=1, backend="cpu")
    else:
        def f():
            op(x, w, b, (H, H), num_prefix_tokens=1, backend="cpu").backward(g)
    return f


def round_ms(f):
    for _ in range(3):
        f()
    s = []
    for _ in range(a.reps):
        t = time.perf_counter()
        f()
        s.append(time.perf_counter() - t)
    return statistics.median(s) * 1e3


for dtype in a.dtypes:
    for shp in a.shapes:
        B, H = map(int, shp.split("x"))
        f = make(B, H, getattr(torch, dtype))
        res = {v: [] for v in a.values}
        for r in range(a.rounds):
            order = a.values[r % len(a.values):] + a.values[:r % len(a.values)]
            for v in order:
                os.environ[a.name] = v
                res[v].append(round_ms(f))
        med = {v: statistics.median(res[v]) for v in a.values}
        base = med[a.values[0]]
        line = "  ".join(f"{a.name}={v}: {med[v]:.4f} ms (x{base / med[v]:.3f}, min {min(res[v]):.4f})"
                         for v in a.values)
        print(f"{dtype:9s} B={B} {H}x{H}: {line}", flush=True)
