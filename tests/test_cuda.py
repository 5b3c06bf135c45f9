"""The cuda backend: kernels built and registered, parity with the float64 reference,
gradients, determinism, torch.library integration, bad input, and agreement with triton.

Without a GPU only the build check runs: a build that should contain the CUDA kernels (the same
rule as setup.py: CPVT_BUILD_CUDA, else a CUDA build of torch plus a CUDA toolkit) must have
registered them. Everything else needs a CUDA device.
"""
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import cpvt_kernels as ck
from conftest import (DTYPES, GRAD_LAYOUTS, GRAD_NEEDS, HAS_GPU, TOLERANCE,
                      check_expanded_grad_out, check_strided_grad_out,
                      check_nonfinite_backward, check_nonfinite_forward,
                      check_nonfinite_grad_x_only, check_only_required_grads, large_gpu_memory,
                      layout_as, leaf, make_inputs, poison_allocator, reference_with_grads,
                      rel_err, require_backend)

gpu = pytest.mark.skipif(not HAS_GPU, reason="GPU-only: no CUDA device")
KERNELS = [(1, 1), (3, 3), (5, 5), (7, 7), (3, 5), (9, 9), (31, 31)]


def _cuda_build_expected():
    """(expected, why): whether setup.py's rules would have built the CUDA kernels."""
    flag = os.environ.get("CPVT_BUILD_CUDA", "").strip().lower()
    if flag:
        return flag in ("1", "true", "yes", "on"), f"CPVT_BUILD_CUDA={flag}"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:  # setup.py takes the root it is given, and needs its nvcc
        nvcc = os.path.join(home, "bin", "nvcc")
        if not os.access(nvcc, os.X_OK):
            return False, f"no bin/nvcc in CUDA_HOME/CUDA_PATH {home}"
    else:
        nvccs = [shutil.which("nvcc") or ""] + sorted(glob.glob("/usr/local/cuda*/bin/nvcc"),
                                                      reverse=True)
        nvcc = next((n for n in nvccs if n and os.path.exists(n)), None)
        if nvcc is None:
            return False, "no CUDA toolkit found"
    # setup.py leaves the kernels out where the toolkit's major CUDA version is not torch's.
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"release (\d+)\.", out)
    if m and m[1] != torch.version.cuda.split(".")[0]:
        return False, f"toolkit CUDA {m[1]}.x, torch CUDA {torch.version.cuda}"
    return True, "torch CUDA build and a CUDA toolkit found"


def test_cuda_kernels_compiled_and_registered():
    """A build with CUDA registers both ops for the CUDA dispatch key (no GPU needed)."""
    expected, why = _cuda_build_expected()
    if not expected:
        pytest.skip(f"the extension is not expected to contain CUDA kernels ({why})")
    assert ck.ops._EXT_ERROR is None, f"cpvt_kernels._C failed to load: {ck.ops._EXT_ERROR}"
    hint = (f"a CUDA build was expected ({why}) but the extension has no CUDA kernels: rebuild "
            "with CUDA_HOME set, or set CPVT_BUILD_CUDA=0 for a CPU-only build")
    assert ck.ops.HAS_CUDA_KERNELS, hint
    for op in ("cpvt::peg_forward", "cpvt::peg_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op}: {hint}"


# ---------------------------------------------------------------------------------------------
# Helpers

@pytest.fixture(scope="module")
def device():
    return require_backend("cuda")


@pytest.fixture(params=["tile", "stream", "pipe"])
def kernels(request, monkeypatch):
    """The CUDA kernels the op runs (CPVT_CUDA_KERNELS): the tiled ones, the streaming ones
    where they apply (kernel size 1 or 3, 16-byte-aligned channels), or the streaming ones with
    the cp.async kernels where they apply (3x3, 16-byte-aligned channels; the forward in 16-bit
    types and float32, the backward with the weight gradient in 16-bit types)."""
    monkeypatch.setenv("CPVT_CUDA_KERNELS", request.param)
    return request.param


def _run(x, w, b, H, W, P, grad, backend="cuda"):
    """Output and gradients of fused_peg, with NaN-poisoned new buffers."""
    x, w, b = leaf(x), leaf(w), leaf(b)
    poison_allocator(x.shape, dtype=x.dtype, device="cuda")
    out = ck.fused_peg(x, w, b, size=(H, W), num_prefix_tokens=P, backend=backend)
    poison_allocator(x.shape, w.shape, (x.shape[2],), dtype=x.dtype, device="cuda")
    out.backward(grad)
    return out.detach(), x.grad, w.grad, (None if b is None else b.grad)


def _check_parity(device, dtype, B, P, H, W, C, kh, kw, bias=True, layout="contiguous",
                  grad_layout="contiguous"):
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, kh, kw, bias, dtype, device)
    # Shifted away from zero mean so that the sums behind grad_weight/grad_bias of a single
    # channel are not cancelled down to rounding noise (the metric divides by max |ref|).
    x64 = x64 + 0.5
    x = layout_as(x64.to(device=device, dtype=dtype), layout)
    grad64 = (torch.randn(x64.shape, dtype=torch.float64) + 0.5).to(dtype).double()
    ref, gx_ref, gw_ref, gb_ref = reference_with_grads(x64, w64, b64, H, W, P, grad64)
    grad = layout_as(grad64.to(device=device, dtype=dtype), grad_layout)

    out, gx, gw, gb = _run(x, w, b, H, W, P, grad)
    tol = TOLERANCE[dtype]
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert gx.shape == x.shape and gx.dtype == dtype
    assert gw.shape == w.shape and gw.dtype == dtype
    if bias:
        assert gb.shape == (C,) and gb.dtype == dtype
    for name, got, want in (("out", out, ref), ("grad_x", gx, gx_ref), ("grad_weight", gw, gw_ref),
                            ("grad_bias", gb, gb_ref)):
        if want is None:
            continue
        assert not got.isnan().any(), f"{name} has unwritten (NaN) elements"
        err = rel_err(got, want)
        assert err < tol, f"{name}: rel err {err:.3g} >= {tol:g}"
    if P > 0:  # prefix tokens pass through exactly, forward and backward
        assert torch.equal(out[:, :P], x[:, :P].detach())
        assert torch.equal(gx[:, :P].cpu(), grad64[:, :P].to(dtype))
    if B == 0:
        assert torch.count_nonzero(gw) == 0 and (gb is None or torch.count_nonzero(gb) == 0)


# ---------------------------------------------------------------------------------------------
# Parity with the float64 reference

@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("P", [0, 1, 2])
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"k{k[0]}x{k[1]}")
@pytest.mark.parametrize("C", [33, 64], ids=lambda c: f"C{c}")
def test_parity_kernel_sizes(device, dtype, P, kernel, C):
    """Every kernel size on both paths: C=64 takes 16-byte vectors, C=33 one element."""
    _check_parity(device, dtype, 2, P, 7, 9, C, *kernel, bias=P != 2)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [0, 1, 3])
@pytest.mark.parametrize("HW", [(1, 1), (7, 9), (14, 14), (24, 24), (3, 150)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("C", [1, 3, 17, 33, 192, 384, 768], ids=lambda c: f"C{c}")
def test_parity_shapes(device, dtype, B, HW, C):
    _check_parity(device, dtype, B, 1, *HW, C, 3, 3)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", [(3, 3), (7, 7), (5, 3)], ids=lambda k: f"k{k[0]}x{k[1]}")
@pytest.mark.parametrize("HW", [(24, 24), (32, 32), (9, 140)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_parity_tiled_grids(device, dtype, kernel, HW):
    """Grids that need several tiles per image, so tile halos overlap."""
    _check_parity(device, dtype, 2, 1, *HW, 192, *kernel)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["strided_channels", "offset_slice", "padded_tokens",
                                    "transposed", "channels_first"])
@pytest.mark.parametrize("kernel", [(3, 3), (7, 5)], ids=lambda k: f"k{k[0]}x{k[1]}")
def test_parity_layouts(device, dtype, layout, kernel):
    """Non-contiguous x and grad_out (conftest.layout_as): a channel stride of 2 (the kernel
    gets a contiguous copy), a storage offset that breaks 16-byte alignment (the scalar path),
    token and batch strides larger than C (aligned), and transposed storage."""
    _check_parity(device, dtype, 3, 1, 7, 9, 64, *kernel, layout=layout, grad_layout=layout)


# (B, P, H, W, C, k, layout): strips of the streaming kernels (14 rows: 2 x 7; 17: 6, 6, 5;
# 24: 3 x 8), several channel chunks, pixel blocks across a wide row, a 1x1 grid, strided
# tokens; C=33 is not vector-aligned and falls back to the tiled kernels. For the cp.async
# kernels (CPVT_CUDA_KERNELS=pipe; chunks of channels as pipe_channels picks them): 3 chunks of
# 64 channels (C=192), 5 of 64 (C=320), 2 of 32 (C=64 at W=24: a chunk of 64 would need 384
# threads), one of 8 (C=8), a row too wide for a block (W=300: the streaming kernels instead),
# and 1024 items of 2x2 pixels (4 chunks of 256), more than one wave of blocks holds on an H100
# (5 forward and 3 backward blocks of 128 threads an SM), so that blocks take several items.
STREAM_CASES = [
    (4, 1, 14, 14, 192, 3, "contiguous"),
    (2, 0, 17, 5, 320, 3, "padded_tokens"),
    (3, 2, 24, 24, 64, 3, "contiguous"),
    (2, 1, 32, 32, 96, 1, "contiguous"),
    (1, 1, 1, 1, 16, 3, "contiguous"),
    (2, 1, 3, 300, 8, 3, "contiguous"),
    (2, 1, 9, 9, 33, 3, "contiguous"),
    (3, 1, 5, 7, 8, 3, "padded_tokens"),
    (256, 2, 2, 2, 1024, 3, "contiguous"),
]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", STREAM_CASES,
                         ids=lambda c: "B{}-P{}-{}x{}-C{}-k{}-{}".format(*c))
def test_parity_streaming_kernels(device, dtype, case, kernels):
    B, P, H, W, C, k, layout = case
    _check_parity(device, dtype, B, P, H, W, C, k, k, layout=layout, grad_layout=layout)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_grad_out_only(device, dtype):
    """An aligned x with a misaligned grad_out takes the scalar path for both."""
    _check_parity(device, dtype, 2, 1, 14, 14, 192, 3, 3, grad_layout="offset_slice")


@gpu
def test_expanded_grad_out(device):
    """``out.sum().backward()`` hands the backward a stride-0 gradient."""
    check_expanded_grad_out("cuda", device, C=8)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
def test_strided_grad_out(device, dtype, layout, kernels):
    """A grad_out laid out otherwise than x (a transposed or sliced upstream gradient)."""
    check_strided_grad_out("cuda", device, layout, dtype)


@gpu
@pytest.mark.parametrize("needs", GRAD_NEEDS)
def test_only_required_grads(device, needs, kernels):
    check_only_required_grads("cuda", device, needs, C=12)


@gpu
@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, False),
                                  (False, False, True), (False, True, True), (True, True, False),
                                  (True, False, True), (False, False, False)], ids=str)
@pytest.mark.parametrize("kw", [5, 3])
def test_backward_op_output_mask(device, mask, kw, kernels):
    """The backward op returns empty (0,) tensors for masked-out outputs."""
    B, P, H, W, C = 2, 2, 3, 5, 6
    (x64, w64, _), (x, w, _) = make_inputs(B, P, H, W, C, 3, kw, False, torch.float64, device)
    grad64 = torch.randn(x64.shape, dtype=torch.float64)
    ref = reference_with_grads(x64, w64, torch.randn(C, dtype=torch.float64), H, W, P, grad64)
    got = torch.ops.cpvt.peg_backward(grad64.to(device), x, w, H, W, P, list(mask))
    for m, g, r in zip(mask, got, ref[1:]):
        if m:
            assert g.shape == r.shape and g.device == x.device and rel_err(g, r) < 1e-12
        else:
            assert g.shape == (0,)


@gpu
@pytest.mark.parametrize("where", ["x", "weight"])
@pytest.mark.parametrize("C", [9, 10])  # 10: 16-byte vectors of float64
def test_nan_and_inf_propagate_like_reference(device, where, C, kernels):
    check_nonfinite_forward("cuda", device, where, C=C)


@gpu
@pytest.mark.parametrize("where", ["x", "weight", "grad_out"])
@pytest.mark.parametrize("C", [9, 10])
def test_nan_and_inf_propagate_through_backward(device, where, C, kernels):
    """Output and every gradient have NaN and Inf where the reference has them, also where they
    meet the zero padding (see test_peg.py)."""
    check_nonfinite_backward("cuda", device, where, C=C)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where", ["x", "weight", "grad_out"])
def test_nan_and_inf_in_float32_and_bfloat16(device, dtype, where, kernels):
    """The vector kernels at C=16 (the streaming and cp.async ones too: the float64 cases above
    do not reach the cp.async kernels) keep the reference's NaN and Inf, forward and backward."""
    check_nonfinite_backward("cuda", device, where, C=16, dtype=dtype)


@gpu
@pytest.mark.parametrize("k", [3, 5, (3, 5), (5, 3)], ids=str)
@pytest.mark.parametrize("C", [9, 10])
def test_nonfinite_weight_grad_x_only(device, k, C, kernels):
    check_nonfinite_grad_x_only("cuda", device, k, C)


# ---------------------------------------------------------------------------------------------
# Gradcheck, determinism, torch.library

@gpu
@pytest.mark.parametrize("B,P,H,W,C,kh,kw,bias", [
    (2, 1, 3, 4, 4, 3, 3, True),    # 16-byte vectors (2 doubles)
    (2, 0, 4, 3, 5, 3, 5, False),   # odd C: one element per thread
    (1, 2, 3, 3, 6, 1, 1, True),
    (2, 1, 5, 4, 2, 5, 5, True),
    (1, 1, 3, 4, 3, 9, 9, True),
])
def test_gradcheck(device, B, P, H, W, C, kh, kw, bias, kernels):
    _, (x, w, b) = make_inputs(B, P, H, W, C, kh, kw, bias, torch.float64, device)
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def fn(*args):
        return ck.fused_peg(args[0], args[1], args[2] if bias else None, (H, W), P,
                            backend="cuda")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C,kernel", [(384, (3, 3)), (100, (7, 7)), (64, (5, 3))],
                         ids=lambda v: str(v))
def test_weight_grads_are_deterministic(device, dtype, C, kernel, kernels):
    """The same inputs give bitwise the same grad_weight and grad_bias on every run."""
    _, (x, w, b) = make_inputs(64, 1, 14, 14, C, *kernel, True, dtype, device)
    grad = torch.randn(x.shape, dtype=dtype, device=device)
    results = []
    for _ in range(5):
        ws, bs = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        ck.fused_peg(x, ws, bs, (14, 14), 1, backend="cuda").backward(grad)
        results.append((ws.grad, bs.grad))
    for gw, gb in results[1:]:
        assert torch.equal(gw, results[0][0]) and torch.equal(gb, results[0][1])


OPCHECK_SAMPLES = [  # (B, P, H, W, C, kh, kw, bias)
    (2, 1, 5, 6, 8, 3, 3, True),
    (1, 0, 3, 3, 5, 3, 5, False),
    (3, 2, 4, 7, 16, 1, 1, True),
    (2, 1, 6, 5, 24, 7, 7, True),
    (0, 1, 2, 2, 4, 3, 3, True),
]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=lambda s: "-".join(map(str, s)))
def test_opcheck_forward(device, sample, dtype):
    B, P, H, W, C, kh, kw, bias = sample
    _, (x, w, b) = make_inputs(B, P, H, W, C, kh, kw, bias, dtype, device)
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(torch.ops.cpvt.peg_forward.default, (x, w, b, H, W, P))


@gpu
@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True),
                                  (False, False, True)], ids=str)
@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=lambda s: "-".join(map(str, s)))
def test_opcheck_backward(device, sample, mask):
    B, P, H, W, C, kh, kw, _ = sample
    _, (x, w, _b) = make_inputs(B, P, H, W, C, kh, kw, False, torch.float32, device)
    g = torch.randn_like(x)
    torch.library.opcheck(torch.ops.cpvt.peg_backward.default, (g, x, w, H, W, P, list(mask)))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_fullgraph_equals_eager(device, dtype):
    torch._dynamo.reset()
    peg = ck.FusedPEG(64, 3, num_prefix_tokens=1, backend="cuda").to(device=device, dtype=dtype)
    x = torch.randn(4, 1 + 7 * 9, 64, device=device, dtype=dtype, requires_grad=True)

    def step(m, x):
        y = m(x, 7, 9)
        return (y.float() * y.float()).sum(), y

    params = [x, peg.proj.weight, peg.proj.bias]
    loss_e, y_e = step(peg, x)
    g_e = torch.autograd.grad(loss_e, params)
    loss_c, y_c = torch.compile(step, fullgraph=True)(peg, x)
    g_c = torch.autograd.grad(loss_c, params)
    assert torch.equal(y_c, y_e)  # the same kernel on the same inputs
    # The compiled graph may hand the backward a grad_out of other strides (another path).
    for a, b in zip(g_c, g_e):
        assert rel_err(a, b) < TOLERANCE[dtype] / 4


@gpu
def test_auto_picks_cuda_and_runs_on_current_stream(device):
    assert "cuda" in ck.available_backends("cuda")
    if ck.ops.ENV_BACKEND is None:
        assert ck.ops.resolve_backend("auto", "cuda") == "cuda"
    (x64, w64, b64), (x, w, b) = make_inputs(8, 1, 14, 14, 192, 3, 3, True, torch.float32, device)
    ref = ck.peg_reference(x64, w64, b64, 14, 14, 1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ck.fused_peg(x, w, b, (14, 14), 1, backend="cuda")
    stream.synchronize()
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device(device):
    (x64, w64, b64), (x, w, b) = make_inputs(2, 1, 7, 9, 64, 3, 3, True, torch.float32, "cuda:1")
    out = ck.fused_peg(x, w, b, (7, 9), 1, backend="cuda")
    assert out.device == x.device
    assert rel_err(out, ck.peg_reference(x64, w64, b64, 7, 9, 1)) < TOLERANCE[torch.float32]


# ---------------------------------------------------------------------------------------------
# Bad input reaching the C++ op directly (fused_peg checks the same in Python)

@gpu
def test_bad_inputs_raise(device):
    B, P, H, W, C = 2, 1, 4, 5, 8
    _, (x, w, b) = make_inputs(B, P, H, W, C, 3, 3, True, torch.float32, device)
    op = torch.ops.cpvt.peg_forward
    cases = [
        # The sizes are formatted into the message (an extension with a half-bound static
        # libstdc++ crashed here).
        (ValueError, r"x must be 3-D .*got shape \[21, 8\]", (x[0], w, b, H, W, P)),
        (ValueError, r"x.shape\[1\] must equal", (x, w, b, H, W + 1, P)),
        (ValueError, "H must be >= 1, got 0", (x, w, b, 0, W, P)),
        (ValueError, "num_prefix_tokens must be >= 0", (x, w, b, H, W, -1)),
        (ValueError, "weight must have shape", (x, w[:-1], b, H, W, P)),
        (ValueError, "must be odd", (x, torch.randn(C, 1, 2, 3, device=device), b, H, W, P)),
        (ValueError, "must be odd", (x, torch.randn(C, 1, 33, 33, device=device), b, H, W, P)),
        (ValueError, "bias must have shape", (x, w, b[:-1], H, W, P)),
        (TypeError, "weight dtype must match", (x, w.double(), b, H, W, P)),
        (TypeError, "bias dtype must match", (x, w, b.double(), H, W, P)),
        (TypeError, "must be float32", (x.int(), w.int(), None, H, W, P)),
        (RuntimeError, "weight must be on the device", (x, w.cpu(), b, H, W, P)),
        (RuntimeError, "bias must be on the device", (x, w, b.cpu(), H, W, P)),
    ]
    for exc, msg, args in cases:
        with pytest.raises(exc, match=msg):
            op(*args)
    g = torch.randn_like(x)
    with pytest.raises(ValueError, match="grad_out must have the shape"):
        torch.ops.cpvt.peg_backward(g[:, :-1], x, w, H, W, P, [True, True, True])
    with pytest.raises(TypeError, match="grad_out dtype must match"):
        torch.ops.cpvt.peg_backward(g.double(), x, w, H, W, P, [True, True, True])
    with pytest.raises(RuntimeError, match="grad_out must be on the device"):
        torch.ops.cpvt.peg_backward(g.cpu(), x, w, H, W, P, [True, True, True])
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        ck.fused_peg(x.cpu(), w.cpu(), b.cpu(), (H, W), P, backend="cuda")


# ---------------------------------------------------------------------------------------------
# Agreement with the triton backend

@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,P,H,W,C,kh,kw", [(4, 1, 14, 14, 192, 3, 3), (2, 0, 24, 24, 96, 7, 7),
                                             (3, 2, 7, 9, 33, 5, 3)])
def test_matches_triton(device, dtype, B, P, H, W, C, kh, kw):
    if "triton" not in ck.available_backends("cuda"):
        pytest.skip(f"triton backend unavailable: {ck.ops._unavailable_reason('triton', 'cuda')}")
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, kh, kw, True, dtype, device)
    grad = torch.randn(x.shape, dtype=dtype, device=device)
    ref = reference_with_grads(x64, w64, b64, H, W, P, grad.cpu().double())
    got_cuda = _run(x, w, b, H, W, P, grad, backend="cuda")
    got_triton = _run(x, w, b, H, W, P, grad, backend="triton")
    tol = TOLERANCE[dtype]
    for name, a, t, r in zip(("out", "grad_x", "grad_weight", "grad_bias"), got_cuda,
                             got_triton, ref):
        assert rel_err(a, r) < tol, f"cuda {name}"
        assert rel_err(t, r) < tol, f"triton {name}"
        # Both round once to dtype from float32 sums: they differ by a few ulps at most.
        assert rel_err(a, t) < tol, f"cuda vs triton {name}"


# ---------------------------------------------------------------------------------------------
# More than 2**31 elements

BIG = (14200, 1, 14, 14, 768)  # B, P, H, W, C: 2.15e9 elements a tensor


@gpu
@pytest.mark.slow
@large_gpu_memory(4 * BIG[0] * (BIG[1] + BIG[2] * BIG[3]) * BIG[4] * 2 + 6 * 2**30)
def test_more_than_2_31_elements(device):
    """64-bit indexing: (14200, 197, 768) bfloat16 tokens, 2.15e9 elements per tensor."""
    B, P, H, W, C = BIG
    N = P + H * W
    assert B * N * C > 2**31
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, N, C, device=device, dtype=dtype, generator=gen)
    w = (torch.randn(C, 1, 3, 3, device=device, generator=gen) / 3).to(dtype).requires_grad_()
    b = torch.randn(C, device=device, generator=gen).to(dtype).requires_grad_()
    x.requires_grad_()
    out = ck.fused_peg(x, w, b, (H, W), P, backend="cuda")
    grad = torch.randn(B, N, C, device=device, dtype=dtype, generator=gen)
    out.backward(grad)
    tol = TOLERANCE[dtype]
    # Output and grad_x of the first and the last images (the last lie past 2**31 elements).
    for sl in (slice(0, 2), slice(B // 2, B // 2 + 2), slice(B - 2, B)):
        x64, g64 = x[sl].detach().double(), grad[sl].double()
        ref, gx_ref, _, _ = reference_with_grads(x64, w.detach().double(), b.detach().double(),
                                                 H, W, P, g64)
        assert rel_err(out[sl], ref) < tol
        assert rel_err(x.grad[sl], gx_ref) < tol
    # grad_weight and grad_bias over all images, against a float32 reference in chunks.
    gw_ref = torch.zeros(w.shape, device=device, dtype=torch.float32)
    gb_ref = torch.zeros(C, device=device, dtype=torch.float32)
    w32 = w.detach().float().requires_grad_()
    b32 = b.detach().float().requires_grad_()
    for s in range(0, B, 1024):
        xs = x[s:s + 1024].detach().float()
        ck.peg_reference(xs, w32, b32, H, W, P).backward(grad[s:s + 1024].float())
        gw_ref += w32.grad
        gb_ref += b32.grad
        w32.grad = b32.grad = None
    del out, x, grad
    assert rel_err(w.grad, gw_ref) < tol
    assert rel_err(b.grad, gb_ref) < tol
