# Times torch.ops.cpvt.peg_forward (bfloat16, 1 thread unless T is set; ns per 32 outputs) of the cpvt_kernels
# package found first on PYTHONPATH, which must lie under argv[1]: run it alternately with
# PYTHONPATH=A and PYTHONPATH=B, two copies of the package with two builds of _C.
import torch, time, statistics, sys, os
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../2026-12-02_cpu-amd-epyc-zen5/87a6804/ab")); import keep
import cpvt_kernels
assert cpvt_kernels.__file__.startswith(sys.argv[1]), cpvt_kernels.__file__
torch.set_num_threads(int(os.environ.get("T","1")))
C=192; res=[]
for B,H in ((2,24),(4,14),(32,24)):
    x=torch.randn(B,1+H*H,C,dtype=torch.bfloat16); w=torch.randn(C,1,3,3,dtype=torch.bfloat16); b=torch.randn(C,dtype=torch.bfloat16)
    f=lambda: torch.ops.cpvt.peg_forward(x,w,b,H,H,1)
    for _ in range(10): f()
    s=[]
    for _ in range(200 if B<8 else 40):
        t=time.perf_counter(); f(); s.append(time.perf_counter()-t)
    res.append(f"B{B} {H}x{H} {statistics.median(s)/(B*H*H*C/32)*1e9:.2f}ns/blk")
print(sys.argv[1], " ".join(res))
