# 2026-12-06, Intel Xeon (CPUID model 167), 2 cores, no GPU. Minimal case of the triton 3.9 interpreter failure the Triton kernels hit before 86d4ac5.
# python repro_triton39_mask.py: modes 0 and 2 (a block mask and a scalar comparison) fail with triton 3.9.0 and pass with 3.8.0.
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch, triton, triton.language as tl

@triton.jit
def k(out_ptr, C, KK, MODE: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    c_ok = c < C
    if MODE == 0:
        m = c_ok & (r < KK)
    elif MODE == 1:
        m = c_ok & ((r + tl.zeros_like(c)) < KK)
    elif MODE == 2:
        m = (r < KK) & c_ok
    else:
        m = c_ok
    tl.store(out_ptr + r * BLOCK + c, c.to(tl.float32) + r, mask=m)

print(triton.__version__, torch.__version__)
for mode in range(4):
    out = torch.full((4, 8), float("nan"))
    try:
        k[(4,)](out, 5, 3, MODE=mode, BLOCK=8)
        print(mode, "ok", int(torch.isnan(out).sum()))
    except Exception as e:
        print(mode, "FAIL", type(e).__name__, str(e)[:100])
