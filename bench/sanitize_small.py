#!/usr/bin/env python
"""A small workload of the CUDA and Triton PEG kernels for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_small.py

Forward and backward (all gradients, and masked subsets) on a few small shapes that reach the
kernels' edge cases: a 1x1 grid, one channel, odd channel counts, a strided ``x`` with a
misaligned start, no prefix tokens, several prefix tokens, kernels up to 31x31, an empty batch
the row strips of the streaming kernels (with CPVT_CUDA_KERNELS=stream and
CPVT_TRITON_KERNELS=stream), and the rings of row buffers of the cp.async kernels (with
CPVT_CUDA_KERNELS=pipe: 3x3, 16-byte-aligned channels, 8 to 64 of them). Every result
is also compared with the float64 reference, so a kernel that reads the wrong memory without
faulting still fails. Exits non-zero on any mismatch.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

if importlib.util.find_spec("cpvt_kernels") is None:  # run from a source tree built in place
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cpvt_kernels as ck  # noqa: E402
from cpvt_kernels.reference import peg_reference  # noqa: E402

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3,
             torch.bfloat16: 1.6e-2}
# (B, P, H, W, C, kh, kw, bias, strided x)
SHAPES = [
    (2, 1, 5, 6, 8, 3, 3, True, False),
    (1, 0, 1, 1, 1, 3, 3, True, False),
    (3, 2, 4, 7, 13, 5, 3, False, True),
    (1, 1, 3, 4, 5, 31, 31, True, False),
    (0, 1, 2, 2, 4, 3, 3, True, False),
    (2, 1, 14, 14, 67, 7, 7, True, True),
    (2, 1, 17, 5, 64, 3, 3, True, False),   # the streaming kernels' strips (6, 6, 5 rows)
    (3, 2, 9, 4, 48, 3, 3, True, True),     # cp.async kernels: 3 chunks of 16 channels, P=2
    (2, 2, 9, 40, 24, 1, 1, False, False),
]
MASKS = [(True, True, True), (True, False, False), (False, True, True)]


def rel_err(a, ref) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.abs().max().item() if ref.numel() else 0.0
    diff = (a - ref).abs().max().item() if a.numel() else 0.0
    return diff / denom if denom > 0 else diff


def run_case(backend, dtype, shape, gen, device) -> list[str]:
    B, P, H, W, C, kh, kw, has_bias, strided = shape
    N = P + H * W
    x64 = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    w64 = torch.randn(C, 1, kh, kw, generator=gen, dtype=torch.float64) / (kh * kw) ** 0.5
    b64 = torch.randn(C, generator=gen, dtype=torch.float64) if has_bias else None
    g64 = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    if strided:
        x = torch.empty(B, N, 2 * C + 1, dtype=dtype, device=device)[:, :, 1::2]
        x.copy_(x64)
    else:
        x = x64.to(device, dtype)
    w = w64.to(device, dtype)
    b = None if b64 is None else b64.to(device, dtype)
    g = g64.to(device, dtype)
    leaves64 = [t.clone().requires_grad_() for t in (x64, w64) + ((b64,) if has_bias else ())]
    ref = peg_reference(leaves64[0], leaves64[1], leaves64[2] if has_bias else None, H, W, P)
    ref_grads = torch.autograd.grad(ref, leaves64, g64) if B > 0 else None
    tol = TOLERANCE[dtype]
    problems = []
    out = ck.fused_peg(x, w, b, (H, W), P, backend=backend)
    if rel_err(out, ref) > tol:
        problems.append(f"out err {rel_err(out, ref):.3g}")
    if B == 0:
        return problems
    for mask in MASKS:
        leaves = [x.detach().requires_grad_(mask[0]), w.detach().requires_grad_(mask[1])]
        if has_bias:
            leaves.append(b.detach().requires_grad_(mask[2]))
        out = ck.fused_peg(leaves[0], leaves[1], leaves[2] if has_bias else None, (H, W), P,
                           backend=backend)
        wanted = [i for i, t in enumerate(leaves) if t.requires_grad]
        if not wanted:
            continue
        grads = torch.autograd.grad(out, [leaves[i] for i in wanted], g)
        for i, gr in zip(wanted, grads):
            err = rel_err(gr, ref_grads[i])
            if err > tol:
                problems.append(f"grad {('x', 'weight', 'bias')[i]} mask {mask} err {err:.3g}")
    if device == "cuda":
        torch.cuda.synchronize()
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default=None,
                   help="comma-separated backends (default: cuda,triton, where a missing one "
                        "fails; cpu with --device cpu)")
    p.add_argument("--dtypes", default="float32,bfloat16,float16",
                   help="comma-separated dtypes (default float32,bfloat16,float16)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu only to try this script out on the cpu backend")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize_small: no CUDA device", file=sys.stderr)
        return 2
    requested = (args.backends or ("cuda,triton" if args.device == "cuda" else "cpu")).split(",")
    available = ck.available_backends(args.device)
    backends = [n for n in requested if n in available]
    skipped = [n for n in requested if n and n not in available]
    for n in skipped:
        why = ck.ops._unavailable_reason(n, args.device)
        print(f"sanitize_small: backend {n} unavailable: {why}")
    if not backends:
        print("sanitize_small: none of the requested backends is available", file=sys.stderr)
        return 1
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    gen = torch.Generator().manual_seed(0)
    failures, cases = [], 0
    for backend in backends:
        for dtype in dtypes:
            for shape in SHAPES:
                cases += 1
                problems = run_case(backend, dtype, shape, gen, args.device)
                status = "ok" if not problems else "MISMATCH: " + "; ".join(problems)
                print(f"{backend} {str(dtype).split('.')[-1]} {shape}: {status}", flush=True)
                if problems:
                    failures.append((backend, dtype, shape, problems))
    print(f"sanitize_small: {cases - len(failures)} of {cases} cases match the reference "
          f"(backends {', '.join(backends)})")
    return 1 if failures or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
