"""Train a CPVT with the fused PEG under DistributedDataParallel, and check it against
single-process training on the same global batch.

    torchrun --nproc_per_node 2 python/train_ddp.py --check          # CPU, gloo
    torchrun --nproc_per_node 8 python/train_ddp.py --device cuda    # GPUs, NCCL

Each rank trains on its slice of every global batch (synthetic images and labels drawn from a
fixed seed, so every run sees the same data). With ``--check``, rank 0 then trains the same model
on the whole global batches in one process and compares every parameter; it prints the largest
difference and exits non-zero if they differ by more than ``--tol``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cpvt_kernels import models


def build_model(args, device):
    torch.manual_seed(args.seed)
    model = models.cpvt_tiny(num_classes=args.classes, img_size=args.img, patch_size=args.patch,
                             embed_dim=args.dim, depth=args.depth, num_heads=args.heads,
                             peg_impl="fused", peg_backend=args.backend)
    return model.to(device=device, dtype=torch.float64 if args.float64 else torch.float32)


def global_batches(args, device, dtype):
    g = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(args.steps):
        images = torch.randn(args.global_batch, 3, args.img, args.img, generator=g, dtype=dtype)
        labels = torch.randint(0, args.classes, (args.global_batch,), generator=g)
        yield images.to(device), labels.to(device)


def train(model, args, device, rank=0, world=1, show=True):
    dtype = next(model.parameters()).dtype
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    per_rank = args.global_batch // world
    for step, (images, labels) in enumerate(global_batches(args, device, dtype)):
        lo = rank * per_rank
        loss = loss_fn(model(images[lo:lo + per_rank]), labels[lo:lo + per_rank])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if show:
            print(f"[rank {rank}/{world}] step {step + 1}/{args.steps} loss {loss.item():.5f}",
                  flush=True)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default="auto", help="fused PEG backend")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--dim", type=int, default=48)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float64", action="store_true", help="train in float64")
    p.add_argument("--check", action="store_true",
                   help="compare with single-process training on rank 0")
    p.add_argument("--tol", type=float, default=1e-5, help="max relative parameter difference")
    p.add_argument("--save", default=None, help="rank 0 saves the trained state dict here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("train_ddp: --device cuda, but torch sees no CUDA device")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    if args.global_batch % world:
        sys.exit(f"train_ddp: --global-batch ({args.global_batch}) must be divisible by the "
                 f"number of processes ({world})")
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", "0"))) \
        if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)

    model = build_model(args, device)
    ddp = DDP(model, device_ids=[device.index] if args.device == "cuda" else None) \
        if world > 1 else model
    train(ddp, args, device, rank, world)
    status = 0
    if rank == 0:
        if args.save:
            torch.save(model.state_dict(), args.save)
        if args.check:
            single = train(build_model(args, device), args, device, show=False)
            worst = 0.0
            for (name, a), (_, b) in zip(model.named_parameters(), single.named_parameters()):
                scale = b.detach().abs().max().item() or 1.0
                worst = max(worst, (a.detach() - b.detach()).abs().max().item() / scale)
            ok = worst <= args.tol
            print(f"check: {world} processes vs 1 process on the same global batches: "
                  f"max relative parameter difference {worst:.3e} "
                  f"({'<=' if ok else '>'} {args.tol:g}) -> {'PASS' if ok else 'FAIL'}",
                  flush=True)
            status = 0 if ok else 1
    if world > 1:
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
