#!/usr/bin/env bash
# llvm-mca (its Skylake-server model: LLVM 14 has none for Sapphire/Emerald Rapids) over the
# steady-state loops of bf16_loops.cpp's cur and slid3, from `g++ -O3 -march=native -S`.
set -euo pipefail
g++ -O3 -march=native -std=c++17 -S bf16_loops.cpp -o bf16_loops.s
python3 - <<'PY'
import re, subprocess
s = open("bf16_loops.s").read()
def body(fn):
    return s.split(fn + ":\n", 1)[1].split(".cfi_endproc", 1)[0].splitlines()
def loops(lines):
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"^(\.L\w+):", l))}
    for i, l in enumerate(lines):
        m = re.match(r"\s+j\w+\s+(\.L\w+)", l)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            seg = [x for x in lines[labels[m.group(1)]:i + 1]
                   if x.startswith("\t") and x.split() and not x.split()[0].startswith((".", "#"))]
            yield sum("fmadd" in x for x in seg), seg
fns = {re.sub(r"\W", "", f): f for f in re.findall(r"^(_Z\w+(?:\.constprop\.\d+)?):\n", s, re.M)}
for name, want in (("cur_rows<4>", ("_Z8cur_rowsILi4E", 144)),
                   ("slide_rows<3>, even half", ("_Z10slide_rowsILi3E", 81)),
                   ("slide_rows<3>, odd half", ("_Z10slide_rowsILi3E", 81))):
    fn = next(f for f in fns.values() if f.startswith(want[0]))
    segs = [seg for n, seg in loops(body(fn)) if n == want[1]]
    segs.sort(key=len)
    seg = segs[-1] if "odd" in name or "cur" in name else segs[0]
    if "cur" in name:
        seg = max((sg for sg in segs if not any("rsp" in x for x in sg)), key=len, default=seg)
    out = subprocess.run(["llvm-mca", "-mcpu=skylake-avx512", "-iterations=200"], input="\n".join(seg),
                         capture_output=True, text=True).stdout
    cyc = re.search(r"Total Cycles:\s+(\d+)", out).group(1)
    rt = re.search(r"Block RThroughput:\s+([\d.]+)", out).group(1)
    ops = {}
    for x in seg:
        ops[x.split()[0]] = ops.get(x.split()[0], 0) + 1
    top = ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:8])
    print(f"{name}: {want[1]} FMAs an iteration, {int(cyc) / 200:.1f} cycles simulated "
          f"(port bound {rt}); {top}")
PY
