#!/usr/bin/env python
"""The CUDA PEG kernels' machine code, read without a GPU: for each kernel in a binary (the
built extension ``cpvt_kernels/_C*.so`` by default, or ``bench/cuda_micro/peg_micro``) compiled
for ``--arch``, its registers, stack frame (spills), SASS instructions in all and in its loops,
and its global memory instructions by kind and width::

    python bench/cuda_sass.py                                   # the extension, sm_90
    python bench/cuda_sass.py --filter 'stream_forward.*BFloat16'
    python bench/cuda_sass.py bench/cuda_micro/peg_micro --filter stream

The counts are those of ``bench/triton_compile.py`` (``bench/sass.py``): ``loop`` is the body of
the innermost loop, ``outer`` that of the loop around it, and the memory column lists each
global load and store kind with its count (``STG.E.64x13``: thirteen 8-byte stores; a vector
stored as ``STG.E.U16`` pieces is split into 2-byte stores). Kernel names are demangled with
``c++filt`` when it is installed. Reads the binary with ``$CUOBJDUMP``, else the ``cuobjdump``
in Triton's package, else the one on the PATH; exits non-zero when the binary holds no code for
``--arch``.
"""
from __future__ import annotations

import argparse
import glob
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sass import cuobjdump, sass_counts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def kernels(binary: str, arch: int, tool: str) -> list[dict]:
    """Each kernel of ``binary`` compiled for sm_``arch``: name, registers, stack, SASS counts."""
    arch_flag = ["-arch", f"sm_{arch}"]
    res = subprocess.run([tool, "--dump-resource-usage", *arch_flag, binary],
                         capture_output=True, text=True, check=True).stdout
    usage = {m.group(1): (int(m.group(2)), int(m.group(3)))
             for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+)", res)}
    sass = subprocess.run([tool, "-sass", *arch_flag, binary], capture_output=True, text=True,
                          check=True).stdout
    rows = []
    for body in re.split(r"\n\s*Function : ", sass)[1:]:
        name = body.split("\n", 1)[0].strip()
        regs, stack = usage.get(name, (0, 0))
        rows.append({"mangled": name, "regs": regs, "stack": stack, **sass_counts(body)})
    names = demangle([r["mangled"] for r in rows])
    for r in rows:
        r["name"] = names[r["mangled"]]
    return rows


def short(name: str) -> str:
    """A demangled kernel name without its namespaces and argument list."""
    name = name.replace("cpvt::peg_cuda::", "").replace("c10::", "")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    return name[:cut]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("binary", nargs="?", default=None,
                   help="a binary with CUDA code (default: the built extension)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--filter", default="", metavar="REGEX",
                   help="only the kernels whose demangled name matches")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    binary = args.binary
    if binary is None:
        hits = sorted(glob.glob(str(ROOT / "cpvt_kernels" / "_C*.so")))
        if not hits:
            raise SystemExit("cuda_sass: no built extension in cpvt_kernels/ (build it, or name "
                             "a binary)")
        binary = hits[0]
    tool = cuobjdump()
    rows = [r for r in kernels(binary, args.arch, tool) if re.search(args.filter, r["name"])]
    if not rows:
        print(f"cuda_sass: no kernel for sm_{args.arch} in {binary}"
              + (f" matching {args.filter!r}" if args.filter else ""), file=sys.stderr)
        return 1
    print(f"{binary}, sm_{args.arch}")
    print(f"{'regs':>4} {'stack':>5} {'sass':>5} {'loop':>5} {'outer':>5}  "
          f"kernel  /  global memory")
    for r in sorted(rows, key=lambda r: r["name"]):
        print(f"{r['regs']:>4} {r['stack']:>5} {r['sass']:>5} {r['loop']:>5} "
              f"{r['outer'] or '-':>5}  {short(r['name'])}\n{'':>29}{r['memory']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
