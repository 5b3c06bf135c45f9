"""Self-check of an installed cpvt_kernels: is every backend on this device correct?

    python -m cpvt_kernels.selfcheck                  # the default device: the GPU if any, else CPU
    python -m cpvt_kernels.selfcheck --device cpu     # the CPU backends of a GPU machine

For every backend that ``cpvt_kernels.available_backends(device)`` lists it runs

- gradcheck: ``torch.autograd.gradcheck`` in float64 on two tiny shapes (with and without bias);
- opcheck: ``torch.library.opcheck`` of the backend's registered forward and backward ops (the
  C++ ops for ``cpu`` and ``cuda``, the Triton ops for ``triton`` on a GPU); ``-`` where the
  backend has no op of its own (``reference``, Triton through its CPU interpreter);
- parity: output and gradients against the float64 reference (``peg_reference``) in float32 and
  bfloat16 (and float16 on a GPU) over three shapes, one of them a strided ``x``, within the
  tolerances in the README's "Using it";

and prints one line per backend with a clear PASS or FAIL. The exit status is 0 only if every
backend passed and at least one fused backend runs on the device.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
import time
import traceback

import torch

import cpvt_kernels as ck
from cpvt_kernels import ops
from cpvt_kernels.reference import peg_reference

# The README's tolerances ("Using it"): max |out - ref| / max |ref| against the float64
# reference.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (B, P, H, W, C, kh, kw, bias, strided x)
GRADCHECK_SHAPES = [(2, 1, 3, 4, 3, 3, 3, True, False), (1, 0, 3, 3, 2, 3, 5, False, True)]
PARITY_SHAPES = [(4, 1, 14, 14, 64, 3, 3, True, False),
                 (3, 0, 5, 7, 19, 7, 7, True, False),
                 (2, 2, 6, 5, 33, 3, 5, False, True)]
# The ops each backend registers, checked with torch.library.opcheck.
OPS = {"cpu": ("peg_forward", "peg_backward"), "cuda": ("peg_forward", "peg_backward"),
       "triton": ("peg_forward_triton", "peg_backward_triton")}


def _inputs(shape, dtype, device, gen, requires_grad=False):
    B, P, H, W, C, kh, kw, bias, strided = shape
    N = P + H * W
    if strided:
        x64 = torch.randn(B, N, 2 * C + 1, generator=gen, dtype=torch.float64)[:, :, 1::2]
    else:
        x64 = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    w64 = torch.randn(C, 1, kh, kw, generator=gen, dtype=torch.float64) / (kh * kw) ** 0.5
    b64 = torch.randn(C, generator=gen, dtype=torch.float64) if bias else None
    if strided:
        x = torch.empty(B, N, 2 * C + 1, dtype=dtype, device=device)[:, :, 1::2]
        x.copy_(x64)
    else:
        x = x64.to(device=device, dtype=dtype)
    w = w64.to(device=device, dtype=dtype)
    b = None if b64 is None else b64.to(device=device, dtype=dtype)
    for t in (x, w, b):
        if t is not None and requires_grad:
            t.requires_grad_()
    return (x64, w64, b64), (x, w, b)


def _rel_err(a, ref) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if a.shape != ref.shape:
        return float("inf")
    denom = ref.abs().max().item() if ref.numel() else 0.0
    diff = (a - ref).abs().max().item() if a.numel() else 0.0
    return diff / denom if denom > 0 else diff


def check_gradcheck(backend: str, device: str, gen) -> str | None:
    """None if gradcheck passes, else why not."""
    for shape in GRADCHECK_SHAPES:
        B, P, H, W = shape[:4]
        _, (x, w, b) = _inputs(shape, torch.float64, device, gen, requires_grad=True)
        args = (x, w) if b is None else (x, w, b)

        def fn(x, w, b=None):
            return ck.fused_peg(x, w, b, (H, W), P, backend=backend)

        try:
            torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)
        except Exception as e:
            return f"gradcheck {shape[:7]}: {type(e).__name__}: {str(e).strip()[:300]}"
    return None


def check_opcheck(backend: str, device: str, gen) -> str | None:
    """None if opcheck passes, "-" if the backend has no op of its own here, else why not."""
    if backend not in OPS or (backend == "triton" and device != "cuda"):
        return "-"
    fwd_name, bwd_name = OPS[backend]
    try:
        fwd = getattr(torch.ops.cpvt, fwd_name).default
        bwd = getattr(torch.ops.cpvt, bwd_name).default
    except (AttributeError, RuntimeError) as e:
        return f"op cpvt::{fwd_name} or cpvt::{bwd_name} is not registered: {e}"
    for shape in GRADCHECK_SHAPES:
        B, P, H, W = shape[:4]
        for dtype in (torch.float32, torch.float64):
            _, (x, w, b) = _inputs(shape, dtype, device, gen, requires_grad=True)
            g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device=device,
                                                                          dtype=dtype)
            try:
                torch.library.opcheck(fwd, (x, w, b, H, W, P))
                torch.library.opcheck(bwd, (g, x.detach(), w.detach(), H, W, P,
                                            [True, True, b is not None]))
            except Exception as e:
                return (f"opcheck {fwd_name}/{bwd_name} {dtype} {shape[:7]}: "
                        f"{type(e).__name__}: {str(e).strip()[:300]}")
    return None


def check_parity(backend: str, device: str, gen) -> tuple[str | None, float]:
    """(None or why not, the largest error relative to its tolerance)."""
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    worst = 0.0
    for shape in PARITY_SHAPES:
        B, P, H, W = shape[:4]
        for dtype in dtypes:
            (x64, w64, b64), (x, w, b) = _inputs(shape, dtype, device, gen, requires_grad=True)
            leaves64 = [t.clone().requires_grad_() for t in (x64, w64, b64) if t is not None]
            ref = peg_reference(leaves64[0], leaves64[1], leaves64[2] if b64 is not None else None,
                                H, W, P)
            g64 = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
            ref_grads = torch.autograd.grad(ref, leaves64, g64)
            leaves = [t for t in (x, w, b) if t is not None]
            try:
                out = ck.fused_peg(x, w, b, (H, W), P, backend=backend)
                grads = torch.autograd.grad(out, leaves, g64.to(device=device, dtype=dtype))
            except Exception as e:
                return f"{dtype} {shape[:7]}: {type(e).__name__}: {str(e).strip()[:300]}", worst
            tol = TOLERANCE[dtype]
            for what, a, r in zip(("out", "grad_x", "grad_weight", "grad_bias"),
                                  (out,) + tuple(grads), (ref,) + tuple(ref_grads)):
                err = _rel_err(a, r)
                worst = max(worst, err / tol)
                if not err <= tol:
                    return (f"{what} {dtype} {shape[:7]}: max rel err {err:.3g} > {tol:g}",
                            worst)
    return None, worst


def _cell(result: str | None) -> str:
    return "-" if result == "-" else ("pass" if result is None else "FAIL")


def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo names it (shared with the benchmarks)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def dist_version(dist: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cpvt_kernels.selfcheck",
                                description="Check every available PEG backend on this device: "
                                            "gradcheck, opcheck and parity with the reference.")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if a GPU is available, else cpu")
    p.add_argument("--backends", default=None,
                   help="comma-separated subset of the available backends (default: all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random inputs")
    args = p.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("selfcheck: --device cuda, but no CUDA device is available", file=sys.stderr)
        return 2
    available = ck.available_backends(device)
    if args.backends:
        wanted = [s.strip().lower() for s in args.backends.split(",") if s.strip()]
        missing = [n for n in wanted if n not in available]
        if missing:
            reasons = [f"{n}: {ops._unavailable_reason(n, device)}" if n in ops.BACKENDS
                       else f"{n}: unknown backend, expected one of {ops.BACKENDS}"
                       for n in missing]
            print(f"selfcheck: --backends {missing} cannot run on {device}: "
                  + "; ".join(reasons), file=sys.stderr)
            return 2
        backends = wanted
    else:
        backends = available
    seed = args.seed if args.seed is not None else int(time.time()) % 2**31

    where = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    print(f"cpvt_kernels {ck.__version__} selfcheck on {device} ({where})")
    print(f"  torch {torch.__version__}, triton {dist_version('triton')}, python "
          f"{sys.version.split()[0]}, seed {seed}")
    if ops._EXT_ERROR is not None:
        extension = f"NOT loaded ({ops._EXT_ERROR})"
    elif ops.HAS_CPU_KERNELS:
        arch = ops._build_record("CPU_ARCH") or "(not recorded)"
        extension = f"loaded, CPU kernels for CPVT_CPU_ARCH={arch}"
    else:
        extension = "loaded, no CPU kernels"
    print(f"  package {ck.__file__.rsplit('/', 1)[0]}; extension: {extension}")
    unavailable = [(n, ops._unavailable_reason(n, device)) for n in ops.BACKENDS
                   if n not in available]
    print()

    rows, details = [], []
    for name in backends:
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        results = {}
        for check, fn in (("gradcheck", check_gradcheck), ("opcheck", check_opcheck)):
            try:
                results[check] = fn(name, device, gen)
            except Exception:
                results[check] = traceback.format_exc(limit=3).strip()
        try:
            results["parity"], worst = check_parity(name, device, gen)
        except Exception:
            results["parity"], worst = traceback.format_exc(limit=3).strip(), float("nan")
        ok = all(r in (None, "-") for r in results.values())
        parity_cell = _cell(results["parity"])
        if results["parity"] is None:
            parity_cell += f" ({worst:.2f} of tol)"
        rows.append((name, _cell(results["gradcheck"]), _cell(results["opcheck"]), parity_cell,
                     "PASS" if ok else "FAIL", f"{time.perf_counter() - t0:.1f} s"))
        for check, r in results.items():
            if r not in (None, "-"):
                details.append(f"{name} {check}: {r}")

    header = ("backend", "gradcheck", "opcheck", "parity", "result", "time")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths)] + rows:
        print(" | ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    print()
    for name, why in unavailable:
        print(f"not available on {device}: {name}: {why}")
    for d in details:
        print(f"FAIL {d}")

    fused = [n for n in available if n != "reference"]
    failed = [r[0] for r in rows if r[4] != "PASS"]
    if not fused:
        print(f"FAIL: no fused backend runs on {device}; see the reasons above")
        return 1
    if failed:
        print(f"FAIL: {len(failed)} of {len(rows)} backend(s) failed: {', '.join(failed)}")
        return 1
    print(f"PASS: all {len(rows)} backend(s) passed on {device}: {', '.join(n for n, *_ in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
