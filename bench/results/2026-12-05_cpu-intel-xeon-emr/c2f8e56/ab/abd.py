# python abd.py: median ms of peg_forward (fp32, bf16; 14x14, 24x24; B=32, C=192) of the package first on sys.path
import torch, time, os, statistics
import cpvt_kernels
torch.set_num_threads(2)
torch.manual_seed(0); out = []
if os.environ.get("HEADER"):  # once per series: the versions and the CPU
    import platform; print(f"# torch {torch.__version__}, python {platform.python_version()}, {platform.processor() or platform.machine()}")
for dt in (torch.float32, torch.bfloat16):
    for H in (14, 24):
        x = torch.randn(32, 1 + H * H, 192, dtype=dt); w = torch.randn(192, 1, 3, 3, dtype=dt); b = torch.randn(192, dtype=dt)
        f = lambda: torch.ops.cpvt.peg_forward(x, w, b, H, H, 1)
        for _ in range(20): f()
        s = []
        for _ in range(300):
            t = time.perf_counter(); f(); s.append(time.perf_counter() - t)
        out.append(f"{str(dt)[6:]}/{H}:{statistics.median(s)*1e3:.4f}")
print(" ".join(out))
