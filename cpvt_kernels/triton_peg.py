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
gradients are bitwise reproducible (no atomics).

The ops are registered with ``torch.library.triton_op`` as ``cpvt::peg_forward_triton`` and
``cpvt::peg_backward_triton``, so ``torch.compile(fullgraph=True)`` traces into the kernels.
Importing this module raises ImportError when Triton cannot be used.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _autograd, _checks

try:
    import triton
    import triton.language as tl
except Exception as e:  # a broken install can raise anything; callers expect ImportError
    raise ImportError(f"triton could not be imported: {type(e).__name__}: {e}") from e

if not (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")):
    raise ImportError(f"the triton backend needs torch.library.triton_op (torch >= 2.6), "
                      f"got torch {torch.__version__}")

# Taps are unrolled at compile time up to these sizes and looped over at run time beyond: the
# loads of all unrolled taps are in flight at once, which is fast for small kernels but makes
# large ones spill registers and compile slowly (a fully unrolled 7x7 backward takes ~50 s to
# compile for sm_90 against ~1.5 s with the row loop; 31 unrolled columns spill).
_MAX_UNROLLED_TAPS = 9  # kernels up to 3x3: every tap unrolled
_MAX_UNROLLED_COLS = 9  # larger kernels: rows looped, columns unrolled up to this width


# ---------------------------------------------------------------------------------------------
# Kernels

@triton.jit
def _fwd_tap(acc, x_base, w_ptr, n64, col, row_ok, c, c_ok, c_off, i, j, W, sxn, sw0, sw2, sw3,
             KH: tl.constexpr, KW: tl.constexpr):
    di = i - KH // 2
    dj = j - KW // 2
    cc = col + dj
    ok = row_ok & (cc >= 0) & (cc < W)
    wv = tl.load(w_ptr + c * sw0 + i * sw2 + j * sw3, mask=c_ok, other=0.0)
    src = (n64 + (di * W + dj)) * sxn
    xv = tl.load(x_base + src[:, None] + c_off[None, :], mask=ok[:, None] & c_ok[None, :],
                 other=0.0)
    return acc + xv.to(acc.dtype) * wv.to(acc.dtype)[None, :]


@triton.jit
def _fwd_row(acc, x_base, w_ptr, n64, row, col, is_grid, c, c_ok, c_off,
             i, H, W, sxn, sw0, sw2, sw3, KH: tl.constexpr, KW: tl.constexpr,
             UNROLL_COLS: tl.constexpr):
    rr = row + (i - KH // 2)
    row_ok = is_grid & (rr >= 0) & (rr < H)
    if UNROLL_COLS:
        for j in tl.static_range(KW):
            acc = _fwd_tap(acc, x_base, w_ptr, n64, col, row_ok, c, c_ok, c_off, i, j, W,
                           sxn, sw0, sw2, sw3, KH, KW)
    else:
        for j in range(KW):
            acc = _fwd_tap(acc, x_base, w_ptr, n64, col, row_ok, c, c_ok, c_off, i, j, W,
                           sxn, sw0, sw2, sw3, KH, KW)
    return acc


@triton.jit
def _peg_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr,
                    N, C, H, W, P, tiles_per_image,
                    sxb, sxn, sxc, sw0, sw2, sw3, sb,
                    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                    IS_F64: tl.constexpr, UNROLL: tl.constexpr, UNROLL_COLS: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // tiles_per_image
    tile = pid % tiles_per_image
    n = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_ok = n < N
    c_ok = c < C
    t = n - P
    is_grid = n_ok & (t >= 0)
    t = tl.where(is_grid, t, 0)
    row = t // W
    col = t % W
    # 64-bit offsets: B * N * C may exceed 2**31.
    n64 = n.to(tl.int64)
    c_off = c.to(tl.int64) * sxc
    x_base = x_ptr + b.to(tl.int64) * sxb
    mask = n_ok[:, None] & c_ok[None, :]
    center = tl.load(x_base + (n64 * sxn)[:, None] + c_off[None, :], mask=mask, other=0.0)

    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float64 if IS_F64 else tl.float32)
    if UNROLL:
        for i in tl.static_range(KH):
            acc = _fwd_row(acc, x_base, w_ptr, n64, row, col, is_grid, c, c_ok, c_off,
                           i, H, W, sxn, sw0, sw2, sw3, KH, KW, True)
    else:
        for i in range(KH):
            acc = _fwd_row(acc, x_base, w_ptr, n64, row, col, is_grid, c, c_ok, c_off,
                           i, H, W, sxn, sw0, sw2, sw3, KH, KW, UNROLL_COLS)
    if HAS_BIAS:
        bv = tl.load(b_ptr + c * sb, mask=c_ok, other=0.0)
        acc += bv.to(acc.dtype)[None, :]
    # where, not a multiply: a NaN weight must not leak into the prefix tokens.
    acc = tl.where(is_grid[:, None], acc, 0.0)
    out = center.to(acc.dtype) + acc
    out_off = (b.to(tl.int64) * N + n64)[:, None] * C + c[None, :]
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


@triton.jit
def _peg_bwd_kernel(g_ptr, x_ptr, w_ptr, gx_ptr, part_ptr,
                    N, C, H, W, P, tiles_per_image,
                    sgb, sgn, sgc, sxb, sxn, sxc, sw0, sw2, sw3,
                    KH: tl.constexpr, KW: tl.constexpr,
                    NEED_X: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                    IS_F64: tl.constexpr, UNROLL: tl.constexpr, UNROLL_COLS: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // tiles_per_image
    tile = pid % tiles_per_image
    n = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_ok = n < N
    c_ok = c < C
    t = n - P
    is_grid = n_ok & (t >= 0)
    t = tl.where(is_grid, t, 0)
    row = t // W
    col = t % W
    n64 = n.to(tl.int64)
    b64 = b.to(tl.int64)
    gc_off = c.to(tl.int64) * sgc
    xc_off = c.to(tl.int64) * sxc
    g_base = g_ptr + b64 * sgb
    x_base = x_ptr + b64 * sxb
    mask = n_ok[:, None] & c_ok[None, :]
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


@triton.jit
def _reduce_partials_kernel(part_ptr, gw_ptr, gb_ptr, num_tiles, C,
                            KK: tl.constexpr, ROW0: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Row r of the partials (r < KK: tap r of grad_weight; r == KK: grad_bias), summed over
    # tiles in a fixed order: the same inputs give bitwise the same result on every run.
    r = tl.program_id(0) + ROW0
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    rows = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=part_ptr.dtype.element_ty)
    # A while loop: triton 3.6's interpreter cannot take a run-time bound in range().
    t0 = 0
    while t0 < num_tiles:
        tiles = t0 + rows
        off = (tiles.to(tl.int64) * (KK + 1) + r)[:, None] * C + c[None, :]
        acc += tl.load(part_ptr + off, mask=(tiles < num_tiles)[:, None] & c_ok[None, :],
                       other=0.0)
        t0 += BLOCK_R
    total = tl.sum(acc, axis=0)
    is_w = r < KK
    tl.store(gw_ptr + c * KK + r, total.to(gw_ptr.dtype.element_ty), mask=c_ok & is_w)
    tl.store(gb_ptr + c, total.to(gb_ptr.dtype.element_ty), mask=c_ok & (r == KK))


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


# ---------------------------------------------------------------------------------------------
# Ops

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
    grid = (B * tiles, triton.cdiv(C, cfg["BLOCK_C"]))
    if B * C == 0:
        return out
    has_bias = bias is not None
    torch.library.wrap_triton(_peg_fwd_kernel)[grid](
        x, weight, bias if has_bias else weight, out,
        N, C, H, W, num_prefix_tokens, tiles,
        x.stride(0), x.stride(1), x.stride(2), *_weight_strides(weight),
        bias.stride(0) if has_bias else 0,
        KH=kh, KW=kw, HAS_BIAS=has_bias, IS_F64=x.dtype == torch.float64,
        UNROLL=kh * kw <= _MAX_UNROLLED_TAPS,
        UNROLL_COLS=kw <= _MAX_UNROLLED_COLS, **cfg)
    return out


@torch.library.triton_op("cpvt::peg_forward_triton", mutates_args=())
def peg_forward_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       H: int, W: int, num_prefix_tokens: int) -> torch.Tensor:
    """Forward of the fused PEG; returns a new contiguous tensor."""
    # Repeated here for callers that reach the op through torch.ops.cpvt: guards memory.
    _checks.check_inputs(x, weight, bias, H, W, num_prefix_tokens)
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
    # Masked-out outputs are distinct empty tensors: a custom op's outputs may not alias.
    gx = torch.empty((B, N, C), dtype=x.dtype, device=x.device) if need_x else x.new_empty(0)
    gw = (torch.empty(weight.shape, dtype=weight.dtype, device=x.device) if need_w
          else x.new_empty(0))
    gb = torch.empty((C,), dtype=x.dtype, device=x.device) if need_b else x.new_empty(0)
    if not (need_x or need_w or need_b):
        return gx, gw, gb
    tiles = triton.cdiv(N, cfg["BLOCK_T"])
    num_tiles = B * tiles
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    need_part = need_w or need_b
    part = (torch.empty((num_tiles, kk + 1, C), dtype=acc_dtype, device=x.device)
            if need_part else x.new_empty(0, dtype=acc_dtype))
    if num_tiles * C > 0:
        grid = (num_tiles, triton.cdiv(C, cfg["BLOCK_C"]))
        torch.library.wrap_triton(_peg_bwd_kernel)[grid](
            grad_out, x, weight, gx, part,
            N, C, H, W, num_prefix_tokens, tiles,
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            x.stride(0), x.stride(1), x.stride(2), *_weight_strides(weight),
            KH=kh, KW=kw, NEED_X=need_x, NEED_W=need_w, NEED_B=need_b,
            IS_F64=x.dtype == torch.float64, UNROLL=kk <= _MAX_UNROLLED_TAPS,
            UNROLL_COLS=kw <= _MAX_UNROLLED_COLS, **cfg)
    if need_part and C > 0:
        row0 = 0 if need_w else kk
        rows = (kk if need_w else 0) + (1 if need_b else 0)
        block_c = max(1, min(_next_pow2(C), 128)) if isinstance(C, int) else 128
        torch.library.wrap_triton(_reduce_partials_kernel)[(rows, triton.cdiv(C, block_c))](
            part, gw if need_w else part, gb if need_b else part, num_tiles, C,
            KK=kk, ROW0=row0, BLOCK_R=8, BLOCK_C=block_c, num_warps=4)
    return gx, gw, gb


_autograd.register("cpvt::peg_forward_triton", torch.ops.cpvt.peg_backward_triton)


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
