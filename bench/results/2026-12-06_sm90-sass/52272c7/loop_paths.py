"""The streaming input-gradient kernels' loop at CPVT-S (B=128, C=384, 14x14, bfloat16), sm_90:
its body, its global loads, its branches, and each if/else inside it (a conditional branch to X
with an unconditional branch just before X): the instructions of the 'then' and the 'else' side,
so that the body an iteration runs can be told from the static one.

    python bench/results/2026-12-06_sm90-sass/<commit>/loop_paths.py   # from the repository root
"""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402

sys.argv = sys.argv[:1]
sys.path.insert(0, "bench")
import bench_peg  # noqa: E402
import triton  # noqa: E402
import triton_compile as tc  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

print(f"# triton {triton.__version__}, sm_90, commit {bench_peg.git_commit()}")
tool = tc.cuobjdump()
case = bench_peg.parse_shape("128x384x14", [1], [3])[0]
tmp = Path(tempfile.mkdtemp())
for p in ("grad_x", "bwd"):
    for kernel, args, kwargs in tc.launches("stream", p, case, torch.bfloat16):
        if "reduce" in kernel.__name__:
            continue
        sig, consts, attrs = tc.signature(kernel, args, kwargs)
        k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": kwargs.get("num_warps", 4)})
        path = tmp / f"{p}.cubin"
        path.write_bytes(k.asm["cubin"])
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True).stdout
        ins = [(int(a, 16), t) for a, t in
               re.findall(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
        for a, t in ins:
            m = re.search(r"\bBRA\s+0x([0-9a-f]+)", t)
            if m and int(m.group(1), 16) < a:
                lo = int(m.group(1), 16)
                body = [x for x in ins if lo <= x[0] <= a]
                print(f"{p} {kernel.__name__}: loop {hex(lo)}-{hex(a)}, {len(body)} instructions, "
                      f"{sum('LDG' in x[1] for x in body)} global loads, branches "
                      f"{[(hex(x[0]), x[1].strip()) for x in body if 'BRA' in x[1]]}")
                for b, u in body:
                    m2 = re.search(r"@!?P\d BRA 0x([0-9a-f]+)", u)
                    if not m2:
                        continue
                    X = int(m2.group(1), 16)
                    prev = [x for x in ins if x[0] == X - 16]
                    m3 = prev and re.match(r"BRA 0x([0-9a-f]+)", prev[0][1].strip())
                    if m3:
                        Y = int(m3.group(1), 16)
                        print(f"  if/else at {hex(b)}: then {(X - 16 - b) // 16}, "
                              f"else {(Y - X) // 16} instructions")
