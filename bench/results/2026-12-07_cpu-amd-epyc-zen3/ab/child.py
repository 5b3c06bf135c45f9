import json, os, sys, time
import torch
import cpvt_kernels as ck
threads, passes = int(sys.argv[1]), sys.argv[2]
shapes = [tuple(s.split(":")) for s in sys.argv[3:]]  # B:C:HW:k:dtype
torch.set_num_threads(threads)
res = {}
for B, C, HW, k, dt in shapes:
    B, C, HW, k = int(B), int(C), int(HW), int(k)
    dtype = getattr(torch, dt)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 1 + HW * HW, C, generator=g).to(dtype)
    w = torch.randn(C, 1, k, k, generator=g).to(dtype)
    b = torch.randn(C, generator=g).to(dtype)
    if passes == "fwd":
        f = lambda: ck.fused_peg(x, w, b, size=(HW, HW), backend="cpu")
    else:
        xr = x.clone().requires_grad_(); wr = w.clone().requires_grad_(); br = b.clone().requires_grad_()
        go = torch.randn_like(x)
        def f():
            y = ck.fused_peg(xr, wr, br, size=(HW, HW), backend="cpu")
            y.backward(go)
    for _ in range(3): f()
    ts = []
    t_end = time.perf_counter() + 1.5
    while time.perf_counter() < t_end or len(ts) < 10:
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort()
    res[f"{B}x{C}x{HW} k{k} {dt}"] = (ts[0] * 1e3, ts[len(ts) // 2] * 1e3)
print(json.dumps(res))
