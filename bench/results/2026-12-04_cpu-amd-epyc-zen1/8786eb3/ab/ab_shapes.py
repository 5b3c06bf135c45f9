# times torch.ops.cpvt.peg_forward / peg_backward of the cpvt_kernels under argv[1]
import sys, os, time, statistics
sys.path.insert(0, sys.argv[1])
import torch, cpvt_kernels
assert cpvt_kernels.__file__.startswith(sys.argv[1]), cpvt_kernels.__file__
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
torch.manual_seed(0)
out = []
for dt in (torch.float32,):
    for Bq, H in ((8, 24), (96, 14), (32, 32), (8, 32)):
        x = torch.randn(Bq, 1 + H * H, 192, dtype=dt); w = torch.randn(192, 1, 3, 3, dtype=dt); b = torch.randn(192, dtype=dt)
        go = torch.randn_like(x)
        f = lambda: torch.ops.cpvt.peg_forward(x, w, b, H, H, 1)
        g = lambda: torch.ops.cpvt.peg_backward(go, x, w, H, H, 1, [True, True, True])
        for name, fn in (("fwd", f),):
            for _ in range(5): fn()
            s = []
            t_end = time.perf_counter() + float(os.environ.get("SECS", "0.25"))
            while time.perf_counter() < t_end or len(s) < 20:
                t = time.perf_counter(); fn(); s.append(time.perf_counter() - t)
            out.append(f"{name}-{str(dt)[6:]}-B{Bq}-{H}={min(s)*1e3:.3f}")
        ref = f().double().sum().item()
        out.append(f"sum={ref:.6e}")
print(os.path.basename(sys.argv[1].rstrip('/')), " ".join(out), flush=True)
