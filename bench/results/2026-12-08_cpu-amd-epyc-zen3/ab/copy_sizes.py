# dst.copy_(src) by size (read + written GB/s): where the L3 stops holding both.
import time, torch, statistics
for mb in [1,2,4,6,8,12,16,24,32,64]:
    n=mb*2**20//4; a=torch.randn(n); b=torch.empty(n)
    for _ in range(5): b.copy_(a)
    s=[]
    for _ in range(max(10,400//mb)):
        t0=time.perf_counter(); b.copy_(a); s.append(time.perf_counter()-t0)
    m=statistics.median(s); print(f"{mb:3d} MB copy: {2*mb*2**20/m/1e9:6.1f} GB/s  ({m*1e3:.3f} ms)")
