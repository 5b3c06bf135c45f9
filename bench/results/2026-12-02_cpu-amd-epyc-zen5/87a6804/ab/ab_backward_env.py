import os, sys, time, torch, statistics
import cpvt_kernels, sys; sys.path.insert(0, __import__("os").path.dirname(__file__)); import keep
torch.set_num_threads(int(os.environ.get("T","2")))
var=sys.argv[1]; vals=sys.argv[2].split(","); dt=getattr(torch, sys.argv[3]); Hs=[int(h) for h in sys.argv[4].split(",")]
k=int(os.environ.get("K","3")); B=int(os.environ.get("B","32")); C=192
for H in Hs:
  x=torch.randn(B,1+H*H,C,dtype=dt); w=torch.randn(C,1,k,k,dtype=dt); g=torch.randn(B,1+H*H,C,dtype=dt)
  f=lambda: torch.ops.cpvt.peg_backward(g,x,w,H,H,1,[True,True,True])
  ts={v:[] for v in vals}
  for r in range(10):
    for v in vals:
      os.environ[var]=v
      for _ in range(3): f()
      s=[]
      for _ in range(20):
        t=time.perf_counter(); f(); s.append(time.perf_counter()-t)
      ts[v].append(statistics.median(s))
  print(f"bwd H={H} k={k} {sys.argv[3]}: "+"  ".join(f"{var}={v}: med {statistics.median(ts[v])*1e3:.3f} min {min(ts[v])*1e3:.3f}" for v in vals))
