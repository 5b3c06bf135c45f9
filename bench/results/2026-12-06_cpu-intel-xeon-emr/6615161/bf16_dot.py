"""The cpu backend's bfloat16 forward at B=32, C=192, 24x24, P=1, k=3 against the eager PEG, with the
dot-product loop (CPVT_CPU_BF16_DOT=1) or the default even/odd one (0): median of 60 calls, three
rounds in one process. Run once per setting: CPVT_CPU_BF16_DOT=0 python bf16_dot.py"""
import os, time, torch, cpvt_kernels as ck
torch.manual_seed(0)
B,C,H,W=32,192,24,24
x=torch.randn(B,1+H*W,C).bfloat16(); w=torch.randn(C,1,3,3).bfloat16(); b=torch.randn(C).bfloat16()
peg=ck.PEG(C).bfloat16()
def t(f,n=60):
    for _ in range(5): f()
    ts=[]
    for _ in range(n):
        s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
    ts.sort(); return ts[n//2]*1e3
op=lambda: ck.fused_peg(x,w,b,size=(H,W),backend="cpu")
eg=lambda: peg(x,H,W)
with torch.no_grad():
    r=[(t(op),t(eg)) for _ in range(3)]
print(os.environ.get("CPVT_CPU_BF16_DOT"), " ".join(f"op {a:.3f} eager {e:.3f} x{e/a:.2f}" for a,e in r))
