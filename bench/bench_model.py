#!/usr/bin/env python
"""Model benchmark: CPVT-Ti and CPVT-S with the eager and the fused PEG, images per second.

For each model, image size and precision it times, side by side in one process and with the
same weights:

    infer   forward of a batch in eval mode under torch.inference_mode()
    train   one training step: forward, cross-entropy, backward and an AdamW step

once with ``peg_impl="eager"`` (``cpvt_kernels.PEG``) and once with ``peg_impl="fused"``
(``FusedPEG``, ``--backend``, default the fastest for the device). The models use the paper's
configuration (one PEG after the first block, a cls token); ``--peg-positions 0-5`` puts a PEG
after each of the first six blocks, where the PEG's share of the time is larger.

Usage::

    python bench/bench_model.py --quick           # CPVT-Ti at 224 and 384, a few minutes on a CPU
    python bench/bench_model.py                   # CPVT-Ti and CPVT-S at 224 and 384
    python bench/bench_model.py --device cuda --batch 128 --precisions fp32,bf16

Writes ``model.csv`` and ``model.md`` to ``--out`` (default ``bench/results/<date>_<device>/``,
the folder of bench_peg.py's results) and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peg import (Samples, Timer, _fmt, add_allocator_arg,  # noqa: E402
                       cpu_load_warning, default_out_dir, faults_note, peak_memory_mib,
                       pick_device, run_metadata, setup_allocator)

import cpvt_kernels as ck  # noqa: E402
from cpvt_kernels import models  # noqa: E402

MODELS = {"tiny": models.cpvt_tiny, "small": models.cpvt_small, "base": models.cpvt_base}
LABELS = {"tiny": "CPVT-Ti", "small": "CPVT-S", "base": "CPVT-B"}
PRECISIONS = ("fp32", "bf16")  # bf16: torch.autocast(dtype=torch.bfloat16) around fp32 weights
CSV_FIELDS = ["date", "device", "device_type", "threads", "torch", "triton", "python", "cuda",
              "cpvt_kernels", "commit", "model", "img", "batch", "peg_positions", "mode",
              "precision", "impl", "backend", "median_ms", "p20_ms", "p80_ms", "reps",
              "images_per_s", "speedup_vs_eager", "peak_mem_mib", "faults_per_call", "max_rel_err",
              "status"]


def _positions(text: str) -> tuple[int, ...]:
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    try:
        values = tuple(range(int(m[1]), int(m[2]) + 1)) if m else tuple(
            int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < -1 or max(values) > 11 or len(set(values)) != len(values):
        raise SystemExit("--peg-positions: expected distinct block indices from -1 to 11 "
                         f"(0, 0-5 or 0,2,4), got {text!r}")
    return values


def build(name: str, impl: str, backend: str, positions, device, state=None):
    model = MODELS[name](peg_impl=impl, peg_backend=backend, num_classes=1000,
                         peg_positions=positions)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device)


def make_step(mode: str, model, images, labels, precision: str, device):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if mode == "infer":
        model.eval()

        def run():
            with torch.inference_mode(), autocast:
                model(images)
        return run
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run():
        with autocast:
            loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="CPVT models with the eager vs the fused PEG: "
                                            "images per second, inference and training step.")
    p.add_argument("--quick", action="store_true",
                   help="CPVT-Ti only, small batch (a few minutes on a 2-core CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--models", default=None, help="comma-separated: tiny,small,base "
                                                  "(default tiny,small; tiny with --quick)")
    p.add_argument("--sizes", default="224,384", help="image sizes (default 224,384)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per batch (default 64 on a GPU; on a CPU 8, or 4 with --quick)")
    p.add_argument("--modes", default="infer,train", help="comma-separated: infer,train")
    p.add_argument("--precisions", default=None,
                   help="fp32 and/or bf16 (autocast); default fp32 on CPU, fp32,bf16 on a GPU")
    p.add_argument("--backend", default="auto", help="backend of the fused PEG (default auto)")
    p.add_argument("--peg-positions", default="0",
                   help="blocks followed by a PEG: 0 (the paper's default), 0-5, or 0,2,4")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of samples per measurement (default 1 on CPU, 0.5 on a GPU)")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5, metavar="R",
                   help="rounds the samples of each configuration are taken in, alternating "
                        "between the eager and the fused model (default 5; 1: one after the "
                        "other)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads; default: PyTorch's choice)")
    add_allocator_arg(p)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def md_table(rows: list[dict], meta: dict, notes: list[str]) -> str:
    lines = [f"# CPVT model benchmark: {meta['device']}", "",
             f"- date {meta['date']}, commit {meta['commit']}",
             f"- torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}, "
             f"CUDA {meta['cuda']}, cpvt_kernels {meta['cpvt_kernels']}"
             + (f", {meta['threads']} CPU threads" if meta["threads"] != "" else "")]
    lines += [f"- {n}" for n in notes]
    lines += ["", "| model | img | batch | mode | precision | impl | backend | median ms | "
                  "p20-p80 ms | images/s | x eager | peak MiB | status |",
              "|---|--:|--:|---|---|---|---|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        spread = (f"{_fmt(r['p20_ms'], '.1f')}-{_fmt(r['p80_ms'], '.1f')}"
                  if r["median_ms"] not in ("", None) else "")
        lines.append(f"| {LABELS.get(r['model'], r['model'])} | {r['img']} | {r['batch']} | "
                     f"{r['mode']} | {r['precision']} | {r['impl']} | {r['backend']} | "
                     f"{_fmt(r['median_ms'], '.2f')} | {spread} | {_fmt(r['images_per_s'], '.1f')} "
                     f"| {_fmt(r['speedup_vs_eager'], '.3f')} | "
                     f"{_fmt(r['peak_mem_mib'], '.0f', '-')} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    on_gpu = device.type == "cuda"
    for flag, value in (("--threads", args.threads), ("--batch", args.batch),
                        ("--min-reps", args.min_reps), ("--rounds", args.rounds)):
        if value is not None and value < 1:
            raise SystemExit(f"{flag}: expected 1 or more, got {value}")
    if args.min_time is not None and not args.min_time > 0:
        raise SystemExit(f"--min-time: expected a number of seconds above 0, got {args.min_time}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    allocator = setup_allocator(args.keep_freed_memory, device)
    if on_gpu:
        torch.cuda.set_device(device)
    names = [s for s in (args.models or ("tiny" if args.quick else "tiny,small")).split(",") if s]
    for n in names:
        if n not in MODELS:
            raise SystemExit(f"--models: expected a subset of {tuple(MODELS)}, got {n!r}")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(s < 16 or s % 16 for s in sizes):
        raise SystemExit(f"--sizes: expected image sizes that are multiples of the patch size 16, "
                         f"got {args.sizes!r}")
    modes = [s for s in args.modes.split(",") if s]
    for m in modes:
        if m not in ("infer", "train"):
            raise SystemExit(f"--modes: expected infer and/or train, got {m!r}")
    precisions = [s for s in (args.precisions or ("fp32,bf16" if on_gpu else "fp32")).split(",")
                  if s]
    for pr in precisions:
        if pr not in PRECISIONS:
            raise SystemExit(f"--precisions: expected fp32 and/or bf16, got {pr!r}")
    batch = args.batch or (64 if on_gpu else (4 if args.quick else 8))
    positions = _positions(args.peg_positions)
    backend = ck.ops.resolve_backend(args.backend, device.type)
    min_time = args.min_time or (0.5 if on_gpu else 1.0)
    timer = Timer(device, min_time, args.min_reps)
    rounds = args.rounds
    out_dir = args.out or default_out_dir(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = run_metadata(device)
    notes = [f"fused PEG backend: {backend}; PEG after block(s) {list(positions)}; "
             f"1000 classes; random images",
             "infer: eval mode, torch.inference_mode(); train: forward, cross-entropy, backward, "
             "AdamW step; images/s = batch / median time"
             + (f"; the samples taken in {rounds} rounds alternating between the eager and the "
                "fused model" if rounds > 1 else ""),
             "bf16: torch.autocast(dtype=torch.bfloat16) over float32 weights",
             "peak MiB: " + ("torch.cuda.max_memory_allocated during one step, beyond what was "
                             "allocated before it" if on_gpu else "not measured on CPU")]
    if allocator:
        notes.append(allocator)
    load = cpu_load_warning(device)
    if load:
        print(f"warning: {load}")
        notes.append(load)
    print(f"device: {meta['device']}  torch {meta['torch']}  commit {meta['commit']}  "
          f"fused backend: {backend}")
    if backend == "reference":
        print("warning: no fused backend runs here; 'fused' is the reference backend")

    configs = [(n, s, pr, m) for n in names for s in sizes for pr in precisions for m in modes]
    total = len(configs) * 2
    rows, failures, done = [], [], 0
    csv_path = out_dir / "model.csv"
    t_start = time.perf_counter()
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for name, size, precision, mode in configs:
            gen = torch.Generator().manual_seed(size)
            images = torch.randn(batch, 3, size, size, generator=gen).to(device)
            labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
            torch.manual_seed(0)
            state = MODELS[name](num_classes=1000, peg_positions=positions).state_dict()
            rows_of, timed, logits = {}, {}, {}
            prefixes = {}

            def fail(impl, e):
                msg = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                failures.append(f"{prefixes[impl]} {msg}")
                print(f"{prefixes[impl]} {msg}", flush=True)
                rows_of[impl].update({k: "" for k in CSV_FIELDS if k not in rows_of[impl]})
                rows_of[impl]["status"] = msg
                timed.pop(impl, None)

            for impl in ("eager", "fused"):
                done += 1
                row = dict(meta)
                row.update({"model": name, "img": size, "batch": batch,
                            "peg_positions": " ".join(map(str, positions)), "mode": mode,
                            "precision": precision, "impl": impl,
                            "backend": backend if impl == "fused" else "eager",
                            "status": "ok"})
                rows_of[impl] = row
                prefixes[impl] = (f"[{done}/{total}] {LABELS[name]} {size}px {mode} {precision} "
                                  f"batch {batch} {impl}:")
                try:
                    model = build(name, impl, backend, positions, device, state)
                    if mode == "infer":
                        with torch.inference_mode(), torch.autocast(
                                device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                            logits[impl] = model.eval()(images).float()
                    step = make_step(mode, model, images, labels, precision, device)
                    timed[impl] = (step, *timer.calibrate(step), Samples([], []))
                except Exception as e:
                    fail(impl, e)
            # The samples of the two models are taken in rounds that alternate between them
            # (each round starting with the other), so that a slow period of the host falls on
            # both alike and the ratio stays steady.
            order = list(timed)
            for r in range(rounds):
                for impl in order[r % len(order):] + order[:r % len(order)]:
                    if impl not in timed:
                        continue
                    step, reps, per_call, samples = timed[impl]
                    n = reps // rounds + (r < reps % rounds)
                    try:
                        if n:
                            samples.extend(timer.sample(step, n, per_call, warm=rounds > 1))
                    except Exception as e:
                        fail(impl, e)
            for impl in order:
                if impl not in timed:
                    continue
                step, _, _, samples = timed[impl]
                try:
                    peak = peak_memory_mib(device, step)
                except Exception as e:
                    fail(impl, e)
                    continue
                stats = samples.stats()
                ips = batch / (stats.median_ms * 1e-3)
                rows_of[impl].update({
                    "median_ms": f"{stats.median_ms:.4f}", "p20_ms": f"{stats.p20_ms:.4f}",
                    "p80_ms": f"{stats.p80_ms:.4f}", "reps": stats.reps,
                    "images_per_s": f"{ips:.2f}", "peak_mem_mib": _fmt(peak, ".1f"),
                    "faults_per_call": _fmt(stats.faults_per_call, ".4g"),
                    "speedup_vs_eager": "", "max_rel_err": ""})
                print(f"{prefixes[impl]} {stats.median_ms:.1f} ms ({stats.p20_ms:.1f}-"
                      f"{stats.p80_ms:.1f}) {ips:.1f} images/s", flush=True)
            timed = model = step = None  # both models freed before the next configuration
            if on_gpu:
                torch.cuda.empty_cache()
            group = [rows_of["eager"], rows_of["fused"]]
            if len(logits) == 2:
                ref = logits["eager"]
                err = ((logits["fused"] - ref).abs().max() / ref.abs().max()).item()
                group[1]["max_rel_err"] = f"{err:.3g}"
                # bfloat16 rounds differently inside the two PEGs and the difference grows
                # through the following blocks, so only float32 logits must agree closely.
                tol = 1e-3 if precision == "fp32" else 1e-1
                if not err <= tol:
                    msg = f"logits differ from the eager model's: max rel err {err:.3g} > {tol:g}"
                    if precision == "fp32":
                        print(f"PARITY FAILURE: {LABELS[name]} {size}px {precision}: {msg}",
                              file=sys.stderr)
                        group[1]["status"] = "parity failure"
                        failures.append(f"{LABELS[name]} {size}px {precision}: {msg}")
                    else:
                        print(f"warning: {LABELS[name]} {size}px {precision}: {msg}",
                              file=sys.stderr)
            if all(r["median_ms"] not in ("", None) for r in group) and len(group) == 2:
                group[1]["speedup_vs_eager"] = \
                    f"{float(group[0]['median_ms']) / float(group[1]['median_ms']):.4f}"
                group[0]["speedup_vs_eager"] = "1.0000"
            writer.writerows(group)
            f.flush()
            rows += group
    faults = faults_note(rows, lambda r: f"{LABELS[r['model']]} {r['img']}px {r['mode']} "
                                         f"{r['precision']} {r['impl']}")
    if faults:
        notes.append(faults)
    md = md_table(rows, meta, notes)
    (out_dir / "model.md").write_text(md)
    print()
    print(md)
    print(f"wrote {csv_path}, {out_dir / 'model.md'}  ({time.perf_counter() - t_start:.0f} s)")
    if failures:
        print(f"\n{len(failures)} FAILED:", file=sys.stderr)
        for msg in failures:
            print("  " + msg, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
