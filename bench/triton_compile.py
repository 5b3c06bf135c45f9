#!/usr/bin/env python
"""Compiles the Triton PEG kernels for a GPU architecture without a GPU, as the launchers would
launch them, and prints each kernel's registers, stack frame and shared memory.

    python bench/triton_compile.py                        # sm_90, CPVT-S and CPVT-B, bfloat16
    python bench/triton_compile.py --arch 80 --dtypes float32 bfloat16 --shapes 32x192x24

For each shape, dtype, kernel family (tiled, streaming) and pass (forward, input gradient alone,
fused backward), it runs the launcher in ``cpvt_kernels/triton_peg.py`` on meta tensors with
the kernel launch intercepted, compiles the kernel it would have launched (same constexprs and
``num_warps``) for ``--arch`` with Triton's own compiler and ptxas, and reads the resource usage
with the ``cuobjdump`` that Triton's package carries. A non-zero stack frame is local memory:
spilled registers. Exits non-zero if a kernel fails to compile or (with ``--no-spills``) has a
stack frame. Compiling needs no GPU; running the kernels does. ``--resources-only`` stops
there (no disassembly: several times faster).

From the SASS it also counts the instructions: ``sass`` in all, ``loop`` in the body of the
kernel's innermost loop (a backward branch; the streaming kernels' walk down the rows, the
reduction's walk over the tiles; both sides of a branch inside it count, so where a branch skips
a rare path the loop an iteration runs is shorter), ``outer`` in the body of the loop around it
(the persistent streaming kernels' walk over their strips: ``outer - loop`` is what a strip
costs beyond its rows; ``-`` where loops do not nest), and ``i/elem``, the warp instructions
issued per element of the block: ``(loop or sass) * num_warps / (product of the block
sizes)``, per row for the streaming kernels. The persistent kernels launch programs for
``--sms`` SMs (default 132). With ``--branches`` it lists each if/else inside the innermost loop
(the instructions of its two sides), so that the loop an iteration runs can be told from the
listing's.
A memory-bound kernel must also stay below the SMs' issue rate: an H100 (132 SMs, 4 schedulers
each, about 1.75 GHz) issues about 0.92e12 warp instructions a second, so a kernel at 4 i/elem
over the 9.7 M elements of CPVT-S (B=128, 224 px) needs about 41 us to issue them, three times a
copy of its bytes. ``Mwi`` is the launch's warp instructions in millions and ``issue_us`` the
time the busiest SM needs to issue its share (see ``issue_estimate``: the streaming kernels'
loops counted by their rows and items, at ``--ghz``): a floor on the kernel's time to set
beside the bytes' (``2 S`` forward, ``3 S`` backward, at the copy bandwidth). ``res`` is, for
the persistent streaming kernels, the programs the launch asks of the busiest SM over those its
registers let it hold (``--one-wave`` fails where the first is larger). Where a streaming
kernel's blocks say ``2x128,rh14,slots528``: blocks of 2 pixels by 128 channels, strips of 14
rows, 528 programs a channel block. Last, the kernel's global memory instructions
(``LDG.E.64x11``: eleven 8-byte loads; ``.U16`` ones are scalar half-word loads).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# The kernels must be compiled, not interpreted: TRITON_INTERPRET makes triton.jit return
# interpreted functions, which have nothing to compile.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peg  # noqa: E402  (puts the source tree on sys.path when it is built in place)
from sass import cuobjdump, sass_counts  # noqa: E402  (results scripts call tc.cuobjdump)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from cpvt_kernels import triton_peg  # noqa: E402

TRITON_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16",
                torch.bfloat16: "bf16"}


class Captured:
    """The launches ``triton_peg._wrap(kernel)[grid](*args, **kwargs)`` asked for."""

    def __init__(self):
        self.launches = []
        self.grids = []

    def wrap(self, kernel):
        cap = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    cap.launches.append((kernel, args, kwargs))
                    cap.grids.append(tuple(grid) if isinstance(grid, (tuple, list)) else (grid,))
                return launch
        return Launcher()


@contextlib.contextmanager
def captured():
    cap = Captured()
    real = triton_peg._wrap
    triton_peg._wrap = cap.wrap
    try:
        yield cap
    finally:
        triton_peg._wrap = real


def signature(kernel, args, kwargs):
    """Triton's signature, constexprs and attributes for a launch, specialized as the JIT does
    at a launch: an integer argument equal to 1 (a unit stride) becomes a constant, and
    integers and pointers divisible by 16 are marked so (meta tensors stand for allocations,
    which are 16-byte aligned). Without that, loads along a stride the compiler cannot prove to
    be 1 stay scalar."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:  # another Triton release: plain types, no specialization
        native_specialize_impl = None
    sig, consts, attrs = {}, {}, {}
    names = kernel.arg_names
    params = {p.name: p for p in kernel.params}
    values = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in params})
    for i, name in enumerate(names):
        v, kp = values[name], params[name]
        if kp.is_constexpr:
            sig[name] = "constexpr"
            consts[name] = v
        elif native_specialize_impl is not None:
            ty, key = native_specialize_impl(BaseBackend, v, kp.is_const,
                                             not kp.do_not_specialize,
                                             not kp.do_not_specialize_on_alignment)[:2]
            sig[name] = ty
            if ty == "constexpr":
                consts[name] = key
            elif isinstance(key, str):
                attrs[(i,)] = BaseBackend.parse_attr(key)
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + TRITON_TYPES[v.dtype]
        else:
            sig[name] = "i64" if abs(int(v)) >= 2**31 else "i32"
    return sig, consts, attrs


def compile_kernel(kernel, args, kwargs, arch: int):
    """Triton's compiled kernel for a launch (the launch's constexprs and specialization)."""
    sig, consts, attrs = signature(kernel, args, kwargs)
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": kwargs.get("num_warps", 4)})


def loop_carried(ttir: str) -> list:
    """The variables each loop (``scf.while``, ``scf.for``) of a Triton IR listing carries from
    one iteration to the next, in the listing's order (outer loops first), by their source
    names. A variable the loop reassigns that is not among them keeps its value from before the
    loop in the compiled kernel: Triton carries a name only if the body leaves it another value
    than it had on entry, which the interpreter (plain Python) does not share."""
    loops = []
    for m in re.finditer(r"= scf\.while \(([^)]*)\)|= scf\.for .*? iter_args\(([^)]*)\)", ttir):
        loops.append([re.sub(r"_\d+$", "", n)
                      for n in re.findall(r"%([A-Za-z_]\w*) = ", m.group(1) or m.group(2))])
    return loops


def compile_resources(kernel, args, kwargs, arch: int, tool: str, workdir: Path,
                      name: str) -> dict:
    """Compiles a launch into ``workdir/<name>.cubin`` and reads its registers,
    stack frame and shared memory (fast); ``disassemble`` adds the SASS counts (about a second
    a kernel: nvdisasm)."""
    k = compile_kernel(kernel, args, kwargs, arch)
    path = workdir / f"{name}.cubin"
    path.write_bytes(k.asm["cubin"])
    out = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True,
                         text=True, check=True).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    fields = dict(f.split(":", 1) for f in line.split() if ":" in f)
    config = {name: kwargs[name] for name in ("BLOCK_T", "BLOCK_W", "BLOCK_R", "BLOCK_C")
              if name in kwargs}
    return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]),
            "shared": int(fields["SHARED"]), "num_warps": kwargs.get("num_warps", 4),
            "config": config, "carried": loop_carried(k.asm["ttir"]), "cubin": path}


def disassemble(r: dict, tool: str) -> dict:
    """``r`` with the SASS counts of its cubin (``sass_counts``) and ``per_elem``; safe to run
    in a thread beside the next compilation."""
    sass = subprocess.run([tool, "-sass", str(r["cubin"])], capture_output=True, text=True,
                          check=True).stdout
    counts = sass_counts(sass)
    per = counts["loop"] or counts["sass"]
    return {**r, **counts,
            "per_elem": per * r["num_warps"] / max(1, math.prod(r["config"].values()))}


def resident(regs: int, warps: int, shared: int) -> int:
    """Programs of ``warps`` warps an sm_90 SM holds at once: 64K registers, allocated 8 a
    thread; 64 warps; 32 programs; 228 KB of shared memory."""
    per_program = -(-max(regs, 1) // 8) * 8 * 32 * warps
    return max(0, min(65536 // per_program, 64 // warps, 32,
                      228 * 1024 // shared if shared else 32))


def programs_on_sm(kernel, args, kwargs, grid, sms: int):
    """Persistent programs a launch of a streaming kernel asks of its busiest SM (its
    ``slots * cblocks`` programs spread evenly over ``sms`` SMs); None for other kernels."""
    v = dict(zip(kernel.arg_names, args), **kwargs)
    if "slots" not in v:
        return None
    return math.ceil(int(v["slots"]) * math.prod(int(g) for g in grid[1:]) / sms)


def issue_estimate(kernel, args, kwargs, grid, r: dict, sms: int, ghz: float) -> tuple:
    """(million warp instructions the launch issues, microseconds the busiest SM needs to issue
    its share at 4 a cycle): a floor on the kernel's time from its instruction count alone.

    The persistent streaming kernels: each of the ``slots * cblocks`` programs walks up to
    ``ceil(items / slots)`` items, an item ``rows + 2`` iterations of the innermost loop (the
    forward; ``rows + 3`` the backward) plus ``outer - loop`` instructions; the reduction
    walks its tiles; the rest of a kernel counts once a program (an upper bound: both sides of
    every branch). An iteration runs the shorter side of each if/else in the loop (the longer
    one, in the streaming kernels, is the path for non-finite taps). Programs are spread evenly
    over ``sms`` SMs."""
    v = dict(zip(kernel.arg_names, args), **kwargs)
    warps = kwargs.get("num_warps", 4)
    programs = math.prod(int(g) for g in grid)
    rare = sum(max(sides) for sides in r["branches"])
    loop, outer, total = r["loop"] - rare, (r["outer"] or r["loop"]) - rare, r["sass"] - rare
    if "slots" in v:  # a persistent streaming kernel
        slots, items = int(v["slots"]), int(v["items"])
        cblocks = math.prod(int(g) for g in grid[1:])
        rows = int(v["H"]) / int(v["strips"])
        per_item = (rows + (3 if "bwd" in kernel.__name__ else 2)) * loop + (outer - loop)
        setup = total - outer
        walk = items * cblocks * per_item
        busiest = math.ceil(items / slots) * per_item + setup
        mwi = (walk + programs * setup) * warps / 1e6
        crit = busiest * programs_on_sm(kernel, args, kwargs, grid, sms) * warps
    else:
        trips = math.ceil(int(v.get("num_tiles", 1)) / int(v.get("BLOCK_R", 1)))
        per_program = (trips * loop + total - loop) if loop else total
        mwi = programs * per_program * warps / 1e6
        crit = mwi * 1e6 / sms
    return mwi, crit / (4 * ghz * 1e3)


def launches(family: str, pass_name: str, case, dtype, with_grid: bool = False):
    """The kernels the launcher of (family, pass) starts for ``case`` on meta tensors
    (with_grid: each with its grid)."""
    x = torch.empty(case.B, case.N, case.C, dtype=dtype, device="meta")
    w = torch.empty(case.C, 1, case.k, case.k, dtype=dtype, device="meta")
    b = torch.empty(case.C, dtype=dtype, device="meta")
    tp, H, W, P = triton_peg, case.H, case.W, case.P
    geometry = (H, W, case.C, case.B, tp._device_sms(x.device), x.element_size())
    with captured() as cap:
        if family == "stream":
            if pass_name == "fwd":
                tp.launch_stream_forward(x, w, b, H, W, P, False,
                                         tp.stream_forward_config(*geometry))
            elif pass_name == "grad_x":
                tp.launch_stream_backward(x, x, w, H, W, P, (True, False, False),
                                          tp.stream_backward_config(*geometry))
            else:
                tp.launch_stream_backward(x, x, w, H, W, P, (True, True, True),
                                          tp.stream_backward_config(*geometry))
        else:
            if pass_name == "fwd":
                tp.launch_forward(x, w, b, H, W, P, tp.forward_config(case.N, case.C))
            else:
                mask = (True, False, False) if pass_name == "grad_x" else (True, True, True)
                tp.launch_backward(x, x, w, H, W, P, mask, tp.backward_config(case.N, case.C))
    if with_grid:
        return [(*launch, grid) for launch, grid in zip(cap.launches, cap.grids)]
    return cap.launches


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--shapes", nargs="+", default=["128x384x14", "128x768x14"],
                   metavar="BxCxH[xW]")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], metavar="DTYPE")
    p.add_argument("--kernels", nargs="+", choices=("tile", "stream"), default=["tile", "stream"])
    p.add_argument("--sms", type=int, default=132,
                   help="SMs of the device the persistent streaming kernels are sized for "
                        "(default 132, an H100 SXM's): it sets how many programs they launch, "
                        "so the partial sums the reduction kernel walks")
    p.add_argument("--ghz", type=float, default=1.755,
                   help="SM clock for the issue floor (default 1.755, an H100 SXM's boost clock)")
    p.add_argument("--branches", action="store_true",
                   help="also list each if/else inside the innermost loop: the instructions of "
                        "its two sides, so that the loop an iteration runs can be told from the "
                        "listing's")
    p.add_argument("--carried", action="store_true",
                   help="also list the variables each loop of a kernel carries from one "
                        "iteration to the next (see loop_carried)")
    p.add_argument("--no-spills", action="store_true",
                   help="exit non-zero if a kernel has a stack frame (spilled registers)")
    p.add_argument("--resources-only", action="store_true",
                   help="skip the disassembly: registers, stack, shared memory and residency "
                        "only (the SASS columns print '-'); several times faster")
    p.add_argument("--one-wave", action="store_true",
                   help="exit non-zero if a persistent streaming kernel asks an SM for more "
                        "programs than its registers let it hold (the rest would wait for "
                        "whole programs to finish)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        dtypes = [bench_peg.DTYPE_NAMES[d.lower()] for d in args.dtypes]
        cases = [c for s in args.shapes for c in bench_peg.parse_shape(s, [1], [3])]
    except (KeyError, argparse.ArgumentTypeError) as e:
        raise SystemExit(f"triton_compile: {e}")
    triton_peg._device_sms = lambda device: args.sms  # meta tensors: size for --sms SMs
    tool = cuobjdump()
    # The cubins cuobjdump reads, in a folder of the temporary directory removed at the end
    with tempfile.TemporaryDirectory(prefix="cpvt_triton_compile_") as workdir:
        return report(args, cases, dtypes, tool, Path(workdir))


def report(args, cases, dtypes, tool: str, workdir: Path) -> int:
    """Compiles each launch of ``cases`` x ``dtypes`` x ``args.kernels`` and prints its line;
    returns 1 where a kernel failed, spilled (``--no-spills``) or overfilled (``--one-wave``).
    The kernels compile one after another; their disassembly (nvdisasm, about a second each)
    runs in threads beside the next compilations, and the lines come out in launch order."""
    print(f"triton {triton.__version__}, sm_{args.arch}")
    print(f"{'shape':>14} {'dtype':>5} {'family':>6} {'pass':>6} {'kernel':<28} {'blocks':<24} "
          f"warps  regs  stack  shared  sass  loop outer  i/elem   Mwi issue_us  res  "
          f"global memory")
    bad = 0
    pending = collections.deque()  # (label, launch, resources, disassembly future) in order
    compiled = itertools.count()  # names the cubins, which stay until the end (the threads')

    def flush(wait: bool) -> int:
        n = 0
        while pending and (wait or pending[0][3] is None or pending[0][3].done()):
            label, launch, r, job = pending.popleft()
            n += print_row(args, label, launch, r if job is None else job.result())
        return n

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for case in cases:
            for dtype in dtypes:
                for family in args.kernels:
                    for pass_name in ("fwd", "grad_x", "bwd"):
                        for kernel, kargs, kwargs, grid in launches(family, pass_name, case,
                                                                    dtype, with_grid=True):
                            label = (f"{case.label():>14} {bench_peg.SHORT[dtype]:>5} "
                                     f"{family:>6} {pass_name:>6} {kernel.__name__:<28}")
                            try:
                                r = compile_resources(kernel, kargs, kwargs, args.arch, tool,
                                                      workdir, f"launch{next(compiled)}")
                            except Exception as e:  # report and go on: one kernel must not
                                bad += flush(True)  # hide others
                                print(f"{label} FAILED: {type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:200] if str(e) else ''}")
                                bad += 1
                                continue
                            job = None if args.resources_only else pool.submit(disassemble, r,
                                                                               tool)
                            pending.append((label, (kernel, kargs, kwargs, grid), r, job))
                            bad += flush(False)
        bad += flush(True)
    return 1 if bad else 0


def print_row(args, label: str, launch, r: dict) -> int:
    """Prints a compiled launch's line (and its --carried / --branches lines); returns 1 where
    it spilled (``--no-spills``) or overfilled an SM (``--one-wave``), else 0."""
    kernel, kargs, kwargs, grid = launch
    on_sm = programs_on_sm(kernel, kargs, kwargs, grid, args.sms)
    fits = resident(r["regs"], r["num_warps"], r["shared"])
    waves = on_sm is not None and on_sm > fits
    res = "-" if on_sm is None else f"{on_sm}/{fits}"
    blocks = "x".join(str(v) for v in r["config"].values())
    named = dict(zip(kernel.arg_names, kargs))
    if "rh" in named:  # streaming: strip height, programs a channel block
        blocks += f",rh{named['rh']},slots{named['slots']}"
    spill = r["stack"] > 0
    if "sass" in r:
        mwi, issue_us = issue_estimate(kernel, kargs, kwargs, grid, r, args.sms, args.ghz)
        counts = (f"{r['sass']:>5} {r['loop']:>5} {r['outer'] or '-':>5} {r['per_elem']:>7.2f} "
                  f"{mwi:>5.1f} {issue_us:>8.1f}")
        memory = r["memory"]
    else:  # --resources-only
        counts = f"{'-':>5} {'-':>5} {'-':>5} {'-':>7} {'-':>5} {'-':>8}"
        memory = "-"
    print(f"{label} {blocks:<24} {r['num_warps']:>5} {r['regs']:>5} {r['stack']:>6} "
          f"{r['shared']:>7} {counts} {res:>5}  {memory}"
          + ("  (spills)" if spill else "")
          + ("  (more programs than fit)" if waves else ""), flush=True)
    if args.carried:
        for depth, names in enumerate(r["carried"]):
            print(f"{'':>14} loop {depth} carries: {' '.join(names)}")
    if args.branches and "branches" in r:
        for then, other in r["branches"]:
            print(f"{'':>14} if/else in the loop: then {then}, else {other} instructions (an "
                  f"iteration on the else side runs {r['loop'] - then}, on the then side "
                  f"{r['loop'] - other})")
    return int(spill and args.no_spills) + int(waves and args.one_wave)


if __name__ == "__main__":
    sys.exit(main())
