"""Train a small CPVT on handwritten digits on a CPU, then test it at larger image sizes.

The paper's resolution claim, tested in miniature: a model whose positions come from a PEG
runs at any image size with no change, while a learnable absolute position embedding must be
interpolated (bicubically, as DeiT does). Each variant is trained the same way at one size
(same seed, data order, augmentation, schedule) and tested at that size and at larger ones,
with no retraining. The table reports what happens, whichever way it goes.

Data: scikit-learn's 8x8 handwritten digits (1797 images, shipped inside the package), split
80/20 with a fixed seed, upsampled bilinearly to the train size (16x16: an 8x8 grid of 2x2
patches) and to each test size (24x24, 32x32: 12x12 and 16x16 grids). Training augments
with random zooms and shifts, the counterpart of DeiT's random resized crops.

    python python/train_digits.py                          # train (a few minutes), print the table
    python python/train_digits.py --epochs 40 --save digits.pt
    python python/train_digits.py --eval digits.pt --eval-sizes 12,16,24,32,48 --peg-impl eager

Needs scikit-learn (``pip install scikit-learn``); shows a tqdm progress bar if tqdm is
installed, a plain one otherwise.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cpvt_kernels as ck  # noqa: E402
from cpvt_kernels.models import CPVT  # noqa: E402

SPLIT_SEED = 0
CHECKPOINT_VERSION = 1

# name -> CPVT options on top of the shared tiny transformer (see model_config)
VARIANTS = {
    "peg": dict(global_pool="token", peg_positions=(0,)),
    "peg-gap": dict(global_pool="avg", peg_positions=(0,)),
    "abs-pos": dict(global_pool="token", peg_positions=(), abs_pos_embed=True),
}
DESCRIPTIONS = {
    "peg": "CPVT: PEG after block 0, cls token",
    "peg-gap": "CPVT-GAP: PEG after block 0, GAP",
    "abs-pos": "DeiT: learnable abs. pos. embed",
}


def load_digits_split():
    """Train/test images ``(N, 1, 8, 8)`` in [0, 1] and labels, stratified 80/20."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("train_digits.py needs scikit-learn for its data set: pip install scikit-learn")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2,
                                           random_state=SPLIT_SEED, stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def resize(x8: torch.Tensor, size: int, mean: float, std: float) -> torch.Tensor:
    x = F.interpolate(x8, size=(size, size), mode="bilinear", align_corners=False)
    return (x - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: float, zoom: tuple) -> torch.Tensor:
    """Zoom each image by a factor in ``zoom`` and shift it by up to ``max_shift`` of its side.

    The digits' counterpart of DeiT's random resized crops: without some variation of scale,
    no model has a reason to work at another scale, whatever its position encoding.
    """
    B = x.shape[0]
    lo, hi = math.log(zoom[0]), math.log(zoom[1])
    scale = torch.exp(torch.rand(B, generator=gen) * (hi - lo) + lo)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = (torch.rand(B, 2, generator=gen) * 2 - 1) * 2 * max_shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.amin()
    return F.grid_sample(x - background, grid, align_corners=False) + background


def model_config(variant: str, args) -> dict:
    cfg = dict(img_size=args.train_size, patch_size=args.patch_size, in_chans=1, num_classes=10,
               embed_dim=args.dim, depth=args.depth, num_heads=args.heads, mlp_ratio=4.0,
               drop_path_rate=0.1, peg_impl=args.peg_impl, peg_backend=args.backend)
    cfg.update(VARIANTS[variant])
    return cfg


class Progress:
    """tqdm when installed, else a plain text bar redrawn in place."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
        except ImportError:
            self.bar = None
        self.total, self.desc, self.n, self.post = total, desc, 0, ""

    def update(self, postfix: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)
            return
        self.post = postfix
        if self.n == self.total or self.n % 10 == 0:
            done = 30 * self.n // self.total
            print(f"\r{self.desc} [{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total} "
                  f"{postfix}", end="", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print()


def param_groups(model, weight_decay: float):
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Norms, biases, tokens, pos_embed and PEGs get no decay, as in DeiT and CPVT.
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def train(model, x_train, y_train, args, desc: str) -> float:
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = min(steps_per_epoch * 2, total // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1))))
    bar = Progress(total, desc)
    model.train()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb, yb = augment(x_train[idx], gen, args.max_shift, args.zoom), y_train[idx]
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f}")
    bar.close()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model, x, y, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
    return correct / len(y)


def evaluate(models: dict, x_test8, y_test, mean: float, std: float, sizes) -> dict:
    """``{(variant, size): test accuracy}`` with the test images resized to each size."""
    results = {}
    for size in sizes:
        x = resize(x_test8, size, mean, std)
        for name, model in models.items():
            results[(name, size)] = accuracy(model, x, y_test)
    return results


def print_table(models: dict, results: dict, sizes, train_size: int, patch: int, n_test: int,
                train_seconds: dict | None = None) -> None:
    head = f"| {'model':<36} | {'params':>7} |"
    rule = f"|{'-' * 38}|{'-' * 8}:|"
    for s in sizes:
        tag = f"{s}x{s}" + (" train" if s == train_size else "")
        head += f" {tag:>11} |"
        rule += f"{'-' * 12}:|"
    if train_seconds:
        head += " train time |"
        rule += "-----------:|"
    print(f"\nTest accuracy ({n_test} images) by image size; grid = size/{patch} tokens per side; "
          f"trained at {train_size}x{train_size} only.")
    print(head)
    print(rule)
    for name, model in models.items():
        n = sum(p.numel() for p in model.parameters())
        row = f"| {DESCRIPTIONS[name]:<36} | {n:>7,} |"
        for s in sizes:
            row += f" {100 * results[(name, s)]:>10.2f}% |"
        if train_seconds:
            row += f" {train_seconds[name]:>9.0f}s |"
        print(row)


def parse_sizes(text: str, patch: int) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    bad = [s for s in sizes if s < patch or s % patch]
    if bad:
        raise SystemExit(f"--eval-sizes: every size must be a multiple of the patch size {patch}, "
                         f"got {bad}")
    return sizes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    p.add_argument("--variants", default="peg,peg-gap,abs-pos",
                   help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--train-size", type=int, default=16, help="training image side in pixels")
    p.add_argument("--eval-sizes", default="16,24,32", help="test image sides in pixels")
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-shift", type=float, default=0.125,
                   help="random shift, as a fraction of the image side")
    p.add_argument("--zoom", type=lambda t: tuple(float(v) for v in t.split(",")),
                   default=(0.8, 1.6), help="random zoom range 'min,max' (1,1: none)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--peg-impl", choices=("eager", "fused"), default="fused",
                   help="PEG implementation; checkpoints load into either")
    p.add_argument("--backend", default="auto", help="fused PEG backend")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default); the models are tiny, so one "
                        "thread is about as fast and leaves the other cores alone")
    p.add_argument("--save", metavar="PATH", help="save the trained models to PATH")
    p.add_argument("--eval", metavar="PATH", help="evaluate the models saved in PATH, no training")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    x_train8, y_train, x_test8, y_test = load_digits_split()
    if args.eval:
        ckpt = torch.load(args.eval, map_location="cpu", weights_only=True)
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise SystemExit(f"--eval: {args.eval} is not a train_digits.py checkpoint of "
                             f"version {CHECKPOINT_VERSION}")
        meta = ckpt["meta"]
        mean, std, train_size, patch = meta["mean"], meta["std"], meta["train_size"], meta["patch"]
        sizes = parse_sizes(args.eval_sizes, patch)
        models = {}
        for name, entry in ckpt["models"].items():
            cfg = dict(entry["config"], peg_impl=args.peg_impl, peg_backend=args.backend)
            models[name] = CPVT(**cfg)
            models[name].load_state_dict(entry["state_dict"])
        train_seconds = None
        print(f"Loaded {', '.join(models)} from {args.eval} (trained {meta['epochs']} epochs, "
              f"seed {meta['seed']}); PEG: {args.peg_impl}, backend {args.backend!r}")
    else:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"--variants: expected names from {list(VARIANTS)}, got {unknown}")
        if args.train_size % args.patch_size:
            raise SystemExit(f"--train-size must be a multiple of --patch-size "
                             f"{args.patch_size}, got {args.train_size}")
        train_size, patch = args.train_size, args.patch_size
        sizes = parse_sizes(args.eval_sizes, patch)
        x_tr = resize(x_train8, train_size, 0.0, 1.0)
        mean, std = x_tr.mean().item(), x_tr.std().item()
        x_tr = (x_tr - mean) / std
        print(f"digits: {len(y_train)} train / {len(y_test)} test images, trained at "
              f"{train_size}x{train_size} (patch {patch}), {args.epochs} epochs, seed {args.seed}, "
              f"PEG: {args.peg_impl}, backend {args.backend!r} "
              f"(available: {ck.available_backends('cpu')}), {torch.get_num_threads()} threads")
        models, train_seconds = {}, {}
        for name in variants:
            torch.manual_seed(args.seed)
            models[name] = CPVT(**model_config(name, args))
            train_seconds[name] = train(models[name], x_tr, y_train, args, name)
        if args.save:
            torch.save({
                "version": CHECKPOINT_VERSION,
                "meta": dict(mean=mean, std=std, train_size=train_size, patch=patch,
                             epochs=args.epochs, seed=args.seed, split_seed=SPLIT_SEED),
                "models": {n: dict(config=model_config(n, args), state_dict=m.state_dict())
                           for n, m in models.items()},
            }, args.save)
            print(f"saved {', '.join(models)} to {args.save}")

    results = evaluate(models, x_test8, y_test, mean, std, sizes)
    print_table(models, results, sizes, train_size, patch, len(y_test), train_seconds)


if __name__ == "__main__":
    main()
