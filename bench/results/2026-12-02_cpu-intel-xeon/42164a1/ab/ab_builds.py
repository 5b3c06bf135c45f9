# Times torch.ops.cpvt.peg_forward (dtype argv[2], B=32, C=192, 2 threads) of the cpvt_kernels
# package found first on PYTHONPATH, which must lie under argv[1]: run it alternately with
# PYTHONPATH=A and PYTHONPATH=B, two copies of the package with two builds of _C.
import torch, time, statistics, sys, os
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../2026-12-02_cpu-amd-epyc-zen5/87a6804/ab")); import keep
import cpvt_kernels
assert cpvt_kernels.__file__.startswith(sys.argv[1]), cpvt_kernels.__file__
torch.set_num_threads(2)
dt=getattr(torch, sys.argv[2]); k=int(os.environ.get("K","3")); C=int(os.environ.get("C","192"))
torch.manual_seed(0)
res=[]
for H in (14,24):
    x=torch.randn(32,1+H*H,C,dtype=dt); w=torch.randn(C,1,k,k,dtype=dt); b=torch.randn(C,dtype=dt)
    f=lambda: torch.ops.cpvt.peg_forward(x,w,b,H,H,1)
    for _ in range(10): f()
    s=[]
    for _ in range(60):
        t=time.perf_counter(); f(); s.append(time.perf_counter()-t)
    res.append(f"{H}x{H} {statistics.median(s)*1e3:.4f}")
    out=f(); res.append(f"sum={out.double().sum().item():.6e}")
print(sys.argv[1], sys.argv[2], "k", k, " ".join(res))
