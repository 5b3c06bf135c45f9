"""The float32 / bfloat16 forward at B=32, C=192, 24x24, P=1, k=3 beside a copy of its tokens
(x.clone(): allocation and copy; out.copy_(x): copy into a kept tensor) and the eager PEG,
median of 200 calls (50 for eager). Run twice: as is, and with THP_MEM_ALLOC_ENABLE=1, which
makes torch's CPU allocator back allocations of 2 MB and more with transparent huge pages
(fewer TLB misses over the 14 MB tensors)."""
import os
import subprocess
import time

import torch

import cpvt_kernels as ck


def med(f, n=200):
    for _ in range(20):
        f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[n // 2] * 1e3


torch.manual_seed(0)
B, C, H = 32, 192, 24
cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
           if line.startswith("model name"))
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True).stdout.strip()
print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')} {cpu}, commit {commit}, "
      f"torch {torch.__version__}, threads {torch.get_num_threads()}")
for dt in (torch.float32, torch.bfloat16):
    x = torch.randn(B, 1 + H * H, C, dtype=dt)
    peg = ck.PEG(C).to(dt)
    w, b = peg.proj.weight.detach(), peg.proj.bias.detach()
    out = torch.empty_like(x)
    with torch.no_grad():
        print(f"{str(dt):15s} clone {med(lambda: x.clone()):.3f} ms  copy_ "
              f"{med(lambda: out.copy_(x)):.3f} ms  fused "
              f"{med(lambda: ck.fused_peg(x, w, b, (H, H), 1, backend='cpu')):.3f} ms  eager "
              f"{med(lambda: peg(x, H, H), 50):.3f} ms")
meminfo = open("/proc/meminfo").read()
print("AnonHugePages:", meminfo.split("AnonHugePages:")[1].split("\n")[0].strip())
