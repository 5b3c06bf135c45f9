#!/usr/bin/env python
"""Block-size sweep of the Triton PEG kernels: device time of each (BLOCK_T, BLOCK_C, num_warps).

The ``triton`` backend picks its block sizes with ``forward_config`` / ``backward_config`` in
``cpvt_kernels/triton_peg.py``. This program times the kernels themselves (no op, autograd or
module around them) for every candidate configuration on the given shapes, checks each result
against the float64 reference, and prints the best configurations per shape and pass, so that
the heuristic can be set from measurements on a GPU::

    python bench/tune_triton.py --shapes 128x384x14 128x768x14 --dtypes bfloat16
    python bench/tune_triton.py --shapes 32x192x14 --passes fwd --quick
    python bench/tune_triton.py --kernels stream    # the streaming 3x3 kernels' blocks

With ``--kernels stream`` the candidates are ``BLOCK_WxBLOCK_CxWARPS`` of the streaming kernels
(pixels of a row by channels; ``stream_config`` in ``cpvt_kernels/triton_peg.py`` picks the
default from a model of the busiest SM's work), each with the strip height and the persistent
programs per SM that model gives that block (the kernel's warp budget over its warps), or with
every ``--rh`` (rows a strip), ``--per-sm`` (programs per SM, 0 for one program per item) and
``--prefetch`` value (rows loaded ahead: 0, 1, 2; see ``--prefetch``)::

    python bench/tune_triton.py --kernels stream --quick --per-sm 0 6 12 --rh 7 14 --prefetch 0 1

Times are those of ``bench_peg.Timer``: CUDA events, the L2 flushed and the GPU held busy until
the launch is queued, so they are device time. GB/s counts the least a PEG moves (fwd 2S, bwd 3S,
``S = B * (P + H*W) * C * itemsize``), "% copy" divides it by the copy bandwidth measured at the
start. The backward is timed with every gradient wanted (its two launches: the fused kernel and
the reduction of the partial sums). Writes ``tune.csv`` to ``--out`` (default
``bench/results/<date>_<device>/tune-triton``).

On a CPU it runs through Triton's interpreter (``TRITON_INTERPRET=1``, set here before Triton is
imported): only to try the program out, the times mean nothing there.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import time
import zlib
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peg  # noqa: E402  (puts the source tree on sys.path when it is built in place)

from cpvt_kernels import triton_peg  # noqa: E402

PASSES = ("fwd", "bwd")
# Candidates: (BLOCK_T, BLOCK_C, num_warps). The full grid, and a smaller one for --quick.
FWD_GRID = [(t, c, w) for t, c, w in itertools.product((8, 16, 32, 64), (32, 64, 128), (2, 4, 8))
            if 256 <= t * c <= 4096 and 2 <= t * c // (32 * w) <= 16]
BWD_GRID = [(t, c, w) for t, c, w in itertools.product((32, 64, 128, 256), (16, 32, 64),
                                                       (4, 8, 16))
            if 1024 <= t * c <= 8192 and 2 <= t * c // (32 * w) <= 16]
QUICK_FWD = [(16, 64, 4), (16, 64, 8), (32, 64, 8), (8, 128, 4), (16, 128, 8)]
QUICK_BWD = [(128, 16, 8), (128, 16, 16), (64, 32, 8), (128, 32, 8), (256, 16, 16)]
# The streaming kernels: (BLOCK_W, BLOCK_C, num_warps), 2 to 16 elements of a tile a thread.
STREAM_GRID = [(t, c, w) for t, c, w in itertools.product((1, 2, 4, 8, 16, 32),
                                                          (16, 32, 64, 128), (1, 2, 4, 8))
               if 2 <= t * c // (32 * w) <= 16]
# Quick: blocks of 2 to 32 pixels (W = 14 fits blocks of 2 without idle warps, W = 24 of 8),
# four elements a thread.
QUICK_STREAM_FWD = [(2, 64, 1), (2, 128, 2), (8, 64, 4), (16, 64, 8), (32, 32, 8)]
QUICK_STREAM_BWD = [(16, 32, 4), (8, 64, 4), (4, 128, 4), (2, 128, 2), (32, 16, 4)]
CSV_FIELDS = ["date", "device", "torch", "triton", "commit", "kernels", "pass", "dtype", "B", "C",
              "H", "W", "P", "k", "BLOCK_T", "BLOCK_W", "BLOCK_C", "num_warps", "RH", "PER_SM",
              "PREFETCH",
              "default",
              "median_ms", "p20_ms", "p80_ms", "gbps", "frac_copy", "max_rel_err", "status"]


def parse_config(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected BLOCK_TxBLOCK_CxWARPS, e.g. 16x64x4, "
                                         f"got {text!r}")
    t, c, w = map(int, parts)
    for name, v in (("BLOCK_T", t), ("BLOCK_C", c), ("num_warps", w)):
        if v & (v - 1):
            raise argparse.ArgumentTypeError(f"{name} must be a power of two, got {v}")
    return t, c, w


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["128x384x14", "128x768x14"],
                   metavar="BxCxH[xW]", help="shapes (default: CPVT-S and CPVT-B, 224 px, B=128)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], metavar="DTYPE")
    p.add_argument("--prefix-tokens", type=int, default=1, metavar="P")
    p.add_argument("--kernel-size", type=int, default=3, metavar="K")
    p.add_argument("--passes", default="fwd,bwd", metavar="fwd,bwd")
    p.add_argument("--kernels", choices=("tile", "stream"), default="tile",
                   help="the tiled kernels (default) or the streaming 3x3 ones; their "
                        "candidates are BLOCK_WxBLOCK_CxWARPS")
    p.add_argument("--quick", action="store_true", help="5 candidates per pass instead of all")
    p.add_argument("--per-sm", nargs="+", type=int, default=None, metavar="N",
                   help="streaming kernels: persistent programs per SM to try with each block "
                        "candidate (0: one program per item; default: the model's for the "
                        "block)")
    p.add_argument("--rh", nargs="+", type=int, default=None, metavar="ROWS",
                   help="streaming kernels: rows a strip to try with each block candidate "
                        "(0 or by default: the model's for the block)")
    p.add_argument("--prefetch", nargs="+", type=int, default=None, choices=(0, 1, 2),
                   help="streaming kernels: rows loaded ahead, to try with each block "
                        "candidate (0: none; 1: the forward's rows one iteration ahead, the "
                        "backward's grad_out rows; 2: the forward's two ahead, the backward's "
                        "x rows too; default: the model's)")
    p.add_argument("--fwd-configs", nargs="+", type=parse_config, default=None,
                   metavar="TxCxW", help="forward candidates instead of the built-in grid")
    p.add_argument("--bwd-configs", nargs="+", type=parse_config, default=None,
                   metavar="TxCxW", help="backward candidates instead of the built-in grid")
    p.add_argument("--min-time", type=float, default=0.05, metavar="SECONDS",
                   help="seconds of samples per configuration (default 0.05)")
    p.add_argument("--min-reps", type=int, default=3, metavar="N",
                   help="fewest samples per configuration (default 3)")
    p.add_argument("--top", type=int, default=5, help="configurations printed per case")
    p.add_argument("--out", type=Path, default=None, metavar="DIR")
    return p.parse_args(argv)


def as_cfg(t: int, c: int, w: int, default: dict, per_sm: int | None = None,
           rh: int | None = None, model=None, prefetch: int | None = None) -> dict:
    """Candidate (t, c, w) in the form of ``default``: BLOCK_T, or for the streaming kernels
    BLOCK_W with ``rh`` rows a strip, ``per_sm`` programs per SM and ``prefetch``, each else
    (``rh`` 0 or None, the others None) the model's for that block (``model(block)``:
    ``stream_config``; its programs per SM scaled to the candidate's warps, so that the SM holds
    as many warps)."""
    if "BLOCK_W" in default:
        m = model((t, c))
        fit = max(1, m["PER_SM"] * m["num_warps"] // w)
        return {"BLOCK_W": t, "BLOCK_C": c, "num_warps": w, "RH": rh or m["RH"],
                "PER_SM": fit if per_sm is None else per_sm,
                "PREFETCH": m["PREFETCH"] if prefetch is None else prefetch}
    return {"BLOCK_T": t, "BLOCK_C": c, "num_warps": w}


def key(cfg: dict) -> tuple[int, ...]:
    k = (cfg.get("BLOCK_T", cfg.get("BLOCK_W")), cfg["BLOCK_C"], cfg["num_warps"])
    return k + (cfg["PER_SM"], cfg["RH"], cfg["PREFETCH"]) if "PER_SM" in cfg else k


def stream_model(pass_name: str, case, x):
    """block -> the streaming kernel's geometry for ``block`` on this device (stream_config)."""
    tp = triton_peg
    sms = tp._device_sms(x.device)
    return lambda block=None: tp.stream_config(pass_name, case.H, case.W, case.C, case.B, sms,
                                               x.element_size(), block)


def runner(kernels: str, pass_name: str, case, x, w, b, g):
    """(default configuration, run(cfg) -> outputs) of one kernel family and pass."""
    tp = triton_peg
    if kernels == "stream":
        default = stream_model(pass_name, case, x)()
        if pass_name == "fwd":
            return (default,
                    lambda cfg: (tp.launch_stream_forward(x, w, b, case.H, case.W, case.P, False,
                                                          cfg),))
        return (default,
                lambda cfg: tp.launch_stream_backward(g, x, w, case.H, case.W, case.P,
                                                      (True, True, True), cfg))
    if pass_name == "fwd":
        return (tp.forward_config(case.N, case.C),
                lambda cfg: (tp.launch_forward(x, w, b, case.H, case.W, case.P, cfg),))
    return (tp.backward_config(case.N, case.C),
            lambda cfg: tp.launch_backward(g, x, w, case.H, case.W, case.P, (True, True, True),
                                           cfg))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = bench_peg.pick_device(None)
    on_gpu = device.type == "cuda"
    passes = [s for s in args.passes.split(",") if s]
    for s in passes:
        if s not in PASSES:
            raise SystemExit(f"--passes: expected a subset of {PASSES}, got {s!r}")
    try:
        dtypes = [bench_peg.DTYPE_NAMES[d.lower()] for d in args.dtypes]
        cases = [c for s in args.shapes
                 for c in bench_peg.parse_shape(s, [args.prefix_tokens], [args.kernel_size])]
    except (KeyError, argparse.ArgumentTypeError) as e:
        raise SystemExit(f"tune_triton: {e}")
    if args.kernels == "stream":
        if args.kernel_size != 3:
            raise SystemExit("tune_triton: the streaming kernels are 3x3 (--kernel-size 3)")
        grids = {"fwd": args.fwd_configs or (QUICK_STREAM_FWD if args.quick else STREAM_GRID),
                 "bwd": args.bwd_configs or (QUICK_STREAM_BWD if args.quick else STREAM_GRID)}
    else:
        grids = {"fwd": args.fwd_configs or (QUICK_FWD if args.quick else FWD_GRID),
                 "bwd": args.bwd_configs or (QUICK_BWD if args.quick else BWD_GRID)}
    timer = bench_peg.Timer(device, args.min_time, max(1, args.min_reps), flush_cache=on_gpu)
    copy_gbps, _ = bench_peg.copy_bandwidth(device, timer)
    meta = bench_peg.run_metadata(device)
    out_dir = args.out or bench_peg.default_out_dir(device) / "tune-triton"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"device: {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"commit {meta['commit']}")
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s"
          + ("" if on_gpu else "  (Triton's interpreter on a CPU: the times mean nothing)"))
    rows, failed = [], 0
    t_start = time.perf_counter()
    for case, dtype in itertools.product(cases, dtypes):
        gen = torch.Generator().manual_seed(zlib.crc32(f"{case}{dtype}".encode()))
        x = torch.randn(case.B, case.N, case.C, generator=gen).to(device, dtype)
        w = (torch.randn(case.C, 1, case.k, case.k, generator=gen) / case.k).to(device, dtype)
        b = torch.randn(case.C, generator=gen).to(device, dtype)
        g = torch.randn(case.B, case.N, case.C, generator=gen).to(device, dtype)
        S = case.B * case.N * case.C * x.element_size()
        tol = bench_peg.TOLERANCE[dtype]
        for pass_name in passes:
            default, run = runner(args.kernels, pass_name, case, x, w, b, g)
            if pass_name == "fwd":
                ref = bench_peg.reference_outputs(case, x, [x, w, b], g, False)[:1]
            else:
                ref = bench_peg.reference_outputs(case, x, [x, w, b], g, True)[1]
            stream = args.kernels == "stream"
            per_sms = args.per_sm if stream and args.per_sm else [None]
            rhs = args.rh if stream and args.rh else [None]
            prefetches = args.prefetch if stream and args.prefetch else [None]
            model = stream_model(pass_name, case, x) if stream else None
            configs = [default]
            for c in grids[pass_name]:
                for p, rh, pf in itertools.product(per_sms, rhs, prefetches):
                    cfg = as_cfg(*c, default, p, rh, model, pf)
                    if all(key(cfg) != key(o) for o in configs):
                        configs.append(cfg)
            case_rows = []
            for cfg in configs:
                row = dict(meta, **{"kernels": args.kernels, "pass": pass_name,
                                    "dtype": bench_peg.SHORT[dtype],
                                    "B": case.B, "C": case.C, "H": case.H, "W": case.W,
                                    "P": case.P, "k": case.k, "default": cfg is default},
                           **cfg)
                try:
                    err = max(bench_peg.rel_err(a, r) for a, r in zip(run(cfg), ref))
                    row["max_rel_err"] = f"{err:.3g}"
                    if not err <= tol:
                        raise RuntimeError(f"parity failure ({err:.2g} > {tol:g})")
                    stats = timer(lambda: run(cfg))
                except Exception as e:  # a configuration that fails must not stop the sweep
                    row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    failed += 1
                    print(f"{pass_name} {bench_peg.SHORT[dtype]} {case.label()} "
                          f"{key(cfg)}: {row['status']}", flush=True)
                    case_rows.append(row)
                    continue
                gbps = (2 if pass_name == "fwd" else 3) * S / (stats.median_ms * 1e-3) / 1e9
                row.update({"median_ms": f"{stats.median_ms:.6g}", "p20_ms": f"{stats.p20_ms:.6g}",
                            "p80_ms": f"{stats.p80_ms:.6g}", "gbps": f"{gbps:.6g}",
                            "frac_copy": f"{gbps / copy_gbps:.5g}", "status": "ok"})
                case_rows.append(row)
            rows += case_rows
            ok = sorted((r for r in case_rows if r["status"] == "ok"),
                        key=lambda r: float(r["median_ms"]))
            base = next((r for r in case_rows if r["default"] and r["status"] == "ok"), None)
            print(f"\n{pass_name} {bench_peg.SHORT[dtype]} {case.label()}: {len(ok)} of "
                  f"{len(case_rows)} configurations ran; default {key(default)}"
                  + (f" {float(base['median_ms']):.4f} ms" if base else " failed"))
            print(f"  {'BLOCK_W' if args.kernels == 'stream' else 'BLOCK_T'} BLOCK_C warps"
                  + (" per_sm  RH pf" if args.kernels == "stream" else "")
                  + "   median ms   GB/s  % copy  x default")
            for r in ok[:args.top]:
                speed = (f"{float(base['median_ms']) / float(r['median_ms']):.2f}"
                         if base else "-")
                print(f"  {r.get('BLOCK_T', r.get('BLOCK_W')):>7} {r['BLOCK_C']:>7} "
                      f"{r['num_warps']:>5} "
                      + (f"{r['PER_SM']:>6} {r['RH']:>3} {r['PREFETCH']:>2} "
                         if "PER_SM" in r else "")
                      + f"{float(r['median_ms']):>11.4f} {float(r['gbps']):>6.0f} "
                      f"{float(r['frac_copy']):>7.0%} {speed:>10}"
                      + ("  (default)" if r["default"] else ""), flush=True)
    with open(out_dir / "tune.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {out_dir / 'tune.csv'}  ({time.perf_counter() - t_start:.0f} s)")
    if failed:
        print(f"{failed} configuration(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
