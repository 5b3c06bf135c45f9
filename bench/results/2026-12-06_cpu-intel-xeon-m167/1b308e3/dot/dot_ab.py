# The bfloat16 forward with CPVT_CPU_BF16_DOT off and on, alternating in one process, beside
# the eager PEG (B=32, C=192, P=1, k=3). Run from the repository root.
import os, sys, time, statistics, torch, cpvt_kernels as ck
sys.path.insert(0, "bench")
from bench_peg import run_metadata  # noqa: E402
meta = run_metadata(torch.device("cpu"))
print(", ".join(f"{k} {meta[k]}" for k in ("date", "device", "threads", "torch", "python",
                                          "commit")))
torch.manual_seed(0)
res = {}
for H in (14, 24):
    x = torch.randn(32, 1 + H * H, 192).bfloat16(); w = torch.randn(192, 1, 3, 3).bfloat16(); b = torch.randn(192).bfloat16()
    peg = ck.PEG(192).bfloat16()
    with torch.no_grad():
        ref = ck.fused_peg(x, w, b, (H, H), 1, backend="cpu")
        for mode in ("0", "1", "0", "1", "0", "1", "0", "1"):
            os.environ["CPVT_CPU_BF16_DOT"] = mode
            y = ck.fused_peg(x, w, b, (H, H), 1, backend="cpu")
            ts = []
            for _ in range(200):
                t0 = time.perf_counter(); ck.fused_peg(x, w, b, (H, H), 1, backend="cpu"); ts.append(time.perf_counter() - t0)
            res.setdefault((H, mode), []).append(statistics.median(ts) * 1e3)
            ts = []
            for _ in range(50):
                t0 = time.perf_counter(); peg(x, H, H); ts.append(time.perf_counter() - t0)
            res.setdefault((H, "eager"), []).append(statistics.median(ts) * 1e3)
for k, v in sorted(res.items(), key=str):
    print(k, " ".join(f"{t:.3f}" for t in v), "median", f"{statistics.median(v):.3f}")
