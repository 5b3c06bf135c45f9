import os, sys, time, torch, statistics
import cpvt_kernels, sys; sys.path.insert(0, __import__("os").path.dirname(__file__)); import keep
torch.set_num_threads(2)
var=sys.argv[1]; vals=sys.argv[2].split(","); dt=getattr(torch, sys.argv[3]); Hs=[int(h) for h in sys.argv[4].split(",")]
k=int(os.environ.get("K","3")); B=int(os.environ.get("B","32")); C=192
for H in Hs:
  x=torch.randn(B,1+H*H,C,dtype=dt); w=torch.randn(C,1,k,k,dtype=dt); b=torch.randn(C,dtype=dt)
  f=lambda: torch.ops.cpvt.peg_forward(x,w,b,H,H,1)
  ts={v:[] for v in vals}
  ref=None
  for r in range(15):
    for v in vals:
      os.environ[var]=v
      out=f()
      if ref is None: ref=out
      assert torch.equal(out,ref) or dt==torch.bfloat16 and torch.allclose(out.float(),ref.float(),atol=0.05,rtol=0.02), v
      for _ in range(5): f()
      s=[]
      for _ in range(40):
        t=time.perf_counter(); f(); s.append(time.perf_counter()-t)
      ts[v].append(statistics.median(s))
  print(f"H={H} k={k} {sys.argv[3]}: "+"  ".join(f"{var}={v}: med {statistics.median(ts[v])*1e3:.3f} min {min(ts[v])*1e3:.3f}" for v in vals))
