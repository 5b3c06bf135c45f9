"""Triton forward and backward kernels of the fused PEG, their launchers and their registration.

Layout: tokens are channel-last, ``x[b, n, c]`` with ``n < P`` the prefix tokens and
``n = P + h*W + w`` the grid. A program owns a tile of ``BLOCK_T`` consecutive tokens by
``BLOCK_C`` channels of one image. Tiles run over all ``N = P + H*W`` tokens, so the prefix
tokens are copied by the same launch: for them the convolution term is masked to zero.
Zero padding comes from load masks on the row and column of each tap.

Backward (one pass over ``grad_out`` and ``x``)::

    grad_x[h, w]       = grad_out[h, w] + sum_ij weight[i, j] * grad_out[h - i + ph, w - j + pw]
    grad_weight[c, i, j] = sum_bhw grad_out[h, w, c] * x[h + i - ph, w + j - pw, c]
    grad_bias[c]         = sum_bhw grad_out[h, w, c]

Each program writes its tile's partial sums of ``grad_weight`` and ``grad_bias`` to a
``(tiles, kh*kw + 1, C)`` buffer; a second kernel sums them over tiles in a fixed order, so the
gradients are bitwise reproducible (no atomics). Where that buffer would pass
``CPVT_TRITON_PARTIALS_BYTES`` (large kernels), the images run in waves, each wave's sums added
to the earlier ones' in the same order (:func:`_partial_waves`).

With ``CPVT_TRITON_KERNELS=stream`` (read at each call; default ``tile``), 3x3 kernels run on
streaming kernels instead: a program walks strips of rows of BLOCK_W pixels by BLOCK_C
channels, loads each input row once per strip and keeps the output rows it feeds in registers
(see the section "Streaming kernels" below). They are not yet timed on a GPU.

Multiply-adds are written ``acc + x * w`` and left to the compiler to contract into FMAs, as
Triton does by default up to 3.9; where it would not (``TRITON_DEFAULT_FP_FUSION=0``, the
default from 3.10), the forwards' taps and the streaming kernels' sums are written as ``tl.fma``
instead (:func:`explicit_fma`).

The ops are registered with ``torch.library.triton_op`` as ``cpvt::peg_forward_triton`` and
``cpvt::peg_backward_triton``, so ``torch.compile(fullgraph=True)`` traces into the kernels.
Importing this module raises ImportError when Triton cannot be used.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
from typing import Optional, Sequence

import torch

from . import _autograd, _checks

try:
    import triton
    import triton.language as tl
except Exception as e:  # a broken install can raise anything; callers expect ImportError
    raise ImportError(f"triton could not be imported: {type(e).__name__}: {e}") from e


def _triton_version() -> tuple:
    m = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return (int(m[1]), int(m[2])) if m else (0, 0)


# The oldest Triton the kernels are tested with; older ones are refused. Triton 3.2's
# interpreter, for one, stores out of bounds in the partial-sum reduction and crashes.
MIN_TRITON = (3, 6)
if _triton_version() < MIN_TRITON:
    _need = ".".join(map(str, MIN_TRITON))
    raise ImportError(f"the triton backend needs triton >= {_need}, got triton "
                      f"{triton.__version__}: install torch >= 2.11, which brings triton 3.6, "
                      f"or `pip install 'triton>={_need}'`")

if not (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")):
    raise ImportError(f"the triton backend needs torch.library.triton_op (torch >= 2.6), "
                      f"got torch {torch.__version__}")


def _wrap(kernel):
    """``torch.library.wrap_triton(kernel)``, which lets ``torch.compile`` trace the launch. Under
    Triton's interpreter (``TRITON_INTERPRET=1``) ``triton.jit`` gives an interpreted function,
    which torch before 2.13 refuses to wrap (later versions hand it back as it is); it is
    launched directly then, as those versions do."""
    if not isinstance(kernel, triton.runtime.JITFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


# Taps are unrolled at compile time up to these sizes and looped over at run time beyond: the
# loads of all unrolled taps are in flight at once, which is fast for small kernels but makes
# large ones spill registers and compile slowly (a fully unrolled 7x7 backward takes ~50 s to
# compile for sm_90 against ~1.5 s with the row loop; 31 unrolled columns spill).
_MAX_UNROLLED_TAPS = 9  # kernels up to 3x3: every tap unrolled
_MAX_UNROLLED_COLS = 9  # larger kernels: rows looped, columns unrolled up to this width


# ---------------------------------------------------------------------------------------------
# Kernels

@triton.jit
def _madd(acc, a, b, FMA: tl.constexpr):
    """acc + a * b: one tl.fma with FMA, else left to the compiler to contract (see
    :func:`explicit_fma`)."""
    if FMA:
        r = tl.fma(a, b, acc)
    else:
        r = acc + a * b
    return r


@triton.jit
def _fwd_tap(acc, x_base, w_ptr, n64, col, row_ok, c, c_ok, c_off, i, j, W, sxn, sw0, sw2, sw3,
             KH: tl.constexpr, KW: tl.constexpr, FMA: tl.constexpr):
    di = i - KH // 2
    dj = j - KW // 2
    cc = col + dj
    ok = row_ok & (cc >= 0) & (cc < W)
    wv = tl.load(w_ptr + c * sw0 + i * sw2 + j * sw3, mask=c_ok, other=0.0)
    src = (n64 + (di * W + dj)) * sxn
    xv = tl.load(x_base + src[:, None] + c_off[None, :], mask=ok[:, None] & c_ok[None, :],
                 other=0.0)
    return _madd(acc, xv.to(acc.dtype), wv.to(acc.dtype)[None, :], FMA)


@triton.jit
def _fwd_row(acc, x_base, w_ptr, n64, row, col, is_grid, c, c_ok, c_off,
             i, H, W, sxn, sw0, sw2, sw3, KH: tl.constexpr, KW: tl.constexpr,
             UNROLL_COLS: tl.constexpr, FMA: tl.constexpr):
    rr = row + (i - KH // 2)
    row_ok = is_grid & (rr >= 0) & (rr < H)
    if UNROLL_COLS:
        for j in tl.static_range(KW):
            acc = _fwd_tap(acc, x_base, w_ptr, n64, col, row_ok, c, c_ok, c_off, i, j, W,
                           sxn, sw0, sw2, sw3, KH, KW, FMA)
    else:
        for j in range(KW):
            acc = _fwd_tap(acc, x_base, w_ptr, n64, col, row_ok, c, c_ok, c_off, i, j, W,
                           sxn, sw0, sw2, sw3, KH, KW, FMA)
    return acc


@triton.jit
def _channel_block(HUGE_C: tl.constexpr):
    """The program's block of channels: grid axis 1; with HUGE_C (see :func:`_huge_channels`)
    continued on axis 2, and 64-bit, so that the channels' products with the kernel size stay
    exact."""
    cb = tl.program_id(1)
    if HUGE_C:
        cb = cb.to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    return cb


@triton.jit
def _tile_block(N, C, W, P, tiles_per_image, image0, BLOCK_T: tl.constexpr,
                BLOCK_C: tl.constexpr, HUGE_C: tl.constexpr):
    """Tiled program pid's image b, tokens n (64-bit: n64) and channels c with their masks, and
    each token's grid row and column (0 for the prefix tokens, which is_grid leaves out). The
    launch's first program takes the first tile of image image0."""
    pid = tl.program_id(0)
    b = image0 + pid // tiles_per_image
    tile = pid % tiles_per_image
    n = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    c = _channel_block(HUGE_C) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_ok = n < N
    c_ok = c < C
    t = n - P
    is_grid = n_ok & (t >= 0)
    t = tl.where(is_grid, t, 0)
    # 64-bit offsets: B * N * C may exceed 2**31.
    return pid, b.to(tl.int64), n.to(tl.int64), c, c_ok, is_grid, t // W, t % W, \
        n_ok[:, None] & c_ok[None, :]


@triton.jit
def _peg_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr,
                    N, C, H, W, P, tiles_per_image,
                    sxb, sxn, sxc, sw0, sw2, sw3, sb,
                    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                    IS_F64: tl.constexpr, UNROLL: tl.constexpr, UNROLL_COLS: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HUGE_C: tl.constexpr,
                    FMA: tl.constexpr):
    if HUGE_C:
        C = C.to(tl.int64)
    _, b64, n64, c, c_ok, is_grid, row, col, mask = _tile_block(N, C, W, P, tiles_per_image, 0,
                                                                BLOCK_T, BLOCK_C, HUGE_C)
    c_off = c.to(tl.int64) * sxc
    x_base = x_ptr + b64 * sxb
    center = tl.load(x_base + (n64 * sxn)[:, None] + c_off[None, :], mask=mask, other=0.0)

    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float64 if IS_F64 else tl.float32)
    if UNROLL:
        for i in tl.static_range(KH):
            acc = _fwd_row(acc, x_base, w_ptr, n64, row, col, is_grid, c, c_ok, c_off,
                           i, H, W, sxn, sw0, sw2, sw3, KH, KW, True, FMA)
    else:
        for i in range(KH):
            acc = _fwd_row(acc, x_base, w_ptr, n64, row, col, is_grid, c, c_ok, c_off,
                           i, H, W, sxn, sw0, sw2, sw3, KH, KW, UNROLL_COLS, FMA)
    if HAS_BIAS:
        bv = tl.load(b_ptr + c * sb, mask=c_ok, other=0.0)
        acc += bv.to(acc.dtype)[None, :]
    # where, not a multiply: a NaN weight must not leak into the prefix tokens.
    acc = tl.where(is_grid[:, None], acc, 0.0)
    out = center.to(acc.dtype) + acc
    out_off = (b64 * N + n64)[:, None] * C + c[None, :]
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tap(gacc, g_base, x_base, w_ptr, part_ptr, part_row, g_grid, n64, col, grow_ok,
             xrow_ok, c, c_ok, gc_off, xc_off, i, j, C, W, sgn, sxn, sw0, sw2, sw3,
             KH: tl.constexpr, KW: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr):
    dj = j - KW // 2
    delta = (i - KH // 2) * W + dj
    if NEED_X:
        # grad_x[row, col] takes grad_out from (row - di, col - dj): the flipped kernel.
        cg = col - dj
        ok = grow_ok & (cg >= 0) & (cg < W)
        wv = tl.load(w_ptr + c * sw0 + i * sw2 + j * sw3, mask=c_ok, other=0.0)
        gv = tl.load(g_base + ((n64 - delta) * sgn)[:, None] + gc_off[None, :],
                     mask=ok[:, None] & c_ok[None, :], other=0.0)
        # Taps outside the grid are skipped, not multiplied by a zero: they stand for outputs
        # that do not exist, and an Inf or NaN tap times zero would be NaN (the reference's
        # gradient has no such term).
        gacc += tl.where(ok[:, None], gv.to(gacc.dtype) * wv.to(gacc.dtype)[None, :], 0.0)
    if NEED_W:
        cx = col + dj
        ok = xrow_ok & (cx >= 0) & (cx < W)
        xv = tl.load(x_base + ((n64 + delta) * sxn)[:, None] + xc_off[None, :],
                     mask=ok[:, None] & c_ok[None, :], other=0.0)
        part = tl.sum(g_grid * xv.to(g_grid.dtype), axis=0)
        tl.store(part_ptr + part_row + (i * KW + j) * C + c, part, mask=c_ok)
    return gacc


@triton.jit
def _bwd_row(gacc, g_base, x_base, w_ptr, part_ptr, part_row, g_grid,
             n64, row, col, is_grid, c, c_ok, gc_off, xc_off,
             i, C, H, W, sgn, sxn, sw0, sw2, sw3,
             KH: tl.constexpr, KW: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr,
             UNROLL_COLS: tl.constexpr):
    di = i - KH // 2
    grow_ok = is_grid & (row - di >= 0) & (row - di < H)
    xrow_ok = is_grid & (row + di >= 0) & (row + di < H)
    if UNROLL_COLS:
        for j in tl.static_range(KW):
            gacc = _bwd_tap(gacc, g_base, x_base, w_ptr, part_ptr, part_row, g_grid, n64, col,
                            grow_ok, xrow_ok, c, c_ok, gc_off, xc_off, i, j, C, W, sgn, sxn,
                            sw0, sw2, sw3, KH, KW, NEED_X, NEED_W)
    else:
        for j in range(KW):
            gacc = _bwd_tap(gacc, g_base, x_base, w_ptr, part_ptr, part_row, g_grid, n64, col,
                            grow_ok, xrow_ok, c, c_ok, gc_off, xc_off, i, j, C, W, sgn, sxn,
                            sw0, sw2, sw3, KH, KW, NEED_X, NEED_W)
    return gacc


# image0 and num_tiles vary from one wave to the next: not specialized (on 1, or on multiples of
# 16), so that the waves share one compiled kernel.
@triton.jit(do_not_specialize=["image0"])
def _peg_bwd_kernel(g_ptr, x_ptr, w_ptr, gx_ptr, part_ptr,
                    N, C, H, W, P, tiles_per_image, image0,
                    sgb, sgn, sgc, sxb, sxn, sxc, sw0, sw2, sw3,
                    KH: tl.constexpr, KW: tl.constexpr,
                    NEED_X: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                    IS_F64: tl.constexpr, UNROLL: tl.constexpr, UNROLL_COLS: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HUGE_C: tl.constexpr):
    if HUGE_C:
        C = C.to(tl.int64)
    pid, b64, n64, c, c_ok, is_grid, row, col, mask = _tile_block(N, C, W, P, tiles_per_image,
                                                                  image0, BLOCK_T, BLOCK_C, HUGE_C)
    gc_off = c.to(tl.int64) * sgc
    xc_off = c.to(tl.int64) * sxc
    g_base = g_ptr + b64 * sgb
    x_base = x_ptr + b64 * sxb
    ACC: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    g_center = tl.load(g_base + (n64 * sgn)[:, None] + gc_off[None, :], mask=mask,
                       other=0.0).to(ACC)
    # Only grid tokens contribute to grad_weight and grad_bias.
    g_grid = tl.where(is_grid[:, None], g_center, 0.0)
    part_row = pid.to(tl.int64) * ((KH * KW + 1) * C)

    gacc = tl.zeros([BLOCK_T, BLOCK_C], dtype=ACC)
    if NEED_X or NEED_W:
        if UNROLL:
            for i in tl.static_range(KH):
                gacc = _bwd_row(gacc, g_base, x_base, w_ptr, part_ptr, part_row, g_grid,
                                n64, row, col, is_grid, c, c_ok, gc_off, xc_off,
                                i, C, H, W, sgn, sxn, sw0, sw2, sw3, KH, KW, NEED_X, NEED_W,
                                True)
        else:
            for i in range(KH):
                gacc = _bwd_row(gacc, g_base, x_base, w_ptr, part_ptr, part_row, g_grid,
                                n64, row, col, is_grid, c, c_ok, gc_off, xc_off,
                                i, C, H, W, sgn, sxn, sw0, sw2, sw3, KH, KW, NEED_X, NEED_W,
                                UNROLL_COLS)
    if NEED_B:
        tl.store(part_ptr + part_row + (KH * KW) * C + c, tl.sum(g_grid, axis=0), mask=c_ok)
    if NEED_X:
        gx = g_center + tl.where(is_grid[:, None], gacc, 0.0)
        gx_off = (b64 * N + n64)[:, None] * C + c[None, :]
        tl.store(gx_ptr + gx_off, gx.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_tiles"])
def _reduce_partials_kernel(part_ptr, gw_ptr, gb_ptr, keep_ptr, num_tiles, C,
                            KK: tl.constexpr, ROW0: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HUGE_C: tl.constexpr,
                            FIRST: tl.constexpr, LAST: tl.constexpr):
    # Row r of the partials (r < KK: tap r of grad_weight; r == KK: grad_bias), summed over
    # tiles in a fixed order: the same inputs give bitwise the same result on every run. Tile t
    # goes to row t % BLOCK_R of the sums, which are added up at the end. In waves (not FIRST,
    # not LAST) those BLOCK_R rows start from and go back to keep_ptr's (KK + 1, BLOCK_R, C);
    # a wave's first tile is a multiple of BLOCK_R, so the sums are the same as in one pass.
    r = tl.program_id(0) + ROW0
    c = _channel_block(HUGE_C) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    rows = tl.arange(0, BLOCK_R)
    keep_off = (r.to(tl.int64) * BLOCK_R + rows)[:, None] * C + c[None, :]
    if FIRST:
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=part_ptr.dtype.element_ty)
    else:
        acc = tl.load(keep_ptr + keep_off, mask=c_ok[None, :], other=0.0)
    # A while loop: triton 3.6's interpreter cannot take a run-time bound in range().
    t0 = 0
    while t0 < num_tiles:
        tiles = t0 + rows
        off = (tiles.to(tl.int64) * (KK + 1) + r)[:, None] * C + c[None, :]
        acc += tl.load(part_ptr + off, mask=(tiles < num_tiles)[:, None] & c_ok[None, :],
                       other=0.0)
        t0 += BLOCK_R
    if LAST:
        total = tl.sum(acc, axis=0)
        tl.store(gw_ptr + c * KK + r, total.to(gw_ptr.dtype.element_ty),
                 mask=c_ok & _rows_in(r, 0, KK, c_ok))
        tl.store(gb_ptr + c, total.to(gb_ptr.dtype.element_ty),
                 mask=c_ok & _rows_in(r, KK, KK + 1, c_ok))
    else:
        tl.store(keep_ptr + keep_off, acc, mask=c_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Streaming kernels for 3x3 (CPVT_TRITON_KERNELS=stream)
#
# An item is BLOCK_W pixels of a row by BLOCK_C channels over a strip of rows of one image; a
# program walks down the strip of each of its items. Each input row is loaded once per strip as
# three tiles (columns w - 1, w, w + 1; the two shifted ones overlap the centre one, so they
# mostly hit L1) and feeds the three output rows it belongs to, held in registers: 3 loads per
# row instead of 9 taps' loads per output. An output row is stored as soon as its last input row
# has been added. The backward walks grad_out the same way for grad_x and sums the weight and
# bias gradients of all its items in registers, reducing over the pixels once at the end (one
# slot of partials per program).
#
# The programs are persistent: one wave of them, at most PER_SM an SM over all channel blocks
# (_stream_slots; blocks, strips and PER_SM from stream_config), and program p takes the items
# p, p + slots, ... of its channel block, so the taps (36 scalar half-word loads a thread in the
# 16-bit types: a channel's taps are 9 elements apart) and the end-of-strip reductions are paid
# once per program rather than once per item.
# The streaming CUDA forward gained 1.3-1.5x from the same change on an H100
# (bench/results/2026-12-05_nvidia-h100); these Triton ones have not run on a GPU.

@triton.jit
def _stream_taps(w_ptr, c, c_ok, sw0, sw2, sw3, FLIP: tl.constexpr, ACC: tl.constexpr):
    """The nine taps of channels c as (1, BLOCK_C) rows, flipped for the input gradient."""
    base = w_ptr + c * sw0
    if FLIP:
        base = base + 2 * sw2 + 2 * sw3
        s2 = -sw2
        s3 = -sw3
    else:
        s2 = sw2
        s3 = sw3
    t00 = tl.load(base, mask=c_ok, other=0.0).to(ACC)[None, :]
    t01 = tl.load(base + s3, mask=c_ok, other=0.0).to(ACC)[None, :]
    t02 = tl.load(base + 2 * s3, mask=c_ok, other=0.0).to(ACC)[None, :]
    t10 = tl.load(base + s2, mask=c_ok, other=0.0).to(ACC)[None, :]
    t11 = tl.load(base + s2 + s3, mask=c_ok, other=0.0).to(ACC)[None, :]
    t12 = tl.load(base + s2 + 2 * s3, mask=c_ok, other=0.0).to(ACC)[None, :]
    t20 = tl.load(base + 2 * s2, mask=c_ok, other=0.0).to(ACC)[None, :]
    t21 = tl.load(base + 2 * s2 + s3, mask=c_ok, other=0.0).to(ACC)[None, :]
    t22 = tl.load(base + 2 * s2 + 2 * s3, mask=c_ok, other=0.0).to(ACC)[None, :]
    return t00, t01, t02, t10, t11, t12, t20, t21, t22


@triton.jit
def _rows_in(r, lo, hi, m):
    """Where lo <= r < hi (r a scalar), as a block of m's shape. The row becomes a block before
    it is compared: triton 3.9's interpreter splats a scalar comparison into int32 values, which
    it then refuses as a mask. Compiled, the kernel is the same either way."""
    rb = tl.broadcast_to(r, m.shape)
    return (rb >= lo) & (rb < hi)


@triton.jit
def _stream_masks(r, lo, hi, m_l, m_c, m_r):
    """The load masks of columns w - 1, w, w + 1 of row r, off unless lo <= r < hi."""
    rv = _rows_in(r, lo, hi, m_c)
    return m_l & rv, m_c & rv, m_r & rv


@triton.jit
def _stream_load(row_ptr, off, ml, mc, mr, sn):
    """A row at columns w - 1, w, w + 1 as stored (zero where masked off)."""
    vl = tl.load(row_ptr + off - sn, mask=ml, other=0.0)
    vc = tl.load(row_ptr + off, mask=mc, other=0.0)
    vr = tl.load(row_ptr + off + sn, mask=mr, other=0.0)
    return vl, vc, vr


@triton.jit
def _stream_row(row_ptr, off, r, H, m_l, m_c, m_r, sn, ACC: tl.constexpr):
    """Row r of an image at columns w - 1, w, w + 1 (zero outside the image) and its masks."""
    ml, mc, mr = _stream_masks(r, 0, H, m_l, m_c, m_r)
    vl, vc, vr = _stream_load(row_ptr, off, ml, mc, mr, sn)
    return vl.to(ACC), vc.to(ACC), vr.to(ACC), ml, mc, mr


@triton.jit
def _stream_add(acc, t0, t1, t2, vl, vc, vr, ml, mc, mr, SKIP_PAD: tl.constexpr,
                FMA: tl.constexpr):
    """acc + t0 * vl + t1 * vc + t2 * vr, the taps on padding skipped when SKIP_PAD (an Inf or
    NaN tap must not meet the zero of a pixel that does not exist) and multiplied otherwise."""
    if SKIP_PAD:
        acc += tl.where(ml, t0 * vl, 0.0)
        acc += tl.where(mc, t1 * vc, 0.0)
        acc += tl.where(mr, t2 * vr, 0.0)
    else:
        acc = _madd(acc, t0, vl, FMA)
        acc = _madd(acc, t1, vc, FMA)
        acc = _madd(acc, t2, vr, FMA)
    return acc


@triton.jit
def _stream_block(pid, wblocks, strips, rh, H, W, c_ok, BLOCK_W: tl.constexpr):
    """Conv program pid's image b, rows h0 .. h1 - 1, pixels wc and the load masks of columns
    w - 1, w and w + 1."""
    wblk = pid % wblocks
    t = pid // wblocks
    b = t // strips
    h0 = (t % strips) * rh
    h1 = tl.minimum(h0 + rh, H)
    wc = wblk * BLOCK_W + tl.arange(0, BLOCK_W)
    w_ok = wc < W
    cm = c_ok[None, :]
    m_l = (w_ok & (wc >= 1))[:, None] & cm
    m_c = w_ok[:, None] & cm
    m_r = ((wc + 1) < W)[:, None] & cm
    return b, h0, h1, wc, m_l, m_c, m_r


@triton.jit
def _stream_source(ptr, b, wc, c, P, sb, sn, sc):
    """The grid rows of image b of a token tensor (row r at ``base + r * W * sn``) and the
    offsets of pixels wc, channels c in a row."""
    base = ptr + b.to(tl.int64) * sb + tl.cast(P, tl.int64) * sn
    return base, wc.to(tl.int64)[:, None] * sn + (c.to(tl.int64) * sc)[None, :]


@triton.jit
def _stream_dest(ptr, b, wc, c, N, C, P):
    """The same for a new contiguous (B, N, C) tensor."""
    return ptr + (b.to(tl.int64) * N + P) * C, wc.to(tl.int64)[:, None] * C + c[None, :]


@triton.jit
def _grid_row(base, r, W, sn, ROW64: tl.constexpr):
    """Row r of a grid whose rows are W * sn elements apart (r may be -2 .. H + 2): 32-bit
    offsets, as one multiply-add a row, unless ROW64 (see :func:`_stream_row64`)."""
    if ROW64:
        p = base + r.to(tl.int64) * W * sn
    else:
        p = base + r * (W * sn)
    return p


@triton.jit
def _stream_add_rows(acc_p, acc_c, acc_n, t00, t01, t02, t10, t11, t12, t20, t21, t22,
                     vl, vc, vr, ml, mc, mr, SKIP_PAD: tl.constexpr, FMA: tl.constexpr):
    """The three tap rows of one input row into output rows r + 1, r and r - 1."""
    acc_n = _stream_add(acc_n, t00, t01, t02, vl, vc, vr, ml, mc, mr, SKIP_PAD, FMA)
    acc_c = _stream_add(acc_c, t10, t11, t12, vl, vc, vr, ml, mc, mr, SKIP_PAD, FMA)
    acc_p = _stream_add(acc_p, t20, t21, t22, vl, vc, vr, ml, mc, mr, SKIP_PAD, FMA)
    return acc_p, acc_c, acc_n


@triton.jit
def _stream_nonfinite(t00, t01, t02, t10, t11, t12, t20, t21, t22):
    """Whether one of the block's taps is Inf or NaN (then t * 0 is NaN)."""
    z = t00 * 0 + t01 * 0 + t02 * 0 + t10 * 0 + t11 * 0 + t12 * 0 + t20 * 0 + t21 * 0 + t22 * 0
    return tl.sum(z) != 0  # NaN != 0


@triton.jit
def _stream_out_row(acc_p, acc_c, acc_n, init, t00, t01, t02, t10, t11, t12, t20, t21, t22,
                    vl, vc, vr, ml, mc, mr, out, out_off, r, h0, h1, W, C, m_c,
                    SKIP_PAD: tl.constexpr, nonfinite, ROW64: tl.constexpr,
                    FMA: tl.constexpr):
    """Input row r into output rows r + 1 (tap row 0), r (tap row 1 and the centre input) and
    r - 1 (tap row 2); stores row r - 1, now complete, if it is one of the strip's. Returns the
    accumulators of rows r, r + 1 and r + 2. With SKIP_PAD the taps on padding are skipped only
    where it matters, when the block has a non-finite tap (nonfinite, one flag for the block: a
    branch, not a select per element); finite taps times the padding's zeros add nothing."""
    if SKIP_PAD:
        if nonfinite:
            acc_p, acc_c, acc_n = _stream_add_rows(acc_p, acc_c, acc_n, t00, t01, t02, t10, t11,
                                                   t12, t20, t21, t22, vl, vc, vr, ml, mc, mr,
                                                   True, FMA)
        else:
            acc_p, acc_c, acc_n = _stream_add_rows(acc_p, acc_c, acc_n, t00, t01, t02, t10, t11,
                                                   t12, t20, t21, t22, vl, vc, vr, ml, mc, mr,
                                                   False, FMA)
    else:
        acc_p, acc_c, acc_n = _stream_add_rows(acc_p, acc_c, acc_n, t00, t01, t02, t10, t11, t12,
                                               t20, t21, t22, vl, vc, vr, ml, mc, mr, False,
                                               FMA)
    acc_c += vc
    ro = r - 1
    tl.store(_grid_row(out, ro, W, C, ROW64) + out_off, acc_p.to(out.dtype.element_ty),
             mask=_rows_in(ro, h0, h1, m_c) & m_c)
    return acc_c, acc_n, init


@triton.jit
def _stream_prefix(src_ptr, out_ptr, b, N, C, P, ssb, ssn, ssc, c, c_ok,
                   BLOCK_P: tl.constexpr):
    """out[b, :P] = src[b, :P] for channels c, BLOCK_P tokens at a time."""
    p0 = 0
    while p0 < P:
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p < P)[:, None] & c_ok[None, :]
        v = tl.load(src_ptr + b.to(tl.int64) * ssb + p.to(tl.int64)[:, None] * ssn
                    + (c.to(tl.int64) * ssc)[None, :], mask=m, other=0.0)
        tl.store(out_ptr + (b.to(tl.int64) * N + p.to(tl.int64))[:, None] * C + c[None, :], v,
                 mask=m)
        p0 += BLOCK_P


@triton.jit
def _peg_stream3_fwd_kernel(src_ptr, w_ptr, b_ptr, out_ptr,
                            N, C, H, W, P, strips, rh, wblocks, items, slots,
                            ssb, ssn, ssc, sw0, sw2, sw3, sb,
                            HAS_BIAS: tl.constexpr, FLIP: tl.constexpr, IS_F64: tl.constexpr,
                            ROW64: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_W: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FMA: tl.constexpr):
    """The forward (FLIP false: taps as they are, bias, padding multiplied like the other
    kernels) or the input gradient alone (FLIP: flipped taps over grad_out, no bias, taps on
    padding skipped); both add the centre input (the residual / grad_out itself).

    Programs pid < slots each walk the strips ``pid, pid + slots, ...`` of the ``items`` (image,
    strip, pixel block) of their channel block, loading the taps and the bias once; the programs
    after them copy the prefix tokens of one image each."""
    ACC: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    pid = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if pid < slots:
        t00, t01, t02, t10, t11, t12, t20, t21, t22 = _stream_taps(w_ptr, c, c_ok, sw0, sw2,
                                                                   sw3, FLIP, ACC)
        nonfinite = False
        if FLIP:
            nonfinite = _stream_nonfinite(t00, t01, t02, t10, t11, t12, t20, t21, t22)
        init = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
        if HAS_BIAS:
            init += tl.load(b_ptr + c * sb, mask=c_ok, other=0.0).to(ACC)[None, :]
        # While loops: triton 3.6's interpreter cannot take a run-time bound in range().
        item = pid
        while item < items:
            b, h0, h1, wc, m_l, m_c, m_r = _stream_block(item, wblocks, strips, rh, H, W, c_ok,
                                                          BLOCK_W)
            src, off = _stream_source(src_ptr, b, wc, c, P, ssb, ssn, ssc)
            out, out_off = _stream_dest(out_ptr, b, wc, c, N, C, P)
            # Output rows r - 1, r and r + 1 while input row r is added.
            acc_p = init
            acc_c = init
            acc_n = init
            r = h0 - 1
            hi = tl.minimum(H, h1 + 1)  # rows from here on are not the strip's to read
            if PREFETCH:  # row r is loaded PREFETCH iterations ahead, its loads in flight
                ml, mc, mr = _stream_masks(r, 0, H, m_l, m_c, m_r)
                nl, nc, nr = _stream_load(_grid_row(src, r, W, ssn, ROW64), off, ml, mc, mr,
                                          ssn)
                if PREFETCH == 2:
                    pl, pc, pr = _stream_masks(r + 1, 0, hi, m_l, m_c, m_r)
                    ql, qc, qr = _stream_load(_grid_row(src, r + 1, W, ssn, ROW64), off, pl, pc,
                                              pr, ssn)
            while r <= h1:
                # Written out rather than shared with the backward's: the same steps through
                # one helper compiled to loads after the row's arithmetic instead of before it.
                if PREFETCH:
                    vl = nl.to(ACC)
                    vc = nc.to(ACC)
                    vr = nr.to(ACC)
                    ml, mc, mr = _stream_masks(r, 0, H, m_l, m_c, m_r)
                    pl, pc, pr = _stream_masks(r + PREFETCH, 0, hi, m_l, m_c, m_r)
                    ll, lc, lr = _stream_load(_grid_row(src, r + PREFETCH, W, ssn, ROW64), off,
                                              pl, pc, pr, ssn)
                    if PREFETCH == 2:  # rows r + 1 (loaded) and r + 2 (loading) in flight
                        nl = ql
                        nc = qc
                        nr = qr
                        ql = ll
                        qc = lc
                        qr = lr
                    else:
                        nl = ll
                        nc = lc
                        nr = lr
                else:
                    vl, vc, vr, ml, mc, mr = _stream_row(_grid_row(src, r, W, ssn, ROW64), off,
                                                         r, H, m_l, m_c, m_r, ssn, ACC)
                acc_p, acc_c, acc_n = _stream_out_row(acc_p, acc_c, acc_n, init, t00, t01, t02,
                                                      t10, t11, t12, t20, t21, t22, vl, vc, vr,
                                                      ml, mc, mr, out, out_off, r, h0, h1, W, C,
                                                      m_c, FLIP, nonfinite, ROW64, FMA)
                r += 1
            item += slots
    else:
        _stream_prefix(src_ptr, out_ptr, pid - slots, N, C, P, ssb, ssn, ssc, c, c_ok, BLOCK_P)


@triton.jit
def _stream_dw(d0, d1, d2, g, gv, xl, xc, xr, FMA: tl.constexpr):
    """d_j += g * x_j where the pair exists (gv: the grad_out row is one of the strip's). gv is
    one flag for the whole block, so a branch skips the row rather than a select per element."""
    if gv:
        d0 = _madd(d0, g, xl, FMA)
        d1 = _madd(d1, g, xc, FMA)
        d2 = _madd(d2, g, xr, FMA)
    return d0, d1, d2


@triton.jit
def _peg_stream3_bwd_kernel(g_ptr, x_ptr, w_ptr, gx_ptr, part_ptr,
                            N, C, H, W, P, strips, rh, wblocks, items, slots,
                            sgb, sgn, sgc, sxb, sxn, sxc, sw0, sw2, sw3,
                            NEED_X: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                            IS_F64: tl.constexpr, ROW64: tl.constexpr, PREFETCH: tl.constexpr,
                            BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_P: tl.constexpr, FMA: tl.constexpr):
    """grad_x of the strips (NEED_X) and the partial sums of grad_weight and grad_bias over them
    (program pid's slot of part: (slots, 10, C)). Programs pid < slots walk the strips
    ``pid, pid + slots, ...`` of the ``items`` of their channel block, summing the weight and
    bias gradients of all of them in registers and reducing over the pixels once, at the end;
    the programs after them copy grad_out's prefix tokens into grad_x, one image each.

    Iteration r of a strip loads grad_out row r (three columns, for grad_x) and x row r - 1
    (three columns): x row r - 1 meets grad_out rows r (tap row 0), r - 1 (1) and r - 2 (2), the
    last two kept from earlier iterations."""
    ACC: tl.constexpr = tl.float64 if IS_F64 else tl.float32
    pid = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if pid < slots:
        zero = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
        if NEED_X:
            t00, t01, t02, t10, t11, t12, t20, t21, t22 = _stream_taps(w_ptr, c, c_ok, sw0,
                                                                       sw2, sw3, True, ACC)
            nonfinite = _stream_nonfinite(t00, t01, t02, t10, t11, t12, t20, t21, t22)
        d00 = zero
        d01 = zero
        d02 = zero
        d10 = zero
        d11 = zero
        d12 = zero
        d20 = zero
        d21 = zero
        d22 = zero
        db = zero
        slot = part_ptr + pid.to(tl.int64) * (10 * C) + c
        item = pid
        while item < items:
            b, h0, h1, wc, m_l, m_c, m_r = _stream_block(item, wblocks, strips, rh, H, W, c_ok,
                                                          BLOCK_W)
            gsrc, g_off = _stream_source(g_ptr, b, wc, c, P, sgb, sgn, sgc)
            xsrc, x_off = _stream_source(x_ptr, b, wc, c, P, sxb, sxn, sxc)
            gx, gx_off = _stream_dest(gx_ptr, b, wc, c, N, C, P)
            acc_p = zero
            acc_c = zero
            acc_n = zero
            # grad_out rows r - 1 and r - 2 of the strip (zero outside it), at column w. Two
            # tensors of zeros, not one: Triton carries a variable through a loop only if the
            # loop leaves it another value than it had before, and after ``g2 = g1`` g2 would
            # hold g1's initial value, the same as its own, so g2 would stay zero on a GPU (the
            # interpreter runs the Python, where it does not).
            g1 = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
            g2 = tl.zeros([BLOCK_W, BLOCK_C], dtype=ACC)
            r = h0 - 1
            # grad_out row r (PREFETCH >= 1) and x row r - 1 (PREFETCH >= 2) are loaded an
            # iteration ahead.
            if PREFETCH >= 1:
                ml, mc, mr = _stream_masks(r, 0, H, m_l, m_c, m_r)
                ngl, ngc, ngr = _stream_load(_grid_row(gsrc, r, W, sgn, ROW64), g_off, ml, mc,
                                             mr, sgn)
                if NEED_W and PREFETCH >= 2:
                    ml, mc, mr = _stream_masks(r - 1, 0, H, m_l, m_c, m_r)
                    nxl, nxc, nxr = _stream_load(_grid_row(xsrc, r - 1, W, sxn, ROW64), x_off,
                                                 ml, mc, mr, sxn)
            while r <= h1 + 1:
                if PREFETCH >= 1:
                    gl = ngl.to(ACC)
                    gc = ngc.to(ACC)
                    gr = ngr.to(ACC)
                    ml, mc, mr = _stream_masks(r, 0, H, m_l, m_c, m_r)
                    pl, pc, pr = _stream_masks(r + 1, 0, tl.minimum(H, h1 + 2), m_l, m_c, m_r)
                    ngl, ngc, ngr = _stream_load(_grid_row(gsrc, r + 1, W, sgn, ROW64), g_off,
                                                 pl, pc, pr, sgn)
                else:
                    gl, gc, gr, ml, mc, mr = _stream_row(_grid_row(gsrc, r, W, sgn, ROW64),
                                                         g_off, r, H, m_l, m_c, m_r, sgn, ACC)
                if NEED_X:
                    acc_p, acc_c, acc_n = _stream_out_row(acc_p, acc_c, acc_n, zero, t00, t01,
                                                          t02, t10, t11, t12, t20, t21, t22, gl,
                                                          gc, gr, ml, mc, mr, gx, gx_off, r, h0,
                                                          h1, W, C, m_c, True, nonfinite, ROW64,
                                                          FMA)
                in_strip = (r >= h0) & (r < h1)
                g0 = tl.where(in_strip, gc, 0.0)
                if NEED_B:
                    db += g0
                if NEED_W:
                    if PREFETCH >= 2:
                        xl = nxl.to(ACC)
                        xc = nxc.to(ACC)
                        xr = nxr.to(ACC)
                        pl, pc, pr = _stream_masks(r, 0, tl.minimum(H, h1 + 1), m_l, m_c, m_r)
                        nxl, nxc, nxr = _stream_load(_grid_row(xsrc, r, W, sxn, ROW64), x_off,
                                                     pl, pc, pr, sxn)
                    else:
                        xr_ = r - 1
                        xl, xc, xr, _ml, _mc, _mr = _stream_row(
                            _grid_row(xsrc, xr_, W, sxn, ROW64), x_off, xr_, H, m_l, m_c, m_r,
                            sxn, ACC)
                    d00, d01, d02 = _stream_dw(d00, d01, d02, g0, in_strip, xl, xc, xr, FMA)
                    v1 = (r - 1 >= h0) & (r - 1 < h1)
                    d10, d11, d12 = _stream_dw(d10, d11, d12, g1, v1, xl, xc, xr, FMA)
                    v2 = (r - 2 >= h0) & (r - 2 < h1)
                    d20, d21, d22 = _stream_dw(d20, d21, d22, g2, v2, xl, xc, xr, FMA)
                g2 = g1
                g1 = g0
                r += 1
            item += slots
        if NEED_W:
            tl.store(slot, tl.sum(d00, axis=0), mask=c_ok)
            tl.store(slot + C, tl.sum(d01, axis=0), mask=c_ok)
            tl.store(slot + 2 * C, tl.sum(d02, axis=0), mask=c_ok)
            tl.store(slot + 3 * C, tl.sum(d10, axis=0), mask=c_ok)
            tl.store(slot + 4 * C, tl.sum(d11, axis=0), mask=c_ok)
            tl.store(slot + 5 * C, tl.sum(d12, axis=0), mask=c_ok)
            tl.store(slot + 6 * C, tl.sum(d20, axis=0), mask=c_ok)
            tl.store(slot + 7 * C, tl.sum(d21, axis=0), mask=c_ok)
            tl.store(slot + 8 * C, tl.sum(d22, axis=0), mask=c_ok)
        if NEED_B:
            tl.store(slot + 9 * C, tl.sum(db, axis=0), mask=c_ok)
    else:
        if NEED_X:
            _stream_prefix(g_ptr, gx_ptr, pid - slots, N, C, P, sgb, sgn, sgc, c, c_ok, BLOCK_P)


# ---------------------------------------------------------------------------------------------
# Block sizes

def _next_pow2(v: int) -> int:
    return 1 << max(int(v) - 1, 0).bit_length()


def _tile(N, C, c_cap: int, elems: int) -> dict:
    """A tile of about ``elems`` elements, at most ``c_cap`` channels wide, four elements per
    thread. With four, ptxas (sm_90, triton 3.6 and 3.8) fits both kernels in at most 128
    registers, with no spills (a few bytes at most) for half and float32 at every kernel size;
    with eight they need 150-255 and spill, as the loads of all unrolled taps are in flight."""
    # Under dynamic shapes C and N are symbolic: take the cap rather than guard on their values.
    block_c = max(1, min(_next_pow2(C), c_cap)) if isinstance(C, int) else c_cap
    block_t = max(8, elems // block_c)
    if isinstance(N, int):  # small grids: do not launch mostly masked tiles
        block_t = max(8, min(block_t, _next_pow2(N)))
    return dict(BLOCK_T=block_t, BLOCK_C=block_c,
                num_warps=max(1, min(16, block_t * block_c // 128)))


def forward_config(N, C) -> dict:
    """Block sizes and warps of the forward kernel for ``N`` tokens of ``C`` channels: 64
    channels (a 128-byte line of a half-precision token) by 16 tokens."""
    return _tile(N, C, 64, 1024)


def backward_config(N, C) -> dict:
    """Block sizes and warps of the backward kernel.

    Each tile writes ``kh*kw + 1`` rows of ``C`` partial sums, so tiles are taller than in the
    forward (128 tokens by 16 channels) to keep that traffic small next to the tensors read and
    written: about 7% for CPVT shapes (N = 197) in half precision with 3x3 kernels.
    """
    return _tile(N, C, 16, 2048)


# The streaming kernels' blocks: four elements a thread (with eight they need 251 and 147
# registers, backward and forward), at most 8 warps. Each kernel has a budget of resident warps
# an SM by element size, from the most registers a thread its blocks take (ptxas, sm_90,
# triton 3.6 and 3.8, bench/triton_compile.py over the benchmark's shapes and small ones;
# fewer where an image is one strip, as Triton then compiles the strip count as the constant
# 1): registers are allocated 8 a thread at a time, and an SM has 64K of them. 16-bit: forward
# 79-80 with PREFETCH, 71-88 without (23 warps), input gradient alone 78-95 (16), backward
# 137-160 with PREFETCH, 126-158 without (12); float32: 72-91 (21), 72-91 (16), 145-164 with
# PREFETCH (12); float64: 96-156 (12), 102-174 (11), 238-255 (8). An SM holds the budget over
# the block's warps, rounded down, programs.
_STREAM_WARPS_PER_SM = {"fwd": {2: 23, 4: 21, 8: 12}, "grad_x": {2: 16, 4: 16, 8: 11},
                        "bwd": {2: 12, 4: 12, 8: 8}}
# Rows loaded an iteration ahead (PREFETCH): the loads of row r + 1 in flight while row r is
# computed, where a warp would otherwise wait for each row's loads in turn. Each warp streams
# one new 8-byte vector a thread a row (16-bit), about 5.6 KB an SM for the forward's 22
# warps, where an H100 wants some 14 KB in flight an SM (3.35 TB/s times about 550 ns, over
# 132 SMs). The 16-bit forward and input gradient take it for 8 registers more (72 -> 80 and
# 72-91 -> 79-95 a thread); float32's forward would take 100, past its warp budget. The
# backward prefetches its grad_out rows (PREFETCH 1: 137-164 registers in 16-bit and float32,
# and 3-15 fewer instructions an iteration under triton 3.8, 1-6 more under 3.6); its x rows
# too (PREFETCH 2) would take up to 176 in bfloat16 and 206 in float32, and float64 spills
# with either. PREFETCH 2 in the forward and the input gradient keeps two rows in flight (rows
# r + 1 and r + 2): bfloat16 at CPVT-S 92 and 87 registers, 21 and 6 more instructions an
# iteration, one program an SM fewer at the 16-bit warp budget (triton 3.8, sm_90); tune only.
_STREAM_PREFETCH = {"fwd": {2: 1}, "grad_x": {2: 1}, "bwd": {2: 1, 4: 1}}
# Rows of a strip's walk beyond its own: the forward reads one row above and one below, the
# backward one more (x row r - 1 for grad_out row r); plus about one row's worth of
# instructions for each item (bench/triton_compile.py: ``outer - loop``).
_STREAM_EXTRA_ROWS = {"fwd": 3, "grad_x": 3, "bwd": 4}


@functools.lru_cache(maxsize=4096)
def _stream_geometry(B, H, W, C, kind: str, itemsize: int, warps_ok: tuple, sms: int,
                     block: Optional[tuple] = None) -> dict:
    """Block sizes, strip height and persistent programs of a streaming kernel, from a model of
    its work. An SM holds ``PER_SM`` programs (the kernel's warp budget over the block's warps),
    each walking ``ceil(items / slots)`` items of ``RH + extra`` rows: the busiest SM's warps
    issue ``PER_SM * num_warps * ceil(items / slots) * (RH + extra)`` row iterations, the
    first key; the work of all SMs (pixels and channels past the grid's edge are idle lanes,
    and whole idle warps where a block of pixels overhangs the row) the second. The blocks are
    BLOCK_W pixels of a row by BLOCK_C channels, powers of two, 128 elements a warp, with a
    number of warps in ``warps_ok`` where the grid is large enough (fewer where not); RH rows a
    strip (fewer strips, fewer halo rows, until the items no longer fill the programs). Ties go
    to wider blocks and taller strips. ``block`` = (BLOCK_W, BLOCK_C): that block only (its
    strips and programs)."""
    budget = _STREAM_WARPS_PER_SM[kind][itemsize]
    extra = _STREAM_EXTRA_ROWS[kind]
    h = max(H, 1)
    wide = max(2, _next_pow2(max(W, 1)))
    c2 = _next_pow2(max(C, 1))
    candidates = [(bw, bc) for bw in (32, 16, 8, 4, 2, 1) for bc in (128, 64, 32, 16)
                  if bw <= wide and bc <= c2
                  and 1 <= bw * bc // 128 <= 8]
    if block is not None:
        candidates = [tuple(block)]
    elif not candidates:  # a grid smaller than a warp's 128 elements: one block of one warp
        candidates = [(wide, min(c2, 128))]
    elif any(bw * bc // 128 in warps_ok for bw, bc in candidates):
        candidates = [(bw, bc) for bw, bc in candidates if bw * bc // 128 in warps_ok]
    else:
        candidates = [(bw, bc) for bw, bc in candidates if bw * bc // 128 <= min(warps_ok)]
    best = None
    for block_w, block_c in candidates:
        warps = max(1, min(8, block_w * block_c // 128))
        per_sm = max(1, budget // warps)
        cblocks = max(1, triton.cdiv(C, block_c))
        wblocks = triton.cdiv(max(W, 1), block_w)
        for rh in sorted({triton.cdiv(h, n) for n in range(1, min(h, 256) + 1)}):
            strips = triton.cdiv(h, rh)
            items = max(1, B * strips * wblocks)
            slots = max(1, min(items, per_sm * sms // cblocks))
            on_sm = triton.cdiv(slots * cblocks, sms)  # programs on the busiest SM
            busiest = on_sm * warps * triton.cdiv(items, slots) * (rh + extra)
            total = items * cblocks * warps * (rh + extra)
            key = (busiest, total, -block_w, -rh)
            if best is None or key < best[0]:
                best = (key, dict(BLOCK_W=block_w, BLOCK_C=block_c, RH=rh, num_warps=warps,
                                  PER_SM=per_sm))
    return best[1]


def _stream_batch(B) -> int:
    """B for the geometry model: a symbolic batch (dynamic shapes) is taken as 64."""
    return B if isinstance(B, int) else 64


def stream_config(kind: str, H, W, C, B=64, sms: int = 132, itemsize: int = 2,
                  block: Optional[tuple] = None) -> dict:
    """The geometry of streaming kernel ``kind`` ("fwd", "grad_x": the forward kernel with
    flipped taps, or "bwd") for B images of H x W x C of ``itemsize``-byte elements on ``sms``
    SMs (:func:`_stream_geometry`), or with ``block`` = (BLOCK_W, BLOCK_C) that block's strips
    and programs. The backward's blocks have 4 warps where the grid allows: each program writes
    a slot of partial sums (10 x C floats) that the reduction reads back, so fewer, larger
    programs; with 8 warps some blocks take more registers (16 x 64 in half precision: more
    than 128 a thread)."""
    if kind not in _STREAM_WARPS_PER_SM:
        raise ValueError(f"stream_config: kind must be one of {sorted(_STREAM_WARPS_PER_SM)}, "
                         f"got {kind!r}")
    cfg = _stream_geometry(_stream_batch(B), H, W, C, kind, itemsize,
                           (4,) if kind == "bwd" else (1, 2, 4, 8), sms,
                           None if block is None else tuple(block))
    return dict(cfg, PREFETCH=_STREAM_PREFETCH[kind].get(itemsize, 0))


def stream_forward_config(H, W, C, B=64, sms: int = 132, itemsize: int = 2) -> dict:
    """The streaming forward's geometry (CPVT-S at 224 px in bfloat16, B = 128 on 132 SMs:
    blocks of 2 pixels by 128 channels, 2 warps, eleven programs an SM, strips of 14 rows)."""
    return stream_config("fwd", H, W, C, B, sms, itemsize)


def stream_grad_x_config(H, W, C, B=64, sms: int = 132, itemsize: int = 2) -> dict:
    """The input gradient alone (the forward kernel with flipped taps)."""
    return stream_config("grad_x", H, W, C, B, sms, itemsize)


def stream_backward_config(H, W, C, B=64, sms: int = 132, itemsize: int = 2) -> dict:
    """The streaming backward's geometry (CPVT-S in bfloat16: 16 x 32, 4 warps, three programs
    an SM)."""
    return stream_config("bwd", H, W, C, B, sms, itemsize)


def kernels_from_env() -> str:
    """CPVT_TRITON_KERNELS: "tile" (default) or "stream" (3x3 kernels on the streaming kernels),
    read at each call."""
    v = os.environ.get("CPVT_TRITON_KERNELS", "").strip().lower() or "tile"
    if v not in ("tile", "stream"):
        raise ValueError(f"fused_peg (triton): CPVT_TRITON_KERNELS must be 'tile' or 'stream', "
                         f"got {v!r}")
    return v


def explicit_fma() -> bool:
    """Whether the kernels write their multiply-adds as ``tl.fma`` (their ``FMA`` constant):
    where Triton's compiler would not contract ``a * b + c`` into one FMA itself.

    Triton contracts by default up to 3.9 (``TRITON_DEFAULT_FP_FUSION``, default on; 3.9 warns
    that 3.10 turns the default off), and a launch could ask for it with ``enable_fp_fusion``,
    but torch.compile's wrapper of user kernels does not pass that option on. Without
    contraction the forward's instructions grow by 8% (tiled) to 46% (streaming loop) for sm_90
    (bench/results/2026-12-06_sm90-sass). Where the compiler contracts, the kernels leave it
    to the compiler: their code stays the code timed on the GPU. ``TRITON_FORCE_DISABLE_FP_FUSION``
    (triton >= 3.9) is obeyed: no FMAs at all. Read at each call (under torch.compile, when it
    traces the op)."""
    lang = getattr(getattr(triton, "knobs", None), "language", None)
    if lang is None:  # a Triton from before triton.knobs: the compiler contracts
        return False
    if getattr(lang, "force_disable_fp_fusion", False):
        return False
    default = getattr(lang, "default_fp_fusion", None)
    if default is None:  # the knob is gone: contraction off by default from 3.10
        return _triton_version() >= (3, 10)
    return not default


def _use_stream(weight, H, W, C) -> bool:
    """The streaming kernels run 3x3 kernels on static sizes (under dynamic shapes the tiled
    kernels run), for up to a million channels (more take the tiled kernels' 64-bit path)."""
    return (kernels_from_env() == "stream" and tuple(weight.shape[2:]) == (3, 3)
            and all(isinstance(v, int) for v in (H, W, C)) and not _huge_channels(C, 9, 16))


# ---------------------------------------------------------------------------------------------
# Ops

# CUDA launches at most 65535 programs along grid axes 1 and 2.
_MAX_GRID_YZ = 65535


def _huge_channels(C, kk: int, block_c: int) -> bool:
    """Whether the tiled kernels need their path for millions of channels (HUGE_C): more blocks
    of ``block_c`` channels than grid axis 1 takes, or a product of C with the kernel's
    ``kk`` taps (the weight, the partial sums) past 2^31."""
    return isinstance(C, int) and (triton.cdiv(C, block_c) > _MAX_GRID_YZ
                                   or (kk + 1) * C >= 2**31)


def _channel_grid(programs, cblocks) -> tuple:
    """The launch grid of ``programs`` programs (axis 0) for each of ``cblocks`` channel blocks:
    the blocks on axis 1, and past its limit on axis 2 too (read back by :func:`_channel_block`
    under HUGE_C; blocks past the last channel are masked out)."""
    if isinstance(cblocks, int) and cblocks > _MAX_GRID_YZ:
        return (programs, _MAX_GRID_YZ, triton.cdiv(cblocks, _MAX_GRID_YZ))
    return (programs, cblocks)


def _prefix_block(P: int, block_c: int) -> int:
    """Prefix tokens a streaming program copies at a time: all of them up to a tile of 2048
    values, so that any number of prefix tokens fits in registers."""
    return max(1, min(_next_pow2(max(P, 1)), 2048 // block_c))


def _launch_device(x: torch.Tensor):
    """Makes x's GPU the current device while the kernels launch: Triton launches on the current
    device, on its current stream, whatever device the tensors are on."""
    if (x.device.type == "cuda" and x.device.index is not None
            and x.device.index != torch.cuda.current_device()):
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _weight_strides(weight):
    s = weight.stride()
    return s[0], s[2], s[3]


def launch_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], H: int,
                   W: int, num_prefix_tokens: int, cfg: dict) -> torch.Tensor:
    """The forward kernel with block sizes ``cfg`` (``BLOCK_T``, ``BLOCK_C``, ``num_warps``, as
    :func:`forward_config` gives them); inputs already checked. Returns a new tensor."""
    B, N, C = x.shape
    out = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    kh, kw = int(weight.shape[2]), int(weight.shape[3])  # compile-time constants
    tiles = triton.cdiv(N, cfg["BLOCK_T"])
    grid = _channel_grid(B * tiles, triton.cdiv(C, cfg["BLOCK_C"]))
    if B * C == 0:
        return out
    has_bias = bias is not None
    _wrap(_peg_fwd_kernel)[grid](
        x, weight, bias if has_bias else weight, out,
        N, C, H, W, num_prefix_tokens, tiles,
        x.stride(0), x.stride(1), x.stride(2), *_weight_strides(weight),
        bias.stride(0) if has_bias else 0,
        KH=kh, KW=kw, HAS_BIAS=has_bias, IS_F64=x.dtype == torch.float64,
        UNROLL=kh * kw <= _MAX_UNROLLED_TAPS,
        UNROLL_COLS=kw <= _MAX_UNROLLED_COLS, HUGE_C=_huge_channels(C, kh * kw, cfg["BLOCK_C"]),
        FMA=explicit_fma(), **cfg)
    return out


def _stream_programs(B, H, W, cfg) -> tuple[int, int, int]:
    """(strips per image, pixel blocks per row, items = the (image, strip, pixel block) of a
    channel block)."""
    strips = triton.cdiv(H, cfg["RH"])
    wblocks = triton.cdiv(W, cfg["BLOCK_W"])
    return strips, wblocks, B * strips * wblocks


def _stream_row64(H: int, W: int, *row_strides: int) -> bool:
    """Whether the streaming kernels need 64-bit row offsets: rows -2 .. H + 2 of an image of
    tokens ``row_strides`` elements apart (the forward loads up to two rows ahead, masked past
    the image) reach 2^31 elements from its first row. Otherwise (every real image) a row is one
    32-bit multiply-add away, where a 64-bit product costs several (bench/triton_compile.py: the
    bfloat16 forward's loop 115 -> 97 instructions)."""
    return (H + 3) * W * max(abs(s) for s in row_strides) >= 2**31


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    """The SMs of a CUDA device. Off a GPU (Triton's interpreter, meta tensors) one, so that the
    programs of small problems still walk several items."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None
                          else torch.cuda.current_device())


def _stream_slots(items: int, cblocks: int, cfg: dict, device: torch.device) -> int:
    """Persistent programs per channel block: at most ``cfg["PER_SM"]`` on every SM of the
    device over all channel blocks (one wave: rounded down, as programs past it would wait for
    a whole program to finish), each walking every slots-th item; one per item with
    PER_SM = 0."""
    per_sm = int(cfg.get("PER_SM", 0))
    if per_sm <= 0 or items <= 1 or cblocks < 1:  # (no channel blocks: C = 0)
        return items
    return max(1, min(items, per_sm * _device_sms(device) // cblocks))


def launch_stream_forward(src: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          H: int, W: int, num_prefix_tokens: int, flip: bool,
                          cfg: dict) -> torch.Tensor:
    """The streaming 3x3 kernel: the forward, or with ``flip`` the input gradient of grad_out
    ``src`` alone (bias ignored). ``cfg`` as :func:`stream_forward_config` gives it."""
    B, N, C = src.shape
    out = torch.empty((B, N, C), dtype=src.dtype, device=src.device)
    if B * C == 0:
        return out
    P = num_prefix_tokens
    strips, wblocks, items = _stream_programs(B, H, W, cfg)
    cblocks = triton.cdiv(C, cfg["BLOCK_C"])
    slots = _stream_slots(items, cblocks, cfg, src.device)
    has_bias = bias is not None and not flip
    grid = (slots + (B if P > 0 else 0), cblocks)
    _wrap(_peg_stream3_fwd_kernel)[grid](
        src, weight, bias if has_bias else weight, out,
        N, C, H, W, P, strips, cfg["RH"], wblocks, items, slots,
        src.stride(0), src.stride(1), src.stride(2), *_weight_strides(weight),
        bias.stride(0) if has_bias else 0,
        HAS_BIAS=has_bias, FLIP=flip, IS_F64=src.dtype == torch.float64,
        ROW64=_stream_row64(H, W, src.stride(1), C), PREFETCH=cfg.get("PREFETCH", 0),
        BLOCK_W=cfg["BLOCK_W"], BLOCK_C=cfg["BLOCK_C"],
        BLOCK_P=_prefix_block(P, cfg["BLOCK_C"]), FMA=explicit_fma(), num_warps=cfg["num_warps"])
    return out


@torch.library.triton_op("cpvt::peg_forward_triton", mutates_args=())
def peg_forward_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       H: int, W: int, num_prefix_tokens: int) -> torch.Tensor:
    """Forward of the fused PEG; returns a new contiguous tensor."""
    # Repeated here for callers that reach the op through torch.ops.cpvt: guards memory.
    _checks.check_inputs(x, weight, bias, H, W, num_prefix_tokens)
    if x.device.type == "meta":  # shapes without data
        return x.new_empty(x.shape)
    with _launch_device(x):
        if _use_stream(weight, H, W, x.shape[2]):
            return launch_stream_forward(x, weight, bias, H, W, num_prefix_tokens, False,
                                         stream_forward_config(H, W, x.shape[2], x.shape[0],
                                                               _device_sms(x.device),
                                                               x.element_size()))
        return launch_forward(x, weight, bias, H, W, num_prefix_tokens,
                              forward_config(x.shape[1], x.shape[2]))


@torch.library.triton_op("cpvt::peg_backward_triton", mutates_args=())
def peg_backward_triton(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        H: int, W: int, num_prefix_tokens: int,
                        output_mask: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """Backward of the fused PEG: ``(grad_x, grad_weight, grad_bias)``, each an empty ``(0,)``
    tensor where ``output_mask`` is false."""
    _checks.check_backward_inputs(grad_out, x, weight, H, W, num_prefix_tokens)
    if len(output_mask) != 3:
        raise ValueError(f"fused_peg: output_mask must have 3 entries (x, weight, bias), "
                         f"got {len(output_mask)}")
    if x.device.type == "meta":  # shapes without data
        return _masked_grads(x, weight, output_mask)
    with _launch_device(x):
        if _use_stream(weight, H, W, x.shape[2]):
            return launch_stream_backward(grad_out, x, weight, H, W, num_prefix_tokens,
                                          output_mask,
                                          stream_backward_config(H, W, x.shape[2], x.shape[0],
                                                                 _device_sms(x.device),
                                                                 x.element_size()))
        return launch_backward(grad_out, x, weight, H, W, num_prefix_tokens, output_mask,
                               backward_config(x.shape[1], x.shape[2]))


def launch_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, H: int, W: int,
                    num_prefix_tokens: int, output_mask: Sequence[bool],
                    cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernels with block sizes ``cfg`` (as :func:`backward_config` gives them);
    inputs already checked. Returns ``(grad_x, grad_weight, grad_bias)`` as the op does."""
    need_x, need_w, need_b = (bool(m) for m in output_mask)
    B, N, C = x.shape
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    kk = kh * kw
    gx, gw, gb = _masked_grads(x, weight, output_mask)
    if not (need_x or need_w or need_b):
        return gx, gw, gb
    tiles = triton.cdiv(N, cfg["BLOCK_T"])
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    need_part = need_w or need_b
    if B * C == 0:
        if need_part and C > 0:  # sums over no tiles
            _reduce_partials(x.new_empty(0, dtype=acc_dtype), gw, gb, 0, C, kk, need_w, need_b)
        return gx, gw, gb
    # Images a wave: all of them unless their partial sums would pass the budget. Sizes that
    # torch.compile traces as symbols (dynamic shapes) stay symbols: one wave, no guard on them.
    wave, in_waves = B, False
    if need_part and all(isinstance(v, int) for v in (B, N, C)):
        wave = _partial_waves(B, tiles, tiles * (kk + 1) * C * (8 if acc_dtype == torch.float64
                                                                  else 4))
        in_waves = wave < B
    part = (torch.empty((wave * tiles, kk + 1, C), dtype=acc_dtype, device=x.device)
            if need_part else x.new_empty(0, dtype=acc_dtype))
    keep = (torch.empty((kk + 1, _REDUCE_ROWS, C), dtype=acc_dtype, device=x.device)
            if in_waves else None)
    grid_c = triton.cdiv(C, cfg["BLOCK_C"])
    for b0 in range(0, B, wave) if in_waves else (0,):
        images = min(wave, B - b0) if in_waves else B
        _wrap(_peg_bwd_kernel)[_channel_grid(images * tiles, grid_c)](
            grad_out, x, weight, gx, part,
            N, C, H, W, num_prefix_tokens, tiles, b0,
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            x.stride(0), x.stride(1), x.stride(2), *_weight_strides(weight),
            KH=kh, KW=kw, NEED_X=need_x, NEED_W=need_w, NEED_B=need_b,
            IS_F64=x.dtype == torch.float64, UNROLL=kk <= _MAX_UNROLLED_TAPS,
            UNROLL_COLS=kw <= _MAX_UNROLLED_COLS, HUGE_C=_huge_channels(C, kk, cfg["BLOCK_C"]),
            **cfg)
        if need_part:
            _reduce_partials(part, gw, gb, images * tiles, C, kk, need_w, need_b, keep=keep,
                             first=b0 == 0, last=not in_waves or b0 + wave >= B)
    return gx, gw, gb


# The partial-sum rows the reduction keeps per channel (BLOCK_R of _reduce_partials_kernel).
_REDUCE_ROWS = 8
# CPVT_TRITON_PARTIALS_BYTES's default: the tiled backward's partial sums take
# tiles * (kh*kw + 1) * C * 4 bytes, 6.3 GiB at k = 31 with B = 256, 32x32 and C = 768.
_PARTIALS_BYTES = 1 << 30


def _partial_waves(B: int, tiles: int, per_image: int) -> int:
    """Images a wave of the tiled backward: all ``B`` where their partial sums (``per_image``
    bytes an image) fit ``CPVT_TRITON_PARTIALS_BYTES`` (read at each call; default 1 GiB),
    else as many as fit, at least one, rounded to whole groups of the reduction's rows of
    tiles so that every wave's first tile lands on row 0 (the same sums in the same order as
    one pass)."""
    env = os.environ.get("CPVT_TRITON_PARTIALS_BYTES", "")
    if env and not (env.isascii() and env.isdigit()):
        raise ValueError(f"fused_peg (triton): CPVT_TRITON_PARTIALS_BYTES must be a number of "
                         f"bytes, got {env!r}")
    budget = int(env) if env else _PARTIALS_BYTES
    if B * per_image <= budget:
        return B
    step = 1  # images whose tiles fill whole groups of rows
    while (step * tiles) % _REDUCE_ROWS:
        step *= 2
    return min(B, max(step, budget // per_image // step * step))


def _masked_grads(x, weight, output_mask):
    """Empty gradients of the op's shape for each wanted output; distinct empty ``(0,)`` tensors
    for the others (a custom op's outputs may not alias)."""
    need_x, need_w, need_b = (bool(m) for m in output_mask)
    B, N, C = x.shape
    gx = torch.empty((B, N, C), dtype=x.dtype, device=x.device) if need_x else x.new_empty(0)
    gw = (torch.empty(weight.shape, dtype=weight.dtype, device=x.device) if need_w
          else x.new_empty(0))
    gb = torch.empty((C,), dtype=x.dtype, device=x.device) if need_b else x.new_empty(0)
    return gx, gw, gb


def _reduce_partials(part, gw, gb, slots: int, C: int, kk: int, need_w: bool, need_b: bool,
                     keep=None, first: bool = True, last: bool = True):
    """grad_weight and/or grad_bias: the partial sums' slots added in a fixed order. In waves,
    ``keep`` (``(kk + 1, _REDUCE_ROWS, C)``) carries the sums from one wave to the next: the
    ``first`` wave starts them, the ``last`` writes the gradients."""
    row0 = 0 if need_w else kk
    rows = (kk if need_w else 0) + (1 if need_b else 0)
    block_c = max(1, min(_next_pow2(C), 128)) if isinstance(C, int) else 128
    grid = _channel_grid(rows, triton.cdiv(C, block_c))
    _wrap(_reduce_partials_kernel)[grid](
        part, gw if need_w else part, gb if need_b else part, part if keep is None else keep,
        slots, C, KK=kk, ROW0=row0, BLOCK_R=_REDUCE_ROWS, BLOCK_C=block_c,
        HUGE_C=_huge_channels(C, kk, block_c), FIRST=first, LAST=last, num_warps=4)


def launch_stream_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, H: int,
                           W: int, num_prefix_tokens: int, output_mask: Sequence[bool],
                           cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The streaming 3x3 backward with blocks ``cfg`` (:func:`stream_backward_config`); returns
    ``(grad_x, grad_weight, grad_bias)`` as the op does. grad_x alone runs the streaming
    forward kernel with flipped taps."""
    need_x, need_w, need_b = (bool(m) for m in output_mask)
    B, N, C = x.shape
    P = num_prefix_tokens
    if need_x and not (need_w or need_b):  # the forward kernel allocates grad_x itself
        return (launch_stream_forward(grad_out, weight, None, H, W, P, True,
                                      stream_grad_x_config(H, W, C, B, _device_sms(x.device),
                                                           x.element_size())),
                x.new_empty(0), x.new_empty(0))
    gx, gw, gb = _masked_grads(x, weight, output_mask)
    if not (need_x or need_w or need_b):
        return gx, gw, gb
    strips, wblocks, items = _stream_programs(B, H, W, cfg)
    cblocks = triton.cdiv(C, cfg["BLOCK_C"])
    slots = _stream_slots(items, cblocks, cfg, x.device)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    part = torch.empty((slots, 10, C), dtype=acc_dtype, device=x.device)
    if items * C > 0:
        grid = (slots + (B if (P > 0 and need_x) else 0), cblocks)
        _wrap(_peg_stream3_bwd_kernel)[grid](
            grad_out, x, weight, gx, part,
            N, C, H, W, P, strips, cfg["RH"], wblocks, items, slots,
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            x.stride(0), x.stride(1), x.stride(2), *_weight_strides(weight),
            NEED_X=need_x, NEED_W=need_w, NEED_B=need_b, IS_F64=x.dtype == torch.float64,
            ROW64=_stream_row64(H, W, grad_out.stride(1), x.stride(1), C),
            PREFETCH=cfg.get("PREFETCH", 0), BLOCK_W=cfg["BLOCK_W"], BLOCK_C=cfg["BLOCK_C"],
            BLOCK_P=_prefix_block(P, cfg["BLOCK_C"]), FMA=explicit_fma(),
            num_warps=cfg["num_warps"])
    if C > 0:
        _reduce_partials(part, gw, gb, slots, C, 9, need_w, need_b)
    return gx, gw, gb


_autograd.register("cpvt::peg_forward_triton", torch.ops.cpvt.peg_backward_triton)
_autograd.register_flops(torch.ops.cpvt.peg_forward_triton, torch.ops.cpvt.peg_backward_triton)


def peg_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               H: int, W: int, num_prefix_tokens: int) -> torch.Tensor:
    """The fused PEG on the Triton kernels (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    Inputs are assumed checked (``cpvt_kernels._checks.check_inputs``); ``x`` may have any
    strides. Differentiable in ``x``, ``weight`` and ``bias``.

    Args:
        x: ``(B, P + H*W, C)`` tokens. weight: ``(C, 1, kh, kw)``. bias: ``(C,)`` or None.
    Returns:
        A new contiguous ``(B, P + H*W, C)`` tensor.

    Example:
        >>> x = torch.randn(2, 1 + 14 * 14, 192, device="cuda")
        >>> w = torch.randn(192, 1, 3, 3, device="cuda")
        >>> peg_triton(x, w, None, 14, 14, 1).shape
        torch.Size([2, 197, 192])
    """
    return torch.ops.cpvt.peg_forward_triton(x, weight, bias, H, W, num_prefix_tokens)
