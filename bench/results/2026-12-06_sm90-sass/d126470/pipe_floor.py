"""Issue floor of the package's cp.async forward (CPVT_CUDA_KERNELS=pipe) on an H100, from its
sm_90 SASS: the busiest SM's warp instructions at 4 a cycle and 1.755 GHz, against the time of
the bytes (read x, write out) at 2967 GB/s.

Inputs read off the SASS of d126470 (bench/cuda_sass.py, and the common path of the row loop
counted by hand in pipe_sass.log): 96 registers; a step of 125 instructions (bfloat16, 4
channels of one column) or 109 (float32). A block is ceil(W) * CH / 4 threads, CH as the
launcher's pipe_channels picks it; the resident blocks an SM are what 64 Ki registers allow
(whole warps, 2048 threads at most); the grid is one wave; a block takes items (image, chunk)
in turn, H + 2 steps each.
"""
import math

SMS, CLOCK, ISSUE, BW = 132, 1.755e9, 4, 2967e9


def pipe_channels(C, W, elem, cv=4, cw=1):
    piece = 16 // elem
    ch = 256
    while ch >= piece and ch >= cv:
        if C % ch == 0 and ch % piece == 0 and ch % cv == 0 and -(-W // cw) * (ch // cv) <= 256:
            return ch
        ch //= 2
    return 0


def floor(B, C, H, elem, step, regs=96, P=1):
    W = H
    ch = pipe_channels(C, W, elem)
    threads = W * ch // 4
    warps = math.ceil(threads / 32)
    per_sm = min(65536 // (warps * 32 * regs), 2048 // (warps * 32), 32)
    items = B * (C // ch)
    grid = min(items, per_sm * SMS)
    per_block = math.ceil(items / grid)
    sm_items = min(per_sm, math.ceil(grid / SMS)) * per_block
    instr = sm_items * (H + 2) * warps * step
    us = instr / ISSUE / CLOCK * 1e6
    bytes_us = 2 * B * (P + H * W) * C * elem / BW * 1e6
    return ch, threads, per_sm, items, grid, per_block, us, bytes_us


print(f"{'shape':>12} {'dtype':>8} {'CH':>4} {'thr':>4} {'blk/SM':>6} {'items':>6} {'grid':>5} "
      f"{'it/blk':>6} {'floor us':>8} {'bytes us':>8} {'ratio':>6}")
for B, C, H in [(128, 192, 14), (128, 384, 14), (128, 768, 14), (64, 384, 24), (32, 768, 32)]:
    for name, elem, step in [("bfloat16", 2, 125), ("float32", 4, 109)]:
        ch, thr, per_sm, items, grid, pb, us, bus = floor(B, C, H, elem, step)
        print(f"{B}x{C}x{H:>2} {name:>8} {ch:>4} {thr:>4} {per_sm:>6} {items:>6} {grid:>5} "
              f"{pb:>6} {us:>8.1f} {bus:>8.1f} {us / bus:>6.2f}")
