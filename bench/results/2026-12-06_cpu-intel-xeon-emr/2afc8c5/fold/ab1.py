"""A/B of a CPU kernel switch in one process, per thread count: the bfloat16 forward (C=192,
P=1, k=3) with the environment variable NAME set to each of VALUES, 15 alternating rounds,
reported as ns per 32 outputs (min and median over the rounds).

    python ab1.py THREADS NAME VALUE...
"""
import os as _os, sys as _sys
_sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "../../../.."))
import bench_peg as _bp  # noqa: E402
import torch as _torch  # noqa: E402
print("# " + ", ".join(f"{k} {v}" for k, v in _bp.run_metadata(_torch.device("cpu")).items()))
import torch, time, os, sys, cpvt_kernels as ck
torch.set_num_threads(int(sys.argv[1])); name=sys.argv[2]; vals=sys.argv[3:]
dtype=torch.bfloat16
for B,H in ((8,24),(32,24),(32,14)):
  C=192
  x=torch.randn(B,1+H*H,C,dtype=dtype); w=torch.randn(C,1,3,3,dtype=dtype); b=torch.randn(C,dtype=dtype)
  best={v:[] for v in vals}
  for r in range(15):
    for v in vals:
      os.environ[name]=v
      for _ in range(3): ck.fused_peg(x,w,b,(H,H),1,backend='cpu')
      n=max(20,400//B); t=time.perf_counter()
      for _ in range(n): ck.fused_peg(x,w,b,(H,H),1,backend='cpu')
      best[v].append((time.perf_counter()-t)/n)
  per=lambda m: m/(B*H*H*C/32)*1e9
  print(f"B={B} {H}x{H} threads {sys.argv[1]}: " + "  ".join(f"{name}={v}: min {per(min(best[v])):.3f} ns/32, median {per(sorted(best[v])[7]):.3f}" for v in vals))
