"""Issue floors of the streaming Triton kernels before and after, from two triton_compile.py
logs, beside the bytes' floor at a copy rate: python compare.py BEFORE.log AFTER.log [GB/s]."""
import re
import sys

ITEM = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


def rows(path):
    out = {}
    for line in open(path):
        m = re.match(r"\s*B=(\d+) C=(\d+) H=W=(\d+) P=(\d+) k=3\s+(\w+)\s+stream\s+(\w+)\s+"
                     r"(_\w+_kernel)\s+(\S+)\s+(\d+)\s+(\d+)\s+\d+\s+\d+\s+\d+\s+(\d+)\s+\S+\s+"
                     r"[\d.]+\s+([\d.]+)\s+([\d.]+)", line)
        if m and "reduce" not in m.group(7):
            B, C, H, P = map(int, m.group(1, 2, 3, 4))
            out[(B, C, H, P, m.group(5), m.group(6))] = dict(
                blocks=m.group(8), warps=int(m.group(9)), regs=int(m.group(10)),
                loop=int(m.group(11)), mwi=float(m.group(12)), us=float(m.group(13)))
    return out


before, after = rows(sys.argv[1]), rows(sys.argv[2])
gbps = float(sys.argv[3]) if len(sys.argv) > 3 else 2967.0
print(f"| shape (B x C x H=W) | dtype | pass | before: blocks, warps, regs, loop | issue us | "
      f"after: blocks, warps, regs, loop | issue us | bytes us at {gbps:.0f} GB/s |")
print("|---|---|---|---|--:|---|--:|--:|")
for k in after:
    B, C, H, P, dt, pas = k
    if k not in before:
        continue
    S = B * (P + H * H) * C * ITEM[dt]
    floor = (2 if pas in ("fwd", "grad_x") else 3) * S / (gbps * 1e9) * 1e6
    b, a = before[k], after[k]
    print(f"| {B}x{C}x{H} | {dt} | {pas} | {b['blocks']}, {b['warps']}, {b['regs']}, {b['loop']} "
          f"| {b['us']:.1f} | {a['blocks']}, {a['warps']}, {a['regs']}, {a['loop']} | "
          f"{a['us']:.1f} | {floor:.1f} |")
