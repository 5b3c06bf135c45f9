"""Issue floors of the package's cp.async kernels (CPVT_CUDA_KERNELS=pipe) on an H100, from
their sm_90 SASS: the busiest SM's warp instructions at 4 a cycle and 1.755 GHz, against the
time of the bytes at 2967 GB/s (forward: read x, write out; backward: read grad_out and x,
write grad_x).

Inputs read off the SASS (pipe_sass.log: the common path of the row loop): the forward 96
registers and a step of 125 instructions in bfloat16 (109 in float32); the bfloat16 backward
144 registers and 221 (a364184; 250 at 9726a45). A block is W * CH / 4 threads, CH as the launcher's
pipe_channels picks it; the resident blocks an SM are what 64 Ki registers allow (whole warps,
2048 threads at most); the grid is one wave (for the backward, a multiple of the chunks); a
block takes items (image, chunk) in turn, H + 2 steps each in the forward and H + 3 in the
backward.
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


def floor(B, C, H, elem, step, regs, backward, P=1):
    W = H
    ch = pipe_channels(C, W, elem)
    warps = math.ceil(W * ch // 4 / 32)
    per_sm = min(65536 // (warps * 32 * math.ceil(regs / 8) * 8), 2048 // (warps * 32), 32)
    chunks = C // ch
    items = B * chunks
    grid = min(items, per_sm * SMS)
    if backward:
        grid = max(chunks, grid // chunks * chunks)
    per_block = math.ceil(items / grid)
    sm_items = min(per_sm, math.ceil(grid / SMS)) * per_block
    instr = sm_items * (H + (3 if backward else 2)) * warps * step
    us = instr / ISSUE / CLOCK * 1e6
    bytes_us = (3 if backward else 2) * B * (P + H * W) * C * elem / BW * 1e6
    return ch, W * ch // 4, per_sm, items, grid, per_block, us, bytes_us


print("# NVIDIA H100 model (132 SMs, 4 warp instructions a cycle each at 1.755 GHz, copy at "
      "2967 GB/s: the 2026-12-05 run); instruction counts and registers from the sm_90 SASS "
      "of a364184 (nvcc 13.0, pipe_sass.log); arithmetic only, nothing timed")
print(f"{'shape':>12} {'pass':>13} {'CH':>4} {'thr':>4} {'blk/SM':>6} {'items':>6} {'grid':>5} "
      f"{'it/blk':>6} {'floor us':>8} {'bytes us':>8} {'ratio':>6}")
for B, C, H in [(128, 192, 14), (128, 384, 14), (128, 768, 14), (64, 384, 24), (32, 768, 32)]:
    for name, elem, step, regs, bwd in [("fwd bfloat16", 2, 125, 96, False),
                                        ("fwd float32", 4, 109, 96, False),
                                        ("bwd bfloat16", 2, 221, 144, True)]:
        ch, thr, per_sm, items, grid, pb, us, bus = floor(B, C, H, elem, step, regs, bwd)
        print(f"{B}x{C}x{H:>2} {name:>13} {ch:>4} {thr:>4} {per_sm:>6} {items:>6} {grid:>5} "
              f"{pb:>6} {us:>8.1f} {bus:>8.1f} {us / bus:>6.2f}")
