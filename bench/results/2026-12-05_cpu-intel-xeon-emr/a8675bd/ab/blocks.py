# One build of the op, one process: the median ms per call of the forward (torch.ops.cpvt.
# peg_forward, 5 rounds of 40 calls, median over rounds) and the sum of its output, for each shape
# given (BxH: C=192; or BxCxH), 2 threads, k=3, P=1. blocks.sh runs it alternately under two
# builds of the package (PYTHONPATH=<dir holding a cpvt_kernels copy>).
import os, statistics, sys, time, torch
import cpvt_kernels
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../..")); import bench_peg
bench_peg.keep_freed_memory()
torch.set_num_threads(2)
dt=getattr(torch,sys.argv[1]); shapes=[tuple(map(int,s.split('x'))) for s in sys.argv[2:]]
shapes=[(t[0],192,t[1]) if len(t)==2 else t for t in shapes]
def rms(f,w=5,r=40):
    for _ in range(w): f()
    s=[]
    for _ in range(r):
        t=time.perf_counter(); f(); s.append(time.perf_counter()-t)
    return statistics.median(s)*1e3
res=[]
torch.manual_seed(0)
for B,Cc,H in shapes:
    x=torch.randn(B,1+H*H,Cc,dtype=dt); w=torch.randn(Cc,1,3,3,dtype=dt); b=torch.randn(Cc,dtype=dt)
    with torch.no_grad():
        m=statistics.median([rms(lambda: torch.ops.cpvt.peg_forward(x,w,b,H,H,1)) for _ in range(5)])
        out=torch.ops.cpvt.peg_forward(x,w,b,H,H,1)
    res.append(f"{B}x{Cc}x{H}:{m:.4f}:{out.double().sum().item():.6e}")
print(" ".join(res))
