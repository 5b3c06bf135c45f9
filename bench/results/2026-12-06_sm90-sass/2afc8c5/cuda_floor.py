"""Issue floors of the package's streaming CUDA kernels (csrc/cuda/peg_stream.cuh), read from
their sm_90 SASS without a GPU, beside the time their bytes take at the copy rate.

    python cuda_floor.py [--ghz 1.755] [--gbs 2967] [--dtype bfloat16|float32]

Compiles the kernels the launcher instantiates (RH = kStreamMaxRows = 8, PF = 1, the vectors of
StreamVec) alone with nvcc (-cubin, sm_90; $CUDA_HOME/bin/nvcc), reads each one's registers and
the body of its row loop (one strip a thread: the longest backward branch) with cuobjdump, and
gives the loop's instructions by opcode. The floor is the busiest SM's warp instructions at 4 a
cycle: per SM as many resident blocks as the registers allow (a block's warps at the
kernel's registers, rounded up to 8, out of 65536; at most 64 warps), each looping over
ceil(rows / row slots) strips, as peg_launch.cuh plans the launch. Every instruction of the loop
is counted once a strip (branches that skip part of it make the true count lower).
"""
import argparse, collections, math, os, re, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
ap = argparse.ArgumentParser()
ap.add_argument("--ghz", type=float, default=1.755)
ap.add_argument("--gbs", type=float, default=2967.0, help="copy rate, GB/s (H100, 256 MiB copy)")
ap.add_argument("--sms", type=int, default=132)
ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
a = ap.parse_args()

T, size = {"bfloat16": ("c10::BFloat16", 2), "float32": ("float", 4)}[a.dtype]
VF, VB, RH = 4, 2, 8
kernels = {
    "fwd": f"peg_stream_forward_kernel<{T}, {VF}, 3, {RH}, true, 1>(const StreamForwardArgs<{T}>)",
    "grad_x": f"peg_stream_forward_kernel<{T}, {VF}, 3, {RH}, false, 1>"
              f"(const StreamForwardArgs<{T}>)",
    "bwd": f"peg_stream_backward_kernel<{T}, {VB}, 3, {RH}, 1>(const StreamBackwardArgs<{T}>)",
}
src = ('#include "cuda/peg_stream.cuh"\n#include <c10/util/BFloat16.h>\n'
       'using namespace cpvt::peg_cuda;\n')
src += "".join(f"template __global__ void cpvt::peg_cuda::{k};\n" for k in kernels.values())
import torch.utils.cpp_extension as ce  # noqa: E402
nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
tmp = Path(tempfile.mkdtemp())
(tmp / "k.cu").write_text(src)
r = subprocess.run([nvcc, "-O3", "-std=c++17", "-arch=sm_90", "-cubin", f"-I{ROOT / 'csrc'}",
                    f"-I{ce.include_paths()[0]}", "--expt-relaxed-constexpr", "-Xptxas", "-v",
                    "-o", str(tmp / "k.cubin"), str(tmp / "k.cu")], capture_output=True, text=True)
if r.returncode:
    sys.exit(r.stderr)
sys.path.insert(0, str(ROOT / "bench"))
from sass import cuobjdump  # noqa: E402
sass = subprocess.run([cuobjdump(), "-sass", str(tmp / "k.cubin")], capture_output=True,
                      text=True).stdout
regs = [int(x) for x in re.findall(r"Used (\d+) registers", r.stderr)]
names = re.findall(r"Compiling entry function '(\w+)'", r.stderr)
info = {}
for part in re.split(r"\n\s*Function : ", sass)[1:]:
    name = part.split("\n", 1)[0].strip()
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+(.*?)\s*;", part)]
    best = None
    for addr, text in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            span = (int(m.group(1), 16), addr)
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    body = [t for addr, t in ins if best[0] <= addr <= best[1]]
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                              for t in body)
    kind = "bwd" if "backward" in name else ("fwd" if "Lb1E" in name else "grad_x")
    info[kind] = dict(loop=len(body), ops=ops, regs=regs[names.index(name)])

release = re.search(r"release ([0-9.]+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                          text=True).stdout).group(1)
commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always"], capture_output=True,
                        text=True).stdout.strip()
if subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "csrc"]).returncode:
    commit += " with csrc/ changed"
print(f"# csrc/cuda/peg_stream.cuh at {commit}, sm_90 SASS, nvcc {release}, "
      f"{a.dtype}; floor: busiest SM at 4 warp instructions a cycle, {a.ghz} GHz, {a.sms} SMs; "
      f"bytes at {a.gbs:.0f} GB/s")
for kind in ("fwd", "grad_x", "bwd"):
    k = info[kind]
    fp = sum(k["ops"][o] for o in ("FFMA", "FADD", "FMUL"))
    ops = " ".join(f"{o} {n}" for o, n in k["ops"].most_common(14))
    print(f"{kind:6s} {k['regs']} registers, loop {k['loop']} instructions a strip, {fp} FP "
          f"({100 * fp / k['loop']:.0f}%): {ops}")
print()
print("| shape (B x C x H=W) | pass | strips x rows | blocks/SM | strips/block | floor us "
      "| bytes us | floor / bytes |")
print("|---|---|--:|--:|--:|--:|--:|--:|")
for B, C, H in ((128, 192, 14), (128, 384, 14), (128, 768, 14), (64, 384, 24), (32, 768, 32)):
    W, N = H, 1 + H * H
    for kind in ("fwd", "grad_x", "bwd"):
        vec = VB if kind == "bwd" else VF
        nvec = C // vec
        chunks = (nvec + 31) // 32
        cv = (nvec + chunks - 1) // chunks
        max_wb = max(1, 256 // cv)
        wblocks = (W + max_wb - 1) // max_wb
        wb = (W + wblocks - 1) // wblocks
        strips = (H + RH - 1) // RH
        rh = (H + strips - 1) // strips
        strips = (H + rh - 1) // rh
        rows = B * strips
        r8 = (info[kind]["regs"] + 7) // 8 * 8
        warps = math.ceil(cv * wb / 32)  # registers are allocated a warp at a time
        per_sm = min(65536 // (r8 * 32 * warps), 64 // warps, 32)
        row_slots = max(1, min(rows, per_sm * a.sms // (chunks * wblocks)))
        per_block = math.ceil(rows / row_slots)
        busiest = per_sm * warps * per_block * info[kind]["loop"]
        floor = busiest / (4 * a.ghz * 1e3)
        S = B * N * C * size
        nbytes = (3 if kind == "bwd" else 2) * S
        bytes_us = nbytes / (a.gbs * 1e3)
        print(f"| {B}x{C}x{H} | {kind} | {strips} x {rh} | {per_sm} | {per_block} | {floor:.1f} | "
              f"{bytes_us:.1f} | {floor / bytes_us:.2f} |")
