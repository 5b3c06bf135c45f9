"""The row loop of the package's cp.async kernels in sm_90 SASS, with the common path of a step
marked: a step that starts no item (the `ri == -1` test falls through to the barrier), issues a
row, and is not the last of its item on the issuing side; in the backward, with grad_x, a
grad_out row inside the image and all three tap rows of the weight gradient. The backward's
loop holds three steps (unrolled by 3 since a364184; before, one step of 250 instructions). The
ranges were read off the branches of a build of that commit (nvcc 13.0, -O3, sm_90; the
forward's code is d126470's); another build moves the addresses.

    python pipe_sass.py [binary]     # default: the built extension
"""
import glob
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "bench"))
import cuda_sass  # noqa: E402

# kernel (mangled, as cuobjdump names it) -> (steps in the loop, the address ranges of their
# common paths)
PATHS = {
    "_ZN4cpvt8peg_pipe23peg_pipe_forward_kernelIN3c108BFloat16ELi4ELi6ELi1EEEvNS0_8PipeArgsIT_EE":
        (1, [(0x18e0, 0x1900), (0x2b60, 0x2cf0), (0x3000, 0x35f0)]),
    "_ZN4cpvt8peg_pipe23peg_pipe_forward_kernelIfLi4ELi6ELi1EEEvNS0_8PipeArgsIT_EE":
        (1, [(0x16f0, 0x1710), (0x2830, 0x29c0), (0x2cd0, 0x31c0)]),
    "_ZN4cpvt8peg_pipe24peg_pipe_backward_kernelIN3c108BFloat16ELi4ELi6ELb1EEEvNS0_16PipeBackwardArgsIT_EE":
        (3, [(0x2450, 0x2460), (0x2ac0, 0x2d40), (0x2f20, 0x3a50),
             (0x3a60, 0x3a70), (0x40d0, 0x4350), (0x4530, 0x5040),
             (0x5050, 0x5060), (0x56c0, 0x5910), (0x5af0, 0x6610)]),
}

binary = sys.argv[1] if len(sys.argv) > 1 else sorted(glob.glob(str(ROOT / "cpvt_kernels" / "_C*.so")))[0]
commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                        capture_output=True, text=True).stdout.strip()
if subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "csrc"]).returncode:
    commit += " (csrc/ modified)"  # the log being written is not the kernels' source
nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip()
print(f"# {binary}\n# built from {commit}; {cuda_sass.cuobjdump()}")
release = [l for l in nvcc.splitlines() if "release" in l]
print(f"# nvcc: {release[0] if release else 'not found'}\n")
sass = subprocess.run([cuda_sass.cuobjdump(), "-sass", "-arch", "sm_90", binary],
                      capture_output=True, text=True, check=True).stdout
for func in re.split(r"\n\s*Function : ", sass)[1:]:
    name = func.split("\n")[0].strip()
    if name not in PATHS:
        continue
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+(.*?);", func)]
    steps, ranges = PATHS[name]
    lo, hi = ranges[0][0], ranges[-1][1]
    on = [(a, t) for a, t in ins if any(x <= a <= y for x, y in ranges)]
    fp = sum(re.sub(r"^@!?U?P\w+\s+", "", t).startswith(("FFMA", "FADD")) for _, t in on)
    print(f"{name}\n  common path of a step: {len(on) / steps:.0f} instructions, "
          f"{fp / steps:.0f} FFMA/FADD ({steps} steps in the loop)")
    for a, t in ins:
        if lo <= a <= hi:
            mark = "*" if any(x <= a <= y for x, y in ranges) else " "
            print(f"  {mark} {a:#06x}  {t}")
    print()
