"""Whether Triton software-pipelines (cp.async: LDGSTS in the sm_90 SASS) the loads of a
tl.range loop with num_stages=3 when they feed elementwise arithmetic, as the streaming
kernels' row loads do. Compiles for sm_90 without a GPU; prints the loads and stores of the SASS.
"""
import os, sys, subprocess, re
import triton, triton.language as tl
print(f"# triton {triton.__version__}, python {sys.version.split()[0]}, target sm_90 (no GPU)")
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

@triton.jit
def k(src, out, H, W, stride, NS: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    prev = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.range(0, H, num_stages=NS):
        v = tl.load(src + r * stride + c).to(tl.float32)
        acc = acc * 0.5 + v + prev
        prev = v
        tl.store(out + r * stride + c, acc.to(tl.bfloat16))

sig = {"src": "*bf16", "out": "*bf16", "H": "i32", "W": "i32", "stride": "i32", "NS": "constexpr", "BLOCK": "constexpr"}
cubin = os.path.join(os.environ.get("TMPDIR", "/tmp"), "num_stages.cubin")
tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
for ns in (1, 3):
    kk = triton.compile(ASTSource(fn=k, signature=sig, constexprs={"NS": ns, "BLOCK": 1024}), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    open(cubin, "wb").write(kk.asm["cubin"])
    sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True).stdout
    ops = re.findall(r"\b(LDGSTS|LDG\.E[\w.]*|LDS[\w.]*|STS[\w.]*)", sass)
    from collections import Counter
    print(triton.__version__, "num_stages", ns, Counter(ops), "shared", kk.metadata.shared)
