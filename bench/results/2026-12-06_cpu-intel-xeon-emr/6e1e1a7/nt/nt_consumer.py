"""The forward with its output streamed past the cache (CPVT_CPU_STREAM_BYTES=0) or cached (a
threshold no output reaches), alone and followed by a read of its output (out.sum(-1), as the
next layer would read it), alternating round by round in one process.

    python nt_consumer.py [--rounds 8] [--reps 30]
"""
import argparse, os, statistics, sys, time
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "../../../.."))  # bench/
import bench_peg  # noqa: E402
import cpvt_kernels  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=8)
ap.add_argument("--reps", type=int, default=30)
a = ap.parse_args()
bench_peg.keep_freed_memory()
torch.set_num_threads(2)
torch.manual_seed(0)
print("# " + ", ".join(f"{k} {v}" for k, v in bench_peg.run_metadata(torch.device("cpu")).items()))
print(f"# B=32, C=192, P=1, k=3; median of {a.rounds} round medians of {a.reps} calls")
SETTINGS = {"cached": str(1 << 50), "streamed": "0"}
for dtype in (torch.float32, torch.bfloat16):
    for H in (14, 24):
        C = 192
        x = torch.randn(32, 1 + H * H, C, dtype=dtype)
        w = torch.randn(C, 1, 3, 3, dtype=dtype)
        b = torch.randn(C, dtype=dtype)

        def op():
            return cpvt_kernels.fused_peg(x, w, b, (H, H), num_prefix_tokens=1, backend="cpu")

        def op_read():
            return op().sum(-1)

        res = {}
        with torch.no_grad():
            for _ in range(a.rounds):
                for name, value in SETTINGS.items():
                    os.environ["CPVT_CPU_STREAM_BYTES"] = value
                    for label, f in (("op", op), ("op+read", op_read)):
                        for _ in range(3):
                            f()
                        s = []
                        for _ in range(a.reps):
                            t = time.perf_counter()
                            f()
                            s.append(time.perf_counter() - t)
                        res.setdefault((name, label), []).append(statistics.median(s) * 1e3)
        med = {k: statistics.median(v) for k, v in res.items()}
        print(f"{str(dtype)[6:]:>8} 32x{H}x{H}: " + "  ".join(
            f"{lab} cached {med[('cached', lab)]:.3f} ms, streamed {med[('streamed', lab)]:.3f} ms"
            f" (x{med[('cached', lab)] / med[('streamed', lab)]:.2f})" for lab in ("op", "op+read")))
