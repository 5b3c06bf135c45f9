"""Reading the SASS listings of ``cuobjdump``, shared by ``triton_compile.py`` (Triton's kernels)
and ``cuda_sass.py`` (the CUDA ones). Importing it changes nothing: no environment, no torch."""
from __future__ import annotations

import collections
import glob
import os
import re
import shutil


def cuobjdump() -> str:
    """$CUOBJDUMP, else the cuobjdump in Triton's package, else the one on the PATH."""
    if os.environ.get("CUOBJDUMP"):
        return os.environ["CUOBJDUMP"]
    try:
        import triton
        hits = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                      "bin", "cuobjdump"))
        if hits:
            return hits[0]
    except ImportError:
        pass
    tool = shutil.which("cuobjdump")
    if tool is None:
        raise SystemExit("no cuobjdump: set CUOBJDUMP, or install triton or the CUDA toolkit")
    return tool


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", re.M)
_MEMORY_OP = re.compile(r"\b((?:LDG|STG|ATOMG|REDG?)(?:\.[A-Z0-9_]+)*)")


def sass_counts(sass: str) -> dict:
    """Instructions of a cuobjdump -sass listing: in all; in the body of the innermost loop
    (``loop``: from a backward branch's target to the branch, the largest such body that holds
    no other loop; 0 without a loop) and of the outermost (``outer``, where loops nest: the
    persistent streaming kernels' walk over their items around the walk down a strip's rows);
    and the global memory ones by kind and width."""
    instrs = [(int(a, 16), text) for a, text in _SASS_LINE.findall(sass)]
    spans = []
    for addr, text in instrs:
        m = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if m:
            target = int(m.group(1), 16)
            if target < addr:  # a backward branch (the trailing BRA to itself is not a loop)
                spans.append((target, addr))

    def size(span):
        return sum(1 for a, _ in instrs if span[0] <= a <= span[1])

    inner = [s for s in spans
             if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    loop_span = max(inner, key=size, default=None)
    loop = size(loop_span) if loop_span else 0
    outer = max((size(s) for s in spans), default=0)
    # if/else inside the innermost loop: a conditional branch to X with an unconditional branch
    # (to Y) just before X; 'then' runs from the branch to X, 'else' from X to Y.
    branches = []
    if loop_span:
        addrs = {a: text for a, text in instrs}
        for addr, text in instrs:
            m = re.search(r"@!?U?P\d BRA 0x([0-9a-f]+)", text)
            if not (m and loop_span[0] <= addr <= loop_span[1]):
                continue
            x = int(m.group(1), 16)
            jump = re.match(r"\s*BRA 0x([0-9a-f]+)", addrs.get(x - 16, ""))
            if addr < x <= loop_span[1] and jump:  # an if/else inside the loop
                y = int(jump.group(1), 16)
                branches.append((sum(1 for a, _ in instrs if addr < a < x),
                                 sum(1 for a, _ in instrs if x <= a < y)))
    mem = collections.Counter(m.group(1) for _, text in instrs
                              for m in [_MEMORY_OP.search(text)] if m)
    return {"sass": len(instrs), "loop": loop, "outer": outer if outer > loop else 0,
            "branches": branches,
            "memory": " ".join(f"{k}x{v}" for k, v in sorted(mem.items()))}
