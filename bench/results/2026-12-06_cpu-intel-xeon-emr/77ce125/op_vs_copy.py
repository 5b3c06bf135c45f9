"""The cpu backend's forward at 24x24 (B=32, C=192, P=1, k=3) beside a copy of its tokens
(`copy_` into a preallocated tensor, and `clone()`) and the eager PEG: 7 rounds alternating
between them, each the median of 30 calls after 3 warm-up calls, 2 threads, freed memory kept
as bench_peg.py keeps it. Prints the medians over the rounds (ms) and the ratios.

    python op_vs_copy.py
"""
import time, torch, cpvt_kernels as ck, statistics, ctypes
libc = ctypes.CDLL("libc.so.6"); libc.mallopt(-3, 32 << 20); libc.mallopt(-1, 2**31 - 1)
torch.set_num_threads(2)
import platform, subprocess
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
           platform.processor())
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=__file__.rsplit("/", 1)[0] or ".").stdout.strip()
print(f"# {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
      f"python {platform.python_version()}, cpvt_kernels {ck.__version__}, commit {commit}")
for dt in (torch.float32, torch.bfloat16):
    x = torch.randn(32, 577, 192).to(dt); w = torch.randn(192, 1, 3, 3).to(dt); b = torch.randn(192).to(dt)
    dst = torch.empty_like(x)
    peg = ck.PEG(192).to(dt)
    fns = {"op": lambda: torch.ops.cpvt.peg_forward(x, w, b, 24, 24, 1),
           "copy_": lambda: dst.copy_(x), "clone": lambda: x.clone(),
           "eager": lambda: peg(x, 24, 24)}
    res = {k: [] for k in fns}
    with torch.no_grad():
        for r in range(7):
            for k, f in fns.items():
                for _ in range(3): f()
                ts = []
                for _ in range(30):
                    t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
                res[k].append(statistics.median(ts) * 1e3)
    print(dt, {k: f"{statistics.median(v):.3f}" for k, v in res.items()},
          "eager/op %.2f eager/clone %.2f op/copy_ %.2f" % (statistics.median(res['eager'])/statistics.median(res['op']), statistics.median(res['eager'])/statistics.median(res['clone']), statistics.median(res['op'])/statistics.median(res['copy_'])))
