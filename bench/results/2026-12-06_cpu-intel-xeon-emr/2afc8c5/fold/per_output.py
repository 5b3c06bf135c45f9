"""The fused forward alone at 24x24 (C=192, P=1, k=3) for B = 1 .. 32, in ns per 32 outputs,
beside x.clone() of the same tokens: where the time per output stays flat as the data leaves
L2, the loop is bound by its arithmetic; where it follows the copy, by memory.

    python per_output.py THREADS
"""
import os as _os, sys as _sys
_sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "../../../.."))
import bench_peg as _bp  # noqa: E402
import torch as _torch  # noqa: E402
print("# " + ", ".join(f"{k} {v}" for k, v in _bp.run_metadata(_torch.device("cpu")).items()))
import torch, time, statistics, cpvt_kernels as ck, sys
torch.set_num_threads(int(sys.argv[1]))
for dtype in (torch.bfloat16, torch.float32):
  for B in (1, 2, 4, 8, 32):
    H=24; C=192
    x=torch.randn(B,1+H*H,C,dtype=dtype); w=torch.randn(C,1,3,3,dtype=dtype); b=torch.randn(C,dtype=dtype)
    for _ in range(20): ck.fused_peg(x,w,b,(H,H),1,backend='cpu')
    res=[]
    for r in range(7):
      n=max(20, 400//B); t=time.perf_counter()
      for _ in range(n): ck.fused_peg(x,w,b,(H,H),1,backend='cpu')
      res.append((time.perf_counter()-t)/n)
    m=min(res); per32=m/(B*H*H*C/32)*1e9
    c=[]
    for r in range(7):
      t=time.perf_counter()
      for _ in range(n): x.clone()
      c.append((time.perf_counter()-t)/n)
    print(f"{str(dtype):15s} B={B:2d} op {m*1e3:.4f} ms  {per32:.2f} ns/32 outputs  clone {min(c)*1e3:.4f} ms  op/clone {m/min(c):.2f}")
