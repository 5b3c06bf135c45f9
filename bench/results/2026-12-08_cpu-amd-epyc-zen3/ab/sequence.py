# Times of the cpu op's forward (F) and full backward (Bk) when run alone in a loop, after one
# another, and after copies that evict the caches to different depths (B=32, C=192, 14x14,
# float32, 2 threads; medians of 200 pairs). A copy of the same bytes in the same sequence for
# comparison (Cp: out.copy_(x), Ad: torch.add(g, x, out=...)).
import os, sys, time, statistics, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import bench_peg as bp, cpvt_kernels as ck
bp.keep_freed_memory()
torch.set_num_threads(2)
B, C, H, W, P, k = 32, 192, 14, 14, 1, 3
x = torch.randn(B, P + H * W, C); w = torch.randn(C, 1, k, k) * .1; b = torch.randn(C)
g = torch.randn_like(x)
fw = torch.ops.cpvt.peg_forward.default; bw = torch.ops.cpvt.peg_backward.default
o1 = torch.empty_like(x); o2 = torch.empty_like(x)
F = lambda: fw(x, w, b, H, W, P)
Bk = lambda: bw(g, x, w, H, W, P, [True, True, True])
Cp = lambda: o1.copy_(x)
Ad = lambda: torch.add(g, x, out=o2)
def seq(name, a, bb, n=200):
    ta, tb = [], []
    for i in range(n + 10):
        t0 = time.perf_counter(); a(); t1 = time.perf_counter(); bb(); t2 = time.perf_counter()
        if i >= 10: ta.append(t1 - t0); tb.append(t2 - t1)
    print(f"{name:14s} first {statistics.median(ta) * 1e3:.3f} ms  second {statistics.median(tb) * 1e3:.3f} ms", flush=True)
seq("F,F", F, F); seq("Bk,Bk", Bk, Bk); seq("F,Bk", F, Bk); seq("Cp,Ad", Cp, Ad); seq("F,Cp", F, Cp)
for mb in [1, 4, 8, 16, 32]:
    a = torch.randn(mb * 2**18); c = torch.empty_like(a)
    seq(f"F,evict{mb}MB", F, lambda: c.copy_(a)); seq(f"Bk,evict{mb}MB", Bk, lambda: c.copy_(a))
