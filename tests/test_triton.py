"""The triton backend: parity with the float64 reference, gradients, determinism, registration.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by conftest), with
small shapes because the interpreter is slow. With a GPU the same tests run on CUDA tensors with
larger shapes, plus opcheck, torch.compile and a tensor of more than 2**31 elements.
"""
import os
import subprocess
import sys

import pytest
import torch

import cpvt_kernels as ck
from conftest import (DTYPES, GRAD_LAYOUTS, GRAD_NEEDS, HAS_GPU, TOLERANCE,
                      check_expanded_grad_out, check_strided_grad_out,
                      check_nonfinite_backward, check_nonfinite_forward,
                      check_nonfinite_grad_x_only, check_only_required_grads, large_gpu_memory,
                      layout_as, leaf, make_inputs, reference_with_grads, rel_err,
                      require_backend)

gpu = pytest.mark.skipif(not HAS_GPU, reason="GPU-only: no CUDA device")

# (B, P, H, W, C, kh, kw, bias, layout). Together: P {0,1,2}; kernels (1,1) (3,3) (5,5) (7,7)
# (3,5) (7,3), one larger than the grid, and 9x11, wider than the unrolled columns, so every
# unrolled and looped path runs; H = W = 1; C {1,3,4,5,8,17,24}; B {0,1,2}; bias on and off;
# channel-strided, misaligned, transposed and channels-first x.
CPU_CASES = [
    (2, 1, 5, 6, 17, 3, 3, True, "contiguous"),
    (1, 0, 4, 4, 3, 5, 5, False, "strided_channels"),
    (2, 2, 3, 7, 24, 3, 5, True, "offset_slice"),
    (1, 1, 1, 1, 1, 1, 1, True, "contiguous"),
    (1, 2, 7, 7, 5, 7, 7, False, "transposed"),
    (2, 0, 6, 5, 8, 1, 1, True, "channels_first"),
    (1, 1, 2, 5, 3, 7, 3, True, "contiguous"),
    (0, 1, 3, 3, 4, 3, 3, True, "contiguous"),
    (1, 1, 4, 7, 3, 9, 11, True, "offset_slice"),
]
GPU_CASES = [
    (4, 1, 14, 14, 192, 3, 3, True, "contiguous"),
    (2, 0, 24, 24, 384, 7, 7, False, "offset_slice"),
    (3, 2, 13, 17, 97, 5, 3, True, "strided_channels"),
    (2, 1, 32, 32, 768, 3, 3, True, "channels_first"),
    (2, 1, 9, 11, 64, 27, 27, True, "transposed"),
    (5, 1, 1, 1, 33, 3, 3, False, "contiguous"),
    (0, 1, 14, 14, 192, 3, 3, True, "contiguous"),
    (1, 3, 7, 9, 1, 1, 1, True, "contiguous"),
    (2, 1, 5, 6, 8, 31, 31, True, "contiguous"),
]
CASES = GPU_CASES if HAS_GPU else CPU_CASES


def _case_id(c):
    B, P, H, W, C, kh, kw, bias, layout = c
    return f"B{B}-P{P}-{H}x{W}-C{C}-k{kh}x{kw}-{'bias' if bias else 'nobias'}-{layout}"


@pytest.fixture(scope="module")
def device():
    return require_backend("triton")


@pytest.fixture
def poison_empty(monkeypatch):
    """New float buffers from ``torch.empty`` start as NaN, so an element a kernel forgets to
    write (output, gradient or partial sum) shows up as NaN instead of passing as garbage."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _run(x, w, b, H, W, P, grad, backend="triton"):
    x, w, b = leaf(x), leaf(w), leaf(b)
    out = ck.fused_peg(x, w, b, size=(H, W), num_prefix_tokens=P, backend=backend)
    out.backward(grad)
    return out.detach(), x.grad, w.grad, (None if b is None else b.grad)


# ---------------------------------------------------------------------------------------------
# Parity with the float64 reference

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_parity_output_and_grads(device, dtype, case, poison_empty):
    B, P, H, W, C, kh, kw, bias, layout = case
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, kh, kw, bias, dtype, device)
    x = layout_as(x, layout)
    grad64 = torch.randn(x64.shape, dtype=torch.float64).to(dtype).double()
    ref, gx_ref, gw_ref, gb_ref = reference_with_grads(x64, w64, b64, H, W, P, grad64)

    out, gx, gw, gb = _run(x, w, b, H, W, P, grad64.to(device=device, dtype=dtype))
    tol = TOLERANCE[dtype]
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert gx.shape == x.shape and gx.dtype == dtype
    assert gw.shape == w.shape and gw.dtype == dtype
    for name, got, want in (("out", out, ref), ("grad_x", gx, gx_ref), ("grad_weight", gw, gw_ref),
                            ("grad_bias", gb, gb_ref)):
        if want is None:
            continue
        assert not got.isnan().any(), f"{name} has unwritten (NaN) elements"
        err = rel_err(got, want)
        assert err < tol, f"{name}: rel err {err:.3g} >= {tol:g}"
    if P > 0:  # prefix tokens pass through exactly, forward and backward
        assert torch.equal(out[:, :P], x[:, :P])
        assert torch.equal(gx[:, :P].cpu(), grad64[:, :P].to(dtype))
    if B == 0:
        assert torch.count_nonzero(gw) == 0 and (gb is None or torch.count_nonzero(gb) == 0)


@pytest.mark.parametrize("needs", GRAD_NEEDS)
def test_only_required_grads(device, needs, poison_empty):
    check_only_required_grads("triton", device, needs, H=4, W=5, C=7)


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, False),
                                  (False, False, True), (False, True, True), (True, True, False),
                                  (True, False, True), (False, False, False)], ids=str)
def test_backward_op_output_mask(device, mask):
    """The backward op returns empty (0,) tensors for masked-out outputs."""
    _check_output_mask(device, mask, 3, 3, 5)


def _check_output_mask(device, mask, H, kh, kw):
    B, P, W, C = 2, 2, 5, 6
    (x64, w64, _), (x, w, _) = make_inputs(B, P, H, W, C, kh, kw, False, torch.float64, device)
    grad64 = torch.randn(x64.shape, dtype=torch.float64)
    ref = reference_with_grads(x64, w64, torch.randn(C, dtype=torch.float64), H, W, P, grad64)
    got = torch.ops.cpvt.peg_backward_triton(grad64.to(device), x, w, H, W, P, list(mask))
    for m, g, r in zip(mask, got, ref[1:]):
        if m:
            assert g.shape == r.shape and rel_err(g, r) < 1e-12
        else:
            assert g.shape == (0,)


def test_expanded_grad_out(device):
    """``out.sum().backward()`` hands the backward a stride-0 gradient."""
    check_expanded_grad_out("triton", device, C=7)


@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
def test_strided_grad_out(device, layout):
    """A grad_out laid out otherwise than x (a transposed or sliced upstream gradient)."""
    check_strided_grad_out("triton", device, layout)


@pytest.mark.parametrize("P,kh,kw,bias,layout,fast", [(1, 3, 3, True, "contiguous", False),
                                                      (0, 3, 5, False, "channels_first", True),
                                                      (2, 1, 1, True, "offset_slice", True),
                                                      (1, 5, 3, True, "strided_channels", True)])
def test_gradcheck(device, P, kh, kw, bias, layout, fast):
    # Under the interpreter each call takes a good fraction of a second: one full check on a
    # tiny grid, the other layouts in fast mode (a random projection of the Jacobian).
    fast = fast and not HAS_GPU
    B, H, W, C = (2, 3, 4, 3) if fast or HAS_GPU else (1, 2, 3, 2)
    _, (x, w, b) = make_inputs(B, P, H, W, C, kh, kw, bias, torch.float64, device)
    inputs = [layout_as(x, layout).requires_grad_(), w.requires_grad_()]
    if bias:
        inputs.append(b.requires_grad_())

    def fn(*args):
        return ck.fused_peg(args[0], args[1], args[2] if bias else None, (H, W), P,
                            backend="triton")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=fast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_grads_are_deterministic(device, dtype):
    """The same inputs give bitwise the same grad_weight and grad_bias on every run."""
    B, P, H, W, C = (16, 1, 24, 24, 192) if HAS_GPU else (2, 1, 6, 7, 10)
    _, (x, w, b) = make_inputs(B, P, H, W, C, 3, 3, True, dtype, device)
    grad = torch.randn(x.shape, dtype=dtype, device=device)
    results = [_run(x, w, b, H, W, P, grad)[1:] for _ in range(3)]
    for r in results[1:]:
        for got, first in zip(r, results[0]):
            assert torch.equal(got, first)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("where", ["x", "weight"])
def test_nan_and_inf_propagate_like_reference(device, where):
    check_nonfinite_forward("triton", device, where)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("where", ["x", "weight", "grad_out"])
def test_nan_and_inf_propagate_through_backward(device, where):
    """Output and every gradient have NaN and Inf where the reference has them, also where they
    meet the zero padding (see test_peg.py)."""
    check_nonfinite_backward("triton", device, where)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("k", [3, (3, 5)], ids=str)
def test_nonfinite_weight_grad_x_only(device, k):
    check_nonfinite_grad_x_only("triton", device, k, C=10)


def test_matches_cpu_backend(device):
    """Two independent implementations agree (the cpu backend, where it is built)."""
    if "cpu" not in ck.available_backends("cpu"):
        pytest.skip(f"no cpu backend: {ck.ops._unavailable_reason('cpu', 'cpu')}")
    _, (x, w, b) = make_inputs(2, 1, 5, 7, 19, 5, 3, True, torch.float32, "cpu")
    grad = torch.randn(x.shape)
    got = _run(x.to(device), w.to(device), b.to(device), 5, 7, 1, grad.to(device))
    want = _run(x, w, b, 5, 7, 1, grad, backend="cpu")
    for g, r in zip(got, want):
        assert rel_err(g, r) < 1e-5


# ---------------------------------------------------------------------------------------------
# The streaming 3x3 kernels (CPVT_TRITON_KERNELS=stream)

# (B, P, H, W, C, bias, layout): strips of 7 and of 6, 6, 5 rows; rows wider than a block of
# pixels (W = 40: 32 + 8); a 1x1 grid; no batch; every layout.
STREAM_CPU_CASES = [
    (2, 1, 14, 6, 16, True, "contiguous"),
    (1, 0, 17, 5, 9, False, "strided_channels"),
    (2, 2, 3, 40, 8, True, "offset_slice"),
    (1, 1, 1, 1, 3, True, "channels_first"),
    (0, 1, 3, 3, 4, True, "contiguous"),
    (1, 2, 9, 4, 20, False, "transposed"),
]
STREAM_GPU_CASES = [
    (8, 1, 14, 14, 384, True, "contiguous"),
    (64, 1, 14, 14, 384, True, "contiguous"),  # more strips than one wave of programs
    (4, 1, 24, 24, 192, False, "offset_slice"),
    (2, 0, 32, 32, 768, True, "channels_first"),
    (3, 2, 17, 45, 97, True, "strided_channels"),
    (5, 1, 1, 1, 33, True, "contiguous"),
    (0, 1, 14, 14, 64, True, "contiguous"),
]
STREAM_CASES = STREAM_GPU_CASES if HAS_GPU else STREAM_CPU_CASES


@pytest.fixture
def stream(monkeypatch):
    """CPVT_TRITON_KERNELS=stream, and the tiled launches made to fail, so that a test can only
    pass on the streaming kernels."""
    from cpvt_kernels import triton_peg

    def tiled(*args, **kwargs):
        raise AssertionError("the tiled Triton kernels ran under CPVT_TRITON_KERNELS=stream")

    monkeypatch.setenv("CPVT_TRITON_KERNELS", "stream")
    monkeypatch.setattr(triton_peg, "launch_forward", tiled)
    monkeypatch.setattr(triton_peg, "launch_backward", tiled)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", STREAM_CASES,
                         ids=lambda c: "B{}-P{}-{}x{}-C{}-{}-{}".format(*c[:5], *c[5:]))
def test_stream_parity(device, dtype, case, stream, poison_empty):
    B, P, H, W, C, bias, layout = case
    test_parity_output_and_grads(device, dtype, (B, P, H, W, C, 3, 3, bias, layout), None)


@pytest.mark.parametrize("needs", GRAD_NEEDS)
def test_stream_only_required_grads(device, needs, stream, poison_empty):
    check_only_required_grads("triton", device, needs, H=9, W=5, C=7)


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, False),
                                  (False, False, True), (False, False, False)], ids=str)
def test_stream_backward_op_output_mask(device, mask, stream):
    _check_output_mask(device, mask, 9, 3, 3)


def test_stream_gradcheck(device, stream):
    B, P, H, W, C = (2, 1, 9, 5, 3) if HAS_GPU else (1, 1, 3, 2, 2)
    _, (x, w, b) = make_inputs(B, P, H, W, C, 3, 3, True, torch.float64, device)
    inputs = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()]
    assert torch.autograd.gradcheck(
        lambda *a: ck.fused_peg(a[0], a[1], a[2], (H, W), P, backend="triton"), inputs,
        eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stream_weight_grads_are_deterministic(device, dtype, stream):
    test_weight_grads_are_deterministic(device, dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("where", ["x", "weight"])
def test_stream_nan_and_inf_propagate_like_reference(device, where, stream):
    check_nonfinite_forward("triton", device, where)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("where", ["x", "weight", "grad_out"])
def test_stream_nan_and_inf_propagate_through_backward(device, where, stream):
    check_nonfinite_backward("triton", device, where)


@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
def test_stream_strided_grad_out(device, layout, stream):
    check_strided_grad_out("triton", device, layout)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter
def test_stream_nonfinite_weight_grad_x_only(device, stream):
    check_nonfinite_grad_x_only("triton", device, 3, C=10)


def test_stream_no_channels(device, stream):
    """C = 0: the persistent programs are shared out over the channel blocks, of which there
    are none; the backward divided by their count (ZeroDivisionError). Empty output and
    gradients, as from every backend."""
    x = torch.randn(2, 1 + 3 * 4, 0, device=device, requires_grad=True)
    w = torch.randn(0, 1, 3, 3, device=device, requires_grad=True)
    b = torch.randn(0, device=device, requires_grad=True)
    out = ck.fused_peg(x, w, b, (3, 4), 1, backend="triton")
    assert out.shape == x.shape and out.dtype == x.dtype
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), torch.randn(out.shape, device=device))
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape


@pytest.mark.parametrize("per_sm", [0, 1, 2, 5], ids=lambda v: f"per_sm{v}")
def test_stream_persistent_programs_walk_every_item(device, per_sm, poison_empty, monkeypatch):
    """However many items each persistent program walks (one program per item with PER_SM = 0,
    one program for all of them with PER_SM = 1 on one SM), the forward and grad_x are bitwise
    those of one program per item, and the weight and bias gradients, summed over a program's
    items before its slot is written, match the reference."""
    from cpvt_kernels import triton_peg as tp
    monkeypatch.setattr(tp, "_device_sms", lambda device: 1)  # a GPU of one SM
    B, P, H, W, C = (6, 1, 20, 40, 96) if HAS_GPU else (3, 1, 10, 5, 8)
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, 3, 3, True, torch.float32, device)
    g64 = torch.randn(x64.shape, dtype=torch.float64)
    g = g64.to(device=device, dtype=torch.float32)
    fcfg = dict(tp.stream_forward_config(H, W, C), PER_SM=per_sm)
    bcfg = dict(tp.stream_backward_config(H, W, C), PER_SM=per_sm)
    items = tp._stream_programs(B, H, W, fcfg)[2]
    slots = tp._stream_slots(items, -(-C // fcfg["BLOCK_C"]), fcfg, x.device)
    assert items >= 6 and 1 <= slots <= items
    if per_sm == 1:
        assert slots == 1  # one program walks every item
    out = tp.launch_stream_forward(x, w, b, H, W, P, False, fcfg)
    gx, gw, gb = tp.launch_stream_backward(g, x, w, H, W, P, (True, True, True), bcfg)
    one = dict(fcfg, PER_SM=0)
    assert torch.equal(out, tp.launch_stream_forward(x, w, b, H, W, P, False, one))
    gx1, _, _ = tp.launch_stream_backward(g, x, w, H, W, P, (True, True, True),
                                          dict(bcfg, PER_SM=0))
    assert torch.equal(gx, gx1)
    ref, gx_ref, gw_ref, gb_ref = reference_with_grads(x64, w64, b64, H, W, P, g64)
    for name, got, want in (("out", out, ref), ("grad_x", gx, gx_ref),
                            ("grad_weight", gw, gw_ref), ("grad_bias", gb, gb_ref)):
        assert not got.isnan().any(), f"{name} has unwritten (NaN) elements"
        assert rel_err(got, want) < TOLERANCE[torch.float32], name


# (B, H, W, C, itemsize): CPVT-Ti/S/B at 224 px, S at 384, B at 512, odd and small grids.
GEOMETRY_CASES = [(128, 14, 14, 192, 2), (128, 14, 14, 384, 2), (128, 14, 14, 768, 2),
                  (64, 24, 24, 384, 2), (32, 32, 32, 768, 2), (128, 14, 14, 384, 4),
                  (16, 7, 7, 512, 4), (1, 14, 14, 384, 2), (3, 17, 45, 97, 8), (1, 1, 1, 3, 2),
                  (0, 14, 14, 64, 2)]


@pytest.mark.parametrize("kind", ["fwd", "grad_x", "bwd"])
@pytest.mark.parametrize("case", GEOMETRY_CASES, ids=lambda c: "B{}-{}x{}-C{}-{}B".format(*c))
def test_stream_geometry(kind, case):
    """The streaming kernels' geometry model: four elements a thread, the kernel's warp budget
    an SM never exceeded, one wave of programs, no whole warp of pixels past the row's end where
    the row has an even width, strips that cover the grid."""
    from cpvt_kernels import triton_peg as tp
    B, H, W, C, itemsize = case
    sms = 132
    cfg = tp.stream_config(kind, H, W, C, B, sms, itemsize)
    bw, bc, warps, rh, per_sm = (cfg[k] for k in ("BLOCK_W", "BLOCK_C", "num_warps", "RH",
                                                  "PER_SM"))
    assert bw & (bw - 1) == 0 and bc & (bc - 1) == 0 and bc >= min(16, C)
    if bw * bc >= 128:
        assert bw * bc == 128 * warps
    assert per_sm * warps <= tp._STREAM_WARPS_PER_SM[kind][itemsize]
    if kind == "bwd" and B * H * W * C >= 4 * 128 * 32:
        assert warps == 4
    assert 1 <= rh <= max(H, 1)
    strips, wblocks, items = tp._stream_programs(B, H, W, cfg)
    assert strips * rh >= H and (strips - 1) * rh < max(H, 1)
    cblocks = -(-C // bc)
    slots = tp._stream_slots(items, cblocks, cfg, torch.device("meta"))  # meta: one SM
    assert slots <= items and (slots >= 1 or items == 0)
    with_sms = max(1, min(items, per_sm * sms // max(cblocks, 1)))
    if cblocks <= per_sm * sms:
        assert with_sms * cblocks <= per_sm * sms  # one wave
    if B > 0 and W % 2 == 0 and C >= 64 and W >= 2:
        assert (wblocks * bw - W) * bc < 128, cfg  # no idle warp past the row's end
    assert tp.stream_config(kind, H, W, C, B, sms, itemsize, block=(bw, bc)) == cfg
    assert cfg["PREFETCH"] == (1 if itemsize == 2 or (kind == "bwd" and itemsize == 4) else 0)


def test_stream_geometry_prefers_fewer_halo_rows_and_full_waves():
    from cpvt_kernels import triton_peg as tp
    # CPVT-S at 224 px: the 14 x 14 grid in one strip (2 halo rows for 14) fills the SMs
    cfg = tp.stream_forward_config(14, 14, 384, 128, 132, 2)
    assert cfg["RH"] == 14 and cfg["BLOCK_W"] == 2
    # one image: strips, so that more than a few programs run
    one = tp.stream_forward_config(14, 14, 384, 1, 132, 2)
    assert one["RH"] < 14
    with pytest.raises(ValueError):
        tp.stream_config("backward", 14, 14, 384)


# (B, P, H, W, C, cfg): blocks of 1 to 32 pixels, one pixel block or several with a partial
# last one, strips of 1 to H rows with a short last one, one program per item or persistent.
STREAM_GEOMETRIES = [
    (2, 1, 5, 3, 20, dict(BLOCK_W=1, BLOCK_C=16, RH=2, num_warps=1, PER_SM=3, PREFETCH=2)),
    (2, 1, 7, 5, 20, dict(BLOCK_W=2, BLOCK_C=32, RH=3, num_warps=1, PER_SM=1, PREFETCH=0)),
    (1, 2, 6, 9, 8, dict(BLOCK_W=4, BLOCK_C=16, RH=6, num_warps=1, PER_SM=0, PREFETCH=1)),
    (2, 0, 5, 3, 24, dict(BLOCK_W=32, BLOCK_C=16, RH=1, num_warps=2, PER_SM=2, PREFETCH=1)),
]


@pytest.mark.parametrize("B,P,H,W,C,cfg", STREAM_GEOMETRIES,
                         ids=lambda v: "x".join(map(str, v.values())) if isinstance(v, dict)
                         else str(v))
def test_stream_geometries_give_the_reference(device, B, P, H, W, C, cfg, poison_empty,
                                              monkeypatch):
    """Any block, strip height and programs, rows loaded an iteration ahead or not: the
    forward, grad_x alone and the fused backward against the reference."""
    from cpvt_kernels import triton_peg as tp
    monkeypatch.setattr(tp, "_device_sms", lambda device: 1)
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, 3, 3, True, torch.float32, device)
    g64 = torch.randn(x64.shape, dtype=torch.float64)
    g = g64.to(device=device, dtype=torch.float32)
    out = tp.launch_stream_forward(x, w, b, H, W, P, False, cfg)
    gx_alone = tp.launch_stream_forward(g, w, None, H, W, P, True, cfg)
    gx, gw, gb = tp.launch_stream_backward(g, x, w, H, W, P, (True, True, True), cfg)
    ref, gx_ref, gw_ref, gb_ref = reference_with_grads(x64, w64, b64, H, W, P, g64)
    for name, got, want in (("out", out, ref), ("grad_x alone", gx_alone, gx_ref),
                            ("grad_x", gx, gx_ref), ("grad_weight", gw, gw_ref),
                            ("grad_bias", gb, gb_ref)):
        assert not got.isnan().any(), f"{name} has unwritten (NaN) elements"
        assert rel_err(got, want) < TOLERANCE[torch.float32], name


def test_stream_row64_only_for_images_past_2_31_elements():
    from cpvt_kernels import triton_peg as tp
    assert not tp._stream_row64(14, 14, 384, 384)
    assert not tp._stream_row64(64, 64, 2**31 // (67 * 64) - 1)
    assert tp._stream_row64(64, 64, 2**31 // (67 * 64) + 1)
    assert tp._stream_row64(1024, 1024, 1, 2048)  # the largest stride decides
    assert tp._stream_row64(14, 14, -(2**31))


def test_stream_row64_offsets_give_the_same_results(device, poison_empty, monkeypatch):
    """The 64-bit row offsets (images past 2^31 elements, too large to test here) compute the
    forward, grad_x alone and the fused backward bitwise as the 32-bit ones do."""
    from cpvt_kernels import triton_peg as tp
    B, P, H, W, C = (3, 1, 14, 14, 96) if HAS_GPU else (2, 1, 5, 4, 6)
    (_, _, _), (x, w, b) = make_inputs(B, P, H, W, C, 3, 3, True, torch.float32, device)
    g = torch.randn(x.shape, dtype=torch.float32).to(device)
    fcfg = tp.stream_forward_config(H, W, C)
    bcfg = tp.stream_backward_config(H, W, C)

    def run():
        return (tp.launch_stream_forward(x, w, b, H, W, P, False, fcfg),
                *tp.launch_stream_backward(g, x, w, H, W, P, (True, False, False), bcfg)[:1],
                *tp.launch_stream_backward(g, x, w, H, W, P, (True, True, True), bcfg))

    narrow = run()
    monkeypatch.setattr(tp, "_stream_row64", lambda *a: True)
    wide = run()
    for name, a, c in zip(("out", "grad_x alone", "grad_x", "grad_weight", "grad_bias"),
                          narrow, wide):
        assert not a.isnan().any(), f"{name} has unwritten (NaN) elements"
        assert torch.equal(a, c), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stream_prefetch_gives_the_same_results(device, dtype, poison_empty):
    """Rows loaded an iteration ahead (PREFETCH) or as they are used: the forward, grad_x alone
    and the fused backward bitwise the same (the same sums in the same order)."""
    from cpvt_kernels import triton_peg as tp
    B, P, H, W, C = (4, 1, 14, 14, 192) if HAS_GPU else (2, 1, 6, 4, 8)
    (_, _, _), (x, w, b) = make_inputs(B, P, H, W, C, 3, 3, True, dtype, device)
    g = torch.randn(x.shape, dtype=torch.float32).to(device=device, dtype=dtype)
    cfg = dict(tp.stream_forward_config(H, W, C, B, 1, 2), RH=max(1, H // 2))

    def run(prefetch):
        c = dict(cfg, PREFETCH=prefetch)
        return (tp.launch_stream_forward(x, w, b, H, W, P, False, c),
                tp.launch_stream_forward(g, w, None, H, W, P, True, c),
                *tp.launch_stream_backward(g, x, w, H, W, P, (True, True, True), c))

    names = ("out", "grad_x alone", "grad_x", "grad_weight", "grad_bias")
    base = run(0)
    for prefetch in (1, 2):  # forward: 1 or 2 rows ahead; backward: grad_out (1), and x (2)
        for name, a, c in zip(names, base, run(prefetch)):
            assert not a.isnan().any(), f"{name} has unwritten (NaN) elements"
            assert torch.equal(a, c), (name, prefetch)


@gpu
@large_gpu_memory(3 * (1 + 1024 * 1024) * 2048 * 2 + (2 << 30))
def test_stream_image_past_2_31_elements(monkeypatch):
    """One image of more than 2^31 elements on the streaming kernels (64-bit row offsets): the
    last rows of the grid against the reference over the last rows (the rows above the one
    compared are its halo)."""
    monkeypatch.setenv("CPVT_TRITON_KERNELS", "stream")
    from cpvt_kernels import triton_peg as tp
    P, H, W, C = 1, 1024, 1024, 2048
    assert tp._stream_row64(H, W, C)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, P + H * W, C, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(C, 1, 3, 3, device="cuda", dtype=torch.bfloat16, generator=gen) / 3
    b = torch.randn(C, device="cuda", dtype=torch.bfloat16, generator=gen)
    with torch.no_grad():
        out = ck.fused_peg(x, w, b, (H, W), P, backend="triton")
    rows = 4  # the reference sees rows H - 4 .. H - 1; its first row lacks its upper halo
    last = x[:, P + (H - rows) * W:].detach().double()
    ref = ck.peg_reference(last, w.double(), b.double(), rows, W, 0)
    assert rel_err(out[:, P + (H - rows + 1) * W:], ref[:, W:]) < TOLERANCE[torch.bfloat16]
    assert torch.equal(out[:, :P], x[:, :P])


@pytest.mark.parametrize("kernels", ["tile", "stream"])
def test_prefix_tokens_2_30_elements_apart(device, kernels, poison_empty, monkeypatch):
    """Prefix tokens 2^30 elements apart: the grid starts past element 2^31 of its image, so its
    offset (P * token stride) takes 64 bits. The storage is only touched where x lies."""
    monkeypatch.setenv("CPVT_TRITON_KERNELS", kernels)
    P, H, W, C = 2, 1, 1, 16
    step = 2**30 + 16
    storage = torch.empty_strided((P * step + C,), (1,), dtype=torch.bfloat16, device=device)
    x = storage.as_strided((1, P + H * W, C), (3 * step, step, 1))
    x.copy_(torch.randn(x.shape).to(torch.bfloat16))
    w = (torch.randn(C, 1, 3, 3) / 3).to(device=device, dtype=torch.bfloat16)
    b = torch.randn(C).to(device=device, dtype=torch.bfloat16)
    x64 = x.detach().cpu().double()
    with torch.no_grad():
        out = ck.fused_peg(x, w, b, (H, W), P, backend="triton")
    ref = ck.peg_reference(x64, w.cpu().double(), b.cpu().double(), H, W, P)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
    del storage, x


@pytest.mark.parametrize("P, C", [(5, 16), (300, 16), (9000, 128)])
def test_stream_prefix_tokens_copied_in_chunks(device, stream, poison_empty, P, C):
    """More prefix tokens than one register tile holds are copied a chunk at a time, forward
    and backward (9000 x 128 in one tile is past Triton's largest block)."""
    from cpvt_kernels import triton_peg as tp
    assert tp._prefix_block(300, 16) == 128 and tp._prefix_block(5, 16) == 8
    assert tp._prefix_block(1, 128) == 1 and tp._prefix_block(0, 128) == 1
    B = 1 if P > 1000 else 2
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, 2, 3, C, 3, 3, True, torch.float32, device)
    grad64 = torch.randn(x64.shape, dtype=torch.float64)
    ref, gx_ref, gw_ref, gb_ref = reference_with_grads(x64, w64, b64, 2, 3, P, grad64)
    x, w, b = leaf(x), leaf(w), leaf(b)
    out = ck.fused_peg(x, w, b, (2, 3), P, backend="triton")
    out.backward(grad64.to(device=device, dtype=torch.float32))
    for name, got, want in (("out", out, ref), ("grad_x", x.grad, gx_ref),
                            ("grad_weight", w.grad, gw_ref), ("grad_bias", b.grad, gb_ref)):
        assert rel_err(got, want) < TOLERANCE[torch.float32], name


def test_channel_grid_spills_onto_axis_2():
    """CUDA takes at most 65535 programs on grid axes 1 and 2: channel blocks past that go on
    axis 2 too, and the kernels then take their HUGE_C path, as they do for products of C with
    the kernel size past 2^31."""
    from cpvt_kernels import triton_peg as tp
    assert tp._channel_grid(7, 1) == (7, 1)
    assert tp._channel_grid(7, 65535) == (7, 65535)
    assert tp._channel_grid(7, 65536) == (7, 65535, 2)
    assert tp._channel_grid(7, 3 * 65535 + 1) == (7, 65535, 4)
    assert not tp._huge_channels(768, 31 * 31, 16)
    assert not tp._huge_channels(65535 * 16, 9, 16) and tp._huge_channels(65535 * 16 + 1, 9, 16)
    assert tp._huge_channels(2**31 // 962 + 1, 31 * 31, 2**20)  # the partial sums' offsets


@pytest.mark.parametrize("kernels", ["tile", "stream"])
def test_huge_channel_path(device, kernels, poison_empty, monkeypatch):
    """The kernels' path for millions of channels (HUGE_C: channel blocks spread over grid axes
    1 and 2, 64-bit channel offsets), run here by lowering the axis limit to 2: the forward,
    backward and the partial sums' reduction give the reference's results, with no channel
    block left out or done twice. The streaming kernels leave such a C to the tiled ones."""
    from cpvt_kernels import triton_peg as tp
    monkeypatch.setenv("CPVT_TRITON_KERNELS", kernels)
    monkeypatch.setattr(tp, "_MAX_GRID_YZ", 2)
    grids = []
    real_grid = tp._channel_grid
    monkeypatch.setattr(tp, "_channel_grid", lambda *a: grids.append(real_grid(*a)) or grids[-1])
    B, P, H, W, C = 2, 1, 3, 4, 260  # the reduction's 128-channel blocks: 3
    for name in ("forward_config", "backward_config"):
        real = getattr(tp, name)
        monkeypatch.setattr(tp, name, lambda *a, _real=real: {**_real(*a), "BLOCK_C": 16})
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, 3, 3, True, torch.float32, device)
    grad64 = torch.randn(x64.shape, dtype=torch.float64)
    ref, gx_ref, gw_ref, gb_ref = reference_with_grads(x64, w64, b64, H, W, P, grad64)
    x, w, b = leaf(x), leaf(w), leaf(b)
    out = ck.fused_peg(x, w, b, (H, W), P, backend="triton")
    out.backward(grad64.to(device=device, dtype=torch.float32))
    # forward, backward, reduction: each on axes 1 and 2 (a kernel that read axis 1 alone
    # would leave channel blocks unwritten: NaN)
    assert len(grids) == 3 and all(g[1] == 2 and g[2] > 1 for g in grids), grids
    for name, got, want in (("out", out, ref), ("grad_x", x.grad, gx_ref),
                            ("grad_weight", w.grad, gw_ref), ("grad_bias", b.grad, gb_ref)):
        assert rel_err(got, want) < TOLERANCE[torch.float32], name


# The tiled backward's partial sums take tiles * (kh*kw + 1) * C floats; where they would pass
# CPVT_TRITON_PARTIALS_BYTES the images run in waves, whose reductions carry their sums over in
# the same order: bitwise the same gradients as one pass.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("block_t,k,waves", [(32, 3, [8, 1]), (16, 3, [4, 4, 1]),
                                             (8, 1, [2, 2, 2, 2, 1])],
                         ids=["tiles1-k3", "tiles2-k3", "tiles4-k1"])
def test_backward_partial_waves_match_one_pass(device, dtype, block_t, k, waves, poison_empty,
                                               monkeypatch):
    from cpvt_kernels import triton_peg as tp
    real = tp.backward_config
    monkeypatch.setattr(tp, "backward_config", lambda *a: {**real(*a), "BLOCK_T": block_t})
    seen = []
    real_reduce = tp._reduce_partials
    monkeypatch.setattr(tp, "_reduce_partials",
                        lambda *a, **kw: seen.append(a[3]) or real_reduce(*a, **kw))
    B, P, H, W, C = 9, 1, 5, 6, 20  # 31 tokens: tiles of 32, 16 or 8 tokens, 1, 2 or 4 an image
    (x64, w64, b64), (x, w, _) = make_inputs(B, P, H, W, C, k, k, True, dtype, device)
    grad = torch.randn(x.shape, dtype=dtype, device=device)
    _, gx_ref, gw_ref, gb_ref = reference_with_grads(x64, w64, b64, H, W, P,
                                                     grad.double().cpu())
    tiles = (P + H * W + block_t - 1) // block_t
    for mask in ([True, True, True], [False, True, False], [False, False, True]):
        results = []
        for budget in ("", "1"):  # one pass; the fewest images a wave
            monkeypatch.setenv("CPVT_TRITON_PARTIALS_BYTES", budget)
            seen.clear()
            results.append(torch.ops.cpvt.peg_backward_triton(grad, x, w, H, W, P, mask))
            assert seen == ([B * tiles] if budget == "" else [n * tiles for n in waves])
        for want, one, waved, ref in zip(mask, *results, (gx_ref, gw_ref, gb_ref)):
            if want:
                assert not one.isnan().any() and torch.equal(one, waved)
                assert rel_err(one, ref.to(device)) < TOLERANCE[dtype]


@pytest.mark.parametrize("budget", ["", "1"])
def test_tiled_backward_keeps_symbolic_sizes(monkeypatch, budget):
    """Traced with symbolic sizes (torch.compile with dynamic shapes), the tiled backward's host
    code puts no guard on the batch, tokens or channels, whatever the budget: one launch of each
    kernel over all the tiles, as without waves."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (DimDynamic, ShapeEnv,
                                                       StatelessSymbolicContext)
    from cpvt_kernels import triton_peg as tp
    launches = []
    monkeypatch.setattr(tp, "_wrap", lambda kernel: type(
        "Recorder", (), {"__getitem__": lambda self, grid: lambda *a, **kw: launches.append(
            (kernel, grid, kw))})())
    monkeypatch.setenv("CPVT_TRITON_PARTIALS_BYTES", budget)
    shape_env = ShapeEnv()
    B, P, H, W, C, k = 5, 1, 3, 3, 8, 3
    x, g, w = torch.randn(B, P + H * W, C), torch.randn(B, P + H * W, C), torch.randn(C, 1, k, k)
    with FakeTensorMode(shape_env=shape_env) as mode:
        dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 3)
        fx = mode.from_tensor(x, symbolic_context=dynamic)
        fg = mode.from_tensor(g, symbolic_context=dynamic)
        fw = mode.from_tensor(w)
        sizes = {s.node.expr for s in fx.shape}
        tp.launch_backward(fg, fx, fw, H, W, P, [True, True, True],
                           tp.backward_config(fx.shape[1], fx.shape[2]))
    assert all(not isinstance(s, int) for s in fx.shape)
    guarded = set().union(*(g.expr.free_symbols for g in shape_env.guards), shape_env.replacements)
    assert not guarded & sizes, [g.expr for g in shape_env.guards]
    assert [kernel for kernel, _, _ in launches] == [tp._peg_bwd_kernel,
                                                     tp._reduce_partials_kernel]
    assert launches[1][2]["FIRST"] and launches[1][2]["LAST"]


def test_partial_waves_sizes(monkeypatch):
    """Images a wave: all where they fit the budget (default 1 GiB); else as many as fit, in
    whole groups of 8 tiles (the reduction's rows), at least one group."""
    from cpvt_kernels import triton_peg as tp
    per_image = 9 * 962 * 768 * 4  # k = 31, C = 768, 32x32: 9 tiles an image, 26.6 MB
    assert tp._partial_waves(256, 2, 2 * 10 * 768 * 4) == 256  # CPVT-B 3x3: 15.7 MB in all
    assert tp._partial_waves(256, 9, per_image) == 40  # 6.3 GiB in all; 40 images fit 1 GiB
    monkeypatch.setenv("CPVT_TRITON_PARTIALS_BYTES", str(100 * per_image))
    assert tp._partial_waves(256, 9, per_image) == 96
    monkeypatch.setenv("CPVT_TRITON_PARTIALS_BYTES", "0")
    assert tp._partial_waves(256, 9, per_image) == 8
    assert tp._partial_waves(256, 6, per_image) == 4 and tp._partial_waves(3, 6, 1) == 3
    for bad in ("1G", "-5", "2.5", "+5", " ", " 12", "1_000"):
        monkeypatch.setenv("CPVT_TRITON_PARTIALS_BYTES", bad)
        with pytest.raises(ValueError, match="CPVT_TRITON_PARTIALS_BYTES must be a number"):
            tp._partial_waves(2, 1, 1)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device(device):
    """Tensors on a GPU other than the current one: the kernels launch there (Triton launches
    on the current device), forward and backward."""
    (x64, w64, b64), (x, w, b) = make_inputs(2, 1, 7, 9, 64, 3, 3, True, torch.float32, "cuda:1")
    x = leaf(x)
    out = ck.fused_peg(x, w, b, (7, 9), 1, backend="triton")
    assert out.device == x.device
    assert rel_err(out, ck.peg_reference(x64, w64, b64, 7, 9, 1)) < TOLERANCE[torch.float32]
    grad_x, = torch.autograd.grad(out, x, torch.ones_like(out))
    assert grad_x.device == x.device and torch.isfinite(grad_x).all()


def test_stream_setting_is_checked_and_other_kernel_sizes_stay_tiled(device, monkeypatch):
    """A bad CPVT_TRITON_KERNELS raises; kernels other than 3x3 keep the tiled kernels."""
    from cpvt_kernels import triton_peg
    _, (x, w, b) = make_inputs(1, 1, 3, 4, 8, 3, 3, True, torch.float32, device)
    monkeypatch.setenv("CPVT_TRITON_KERNELS", "fast")
    with pytest.raises(ValueError, match="CPVT_TRITON_KERNELS"):
        ck.fused_peg(x, w, b, (3, 4), 1, backend="triton")
    monkeypatch.setenv("CPVT_TRITON_KERNELS", "stream")
    calls = []
    real = triton_peg.launch_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(triton_peg, "launch_forward", counted)
    ck.fused_peg(x, torch.randn(8, 1, 5, 3, device=device), b, (3, 4), 1, backend="triton")
    assert calls == [1]
    ck.fused_peg(x, w, b, (3, 4), 1, backend="triton")
    assert calls == [1]  # 3x3: the streaming kernel


# ---------------------------------------------------------------------------------------------
# Multiply-adds where Triton's compiler does not contract them (tl.fma)

def test_explicit_fma_where_the_compiler_does_not_contract(monkeypatch):
    """The kernels write tl.fma exactly where Triton would not contract a * b + c itself:
    TRITON_DEFAULT_FP_FUSION=0, or a Triton whose default is off (3.10 on) and whose knob is
    gone; never under TRITON_FORCE_DISABLE_FP_FUSION, nor with a Triton from before its knobs."""
    from types import SimpleNamespace

    import triton
    from cpvt_kernels import triton_peg as tp
    lang = getattr(getattr(triton, "knobs", None), "language", None)
    if lang is not None and hasattr(lang, "default_fp_fusion"):
        monkeypatch.delenv("TRITON_FORCE_DISABLE_FP_FUSION", raising=False)
        monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION", raising=False)
        assert tp.explicit_fma() is (not lang.default_fp_fusion)
        monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
        assert tp.explicit_fma() is True
        monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
        assert tp.explicit_fma() is False
    # Stand-ins for the Triton versions this one is not.
    for version, knobs, want in (
            ("3.3.1", None, False),
            ("3.9.0", SimpleNamespace(default_fp_fusion=True), False),
            ("3.9.0", SimpleNamespace(default_fp_fusion=False), True),
            ("3.9.0", SimpleNamespace(default_fp_fusion=False, force_disable_fp_fusion=True),
             False),
            ("3.10.0", SimpleNamespace(), True),
            ("3.10.0+git1234", SimpleNamespace(force_disable_fp_fusion=True), False),
            ("3.9.2", SimpleNamespace(), False)):
        fake = SimpleNamespace(__version__=version)
        if knobs is not None:
            fake.knobs = SimpleNamespace(language=knobs)
        monkeypatch.setattr(tp, "triton", fake)
        assert tp.explicit_fma() is want, (version, knobs)


@pytest.fixture
def no_fp_fusion(monkeypatch):
    """Triton told not to contract multiply-adds (its default from 3.10), and the launches of
    the kernels recorded: ``{kernel name: its FMA argument}``."""
    import triton
    lang = getattr(getattr(triton, "knobs", None), "language", None)
    if lang is None or not hasattr(lang, "default_fp_fusion"):
        pytest.skip(f"triton {triton.__version__} has no TRITON_DEFAULT_FP_FUSION knob")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    monkeypatch.delenv("TRITON_FORCE_DISABLE_FP_FUSION", raising=False)
    launched = {}
    from cpvt_kernels import triton_peg
    real_wrap = triton_peg._wrap

    class Recorded:
        def __init__(self, kernel):
            self.kernel, self.wrapped = kernel, real_wrap(kernel)

        def __getitem__(self, grid):
            launch = self.wrapped[grid]

            def run(*args, **kwargs):
                launched[self.kernel.fn.__name__] = kwargs.get("FMA")
                return launch(*args, **kwargs)
            return run

    monkeypatch.setattr(triton_peg, "_wrap", Recorded)
    return launched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernels, case", [
    ("tile", (2, 1, 5, 6, 17, 3, 3, True, "contiguous")),
    ("tile", (1, 2, 4, 5, 9, 7, 5, False, "offset_slice")),  # taps looped over rows
    ("stream", (2, 1, 7, 5, 9, 3, 3, True, "strided_channels")),
], ids=lambda v: v if isinstance(v, str) else _case_id(v))
def test_kernels_with_explicit_fma(device, dtype, kernels, case, no_fp_fusion, poison_empty,
                                   monkeypatch):
    """The kernels' tl.fma paths (taken where the compiler does not contract) give the
    reference's output and gradients, the input gradient alone included."""
    monkeypatch.setenv("CPVT_TRITON_KERNELS", kernels)
    test_parity_output_and_grads(device, dtype, case, None)
    check_only_required_grads("triton", device, "x", H=5, W=4, C=6)
    fma_kernels = {"tile": ["_peg_fwd_kernel"],
                   "stream": ["_peg_stream3_fwd_kernel", "_peg_stream3_bwd_kernel"]}[kernels]
    assert {k: no_fp_fusion.get(k) for k in fma_kernels} == dict.fromkeys(fma_kernels, True)


# ---------------------------------------------------------------------------------------------
# Registration and selection

def test_ops_are_registered_with_symbolic_sizes(device):
    fwd = torch.ops.cpvt.peg_forward_triton.default._schema
    bwd = torch.ops.cpvt.peg_backward_triton.default._schema
    assert "SymInt H, SymInt W" in str(fwd), fwd
    assert "SymInt H, SymInt W" in str(bwd) and "bool[] output_mask" in str(bwd), bwd


def test_backward_op_checks_its_inputs(device):
    _, (x, w, _) = make_inputs(1, 1, 3, 3, 4, 3, 3, False, torch.float32, device)
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.cpvt.peg_backward_triton(x[:, :-1], x, w, 3, 3, 1, [True, True, True])
    with pytest.raises(TypeError, match="grad_out dtype must match x"):
        torch.ops.cpvt.peg_backward_triton(x.double(), x, w, 3, 3, 1, [True, True, True])
    with pytest.raises(ValueError, match="output_mask"):
        torch.ops.cpvt.peg_backward_triton(x, x, w, 3, 3, 1, [True, True])
    with pytest.raises(ValueError, match="x.shape"):
        torch.ops.cpvt.peg_forward_triton(x, w, None, 3, 4, 1)


def test_import_error_when_triton_is_unusable():
    """A broken Triton makes the backend unavailable with a reason, never a crash at import."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, cpvt_kernels as ck\n"
        "try:\n"
        "    import cpvt_kernels.triton_peg\n"
        "    print('IMPORTED')\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR')\n"
        "assert 'triton' not in ck.available_backends('cpu')\n"
        "x, w = torch.randn(1, 5, 2), torch.randn(2, 1, 3, 3)\n"
        "try:\n"
        "    ck.fused_peg(x, w, None, (2, 2), 1, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RUNTIMEERROR', e)\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "IMPORTERROR" in res.stdout and "RUNTIMEERROR" in res.stdout, res.stdout
    assert "pip install triton" in res.stdout, res.stdout


@gpu
def test_auto_picks_triton_on_cuda_without_cuda_kernels():
    want = "cuda" if "cuda" in ck.available_backends("cuda") else "triton"
    assert ck.ops.resolve_backend("auto", "cuda") == want or ck.ops.ENV_BACKEND is not None


# ---------------------------------------------------------------------------------------------
# GPU only: the torch.library contract and very large tensors

@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES[:3] + GPU_CASES[6:7], ids=_case_id)
def test_opcheck(case, dtype):
    B, P, H, W, C, kh, kw, bias, layout = case
    _, (x, w, b) = make_inputs(B, P, H, W, C, kh, kw, bias, dtype, "cuda")
    x = layout_as(x, layout)
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(torch.ops.cpvt.peg_forward_triton.default, (x, w, b, H, W, P))
    g = torch.randn(x.shape, dtype=dtype, device="cuda")
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(torch.ops.cpvt.peg_backward_triton.default,
                              (g, x.detach(), w.detach(), H, W, P, mask))


@gpu
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(dynamic):
    torch._dynamo.reset()
    peg = ck.FusedPEG(96, 3, num_prefix_tokens=1, backend="triton").cuda()

    def step(m, x, h, w):
        y = m(x, h, w)
        return (y * y).sum(), y

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for h, w in [(14, 14), (9, 12)]:
        x = torch.randn(3, 1 + h * w, 96, device="cuda", requires_grad=True)
        params = [x, peg.proj.weight, peg.proj.bias]
        loss_e, y_e = step(peg, x, h, w)
        g_e = torch.autograd.grad(loss_e, params)
        loss_c, y_c = compiled(peg, x, h, w)
        g_c = torch.autograd.grad(loss_c, params)
        assert rel_err(y_c, y_e) < 1e-6
        for a, b in zip(g_c, g_e):
            assert rel_err(a, b) < 1e-6


@gpu
def test_compile_dynamic_resolutions_without_recompiling():
    torch._dynamo.reset()
    peg = ck.FusedPEG(24, 3, backend="triton").cuda()
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda t, h, w: peg(t, h, w), backend=counter, dynamic=True,
                       fullgraph=True)
    for h, w in [(4, 5), (7, 3), (14, 14)]:
        x = torch.randn(2, 1 + h * w, 24, device="cuda")
        assert rel_err(fn(x, h, w), peg(x, h, w)) < 1e-6
    assert counter.frame_count == 1


@gpu
def test_one_launch_forward_two_backward():
    """Forward is one kernel (prefix copy included); backward is the fused pass plus the
    reduction of the partial sums."""
    from torch.profiler import ProfilerActivity, profile

    _, (x, w, b) = make_inputs(2, 1, 14, 14, 64, 3, 3, True, torch.float32, "cuda")
    x, w, b = leaf(x), leaf(w), leaf(b)
    g = torch.randn_like(x)
    torch.autograd.grad(ck.fused_peg(x, w, b, (14, 14), 1, backend="triton"), [x, w, b], g)

    def kernels(fn):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            result = fn()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA]
        return result, names

    out, fwd = kernels(lambda: ck.fused_peg(x, w, b, (14, 14), 1, backend="triton"))
    assert len(fwd) == 1 and "_peg_fwd_kernel" in fwd[0], fwd
    _, bwd = kernels(lambda: torch.autograd.grad(out, [x, w, b], g))
    assert len(bwd) == 2, bwd
    assert "_peg_bwd_kernel" in bwd[0] and "_reduce_partials_kernel" in bwd[1], bwd


@gpu
def test_compile_has_no_graph_break_and_keeps_the_kernels():
    torch._dynamo.reset()
    peg = ck.FusedPEG(32, 3, backend="triton").cuda()
    x = torch.randn(2, 1 + 4 * 4, 32, device="cuda")
    explain = torch._dynamo.explain(lambda t: peg(t, 4, 4))(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


BIG_B = 2**31 // (197 * 768) + 2  # (BIG_B, 197, 768): the last images past element 2**31


@gpu
@large_gpu_memory(4 * BIG_B * 197 * 768 * 2 + (2 << 30))
def test_more_than_2_31_elements():
    """64-bit offsets: the last images lie past element 2**31."""
    P, H, W, C = 1, 14, 14, 768
    N = P + H * W
    B = BIG_B
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(C, 1, 3, 3, device="cuda", dtype=torch.bfloat16, generator=g) / 3
    b = torch.randn(C, device="cuda", dtype=torch.bfloat16, generator=g)
    assert x.numel() > 2**31
    xr, wr, br = x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    out = ck.fused_peg(xr, wr, br, (H, W), P, backend="triton")
    tail = slice(B - 2, B)
    ref = ck.peg_reference(x[tail].detach().double(), w.detach().double(), b.detach().double(),
                           H, W, P)
    assert rel_err(out[tail], ref) < TOLERANCE[torch.bfloat16]
    grad = torch.ones_like(out)
    grad[tail] = 2
    out.backward(grad)
    del out
    gx_tail = x.grad[tail]
    x_ref = x[tail].detach().double().requires_grad_()
    ck.peg_reference(x_ref, w.detach().double(), None, H, W, P).backward(
        torch.full(x_ref.shape, 2.0, dtype=torch.float64, device="cuda"))
    assert rel_err(gx_tail, x_ref.grad) < TOLERANCE[torch.bfloat16]
    # grad_bias[c] = sum over every grid token of grad: (B + 2) * H * W
    assert rel_err(b.grad, torch.full((C,), float((B + 2) * H * W))) < TOLERANCE[torch.bfloat16]
