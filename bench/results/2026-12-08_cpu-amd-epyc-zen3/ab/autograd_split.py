# The forward and the backward of one forward+backward, timed apart: through autograd (as the
# benchmark's fwdbwd) and as the two ops called directly (python autograd_split.py HW).
import os, sys, time, statistics, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import bench_peg as bp, cpvt_kernels as ck
bp.keep_freed_memory()
B,C,H,W,P,k=32,192,int(sys.argv[1]),int(sys.argv[1]),1,3
dt=torch.float32
x=torch.randn(B,P+H*W,C,dtype=dt); w=torch.randn(C,1,k,k,dtype=dt)*.1; b=torch.randn(C,dtype=dt); g=torch.randn_like(x)
xg=x.clone().requires_grad_(); wg=w.clone().requires_grad_(); bg=b.clone().requires_grad_()
fw=torch.ops.cpvt.peg_forward.default; bw=torch.ops.cpvt.peg_backward.default
res={}
def rec(n,v): res.setdefault(n,[]).append(v)
def fb():
    t0=time.perf_counter(); out=fw(xg,wg,bg,H,W,P); t1=time.perf_counter()
    torch.autograd.grad(out,(xg,wg,bg),g); t2=time.perf_counter()
    rec("ag fwd",t1-t0); rec("ag bwd",t2-t1); rec("ag total",t2-t0)
def raw():
    t0=time.perf_counter(); out=fw(x,w,b,H,W,P); t1=time.perf_counter()
    r=bw(g,x,w,H,W,P,[True,True,True]); t2=time.perf_counter()
    rec("raw fwd",t1-t0); rec("raw bwd",t2-t1); rec("raw total",t2-t0)
for _ in range(10): fb(); raw()
res.clear()
for r in range(10):
    for _ in range(30): fb()
    for _ in range(30): raw()
for n,v in res.items():
    v.sort(); print(f"{n:10s} med {statistics.median(v)*1e3:.3f} p20 {v[len(v)//5]*1e3:.3f}")
