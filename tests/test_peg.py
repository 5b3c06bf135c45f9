"""Parity of the fused PEG with the float64 reference: output and every gradient.

Runs on the backends that work on this machine's default tensors: ``cpu`` and ``reference``
here; ``cuda`` and ``triton`` have their own files (test_cuda.py, test_triton.py).
"""

import ctypes
import os
import re
import subprocess
import sys

import pytest
import torch

import cpvt_kernels as ck
from cpvt_kernels import peg_reference
from conftest import (CPU_LEFT_OUT, DTYPES, GRAD_LAYOUTS, GRAD_NEEDS, TOLERANCE,
                      check_expanded_grad_out, check_strided_grad_out,
                      check_nonfinite_backward, check_nonfinite_forward,
                      check_nonfinite_grad_x_only, check_only_required_grads, layout_as,
                      make_inputs, poison_allocator, reference_with_grads, rel_err,
                      require_backend)

BACKENDS = ["cpu", "reference"]


@pytest.mark.skipif(CPU_LEFT_OUT, reason="built without CPU kernels (CPVT_BUILD_CPU=0)")
def test_cpu_kernels_compiled_and_registered():
    """Every build but a deliberate CPVT_BUILD_CPU=0 one has the CPU kernels, so the cpu
    backend's tests run instead of skipping."""
    assert ck.ops._EXT_ERROR is None, f"cpvt_kernels._C failed to load: {ck.ops._EXT_ERROR}"
    assert ck.ops.HAS_CPU_KERNELS
    assert "cpu" in ck.available_backends("cpu")

# (B, P, H, W, C, kh, kw, bias, layout): together these cover every value of P {0,1,2},
# kernels {(1,1),(3,3),(5,5),(7,7),(3,5)}, grids {(1,1),(7,9),(14,14)}, C {1,3,64,192},
# B {0,1,3}, bias on and off, and non-contiguous layouts.
CASES = [
    (1, 1, 14, 14, 192, 3, 3, True, "contiguous"),
    (3, 0, 7, 9, 64, 3, 5, False, "contiguous"),
    (3, 2, 7, 9, 3, 5, 5, True, "strided_channels"),
    (1, 1, 1, 1, 1, 1, 1, True, "contiguous"),
    (3, 1, 14, 14, 3, 7, 7, False, "offset_slice"),
    (0, 1, 7, 9, 64, 3, 3, True, "contiguous"),
    (1, 2, 14, 14, 1, 3, 3, False, "transposed"),
    (3, 0, 1, 1, 64, 7, 7, True, "contiguous"),
    (1, 1, 7, 9, 192, 1, 1, False, "transposed"),
    (3, 1, 7, 9, 17, 9, 3, True, "offset_slice"),
]


def _case_id(c):
    B, P, H, W, C, kh, kw, bias, layout = c
    return f"B{B}-P{P}-{H}x{W}-C{C}-k{kh}x{kw}-{'bias' if bias else 'nobias'}-{layout}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_parity_output_and_grads(backend, dtype, case):
    device = require_backend(backend)
    B, P, H, W, C, kh, kw, bias, layout = case
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, kh, kw, bias, dtype, device)
    x = layout_as(x, layout)
    x.requires_grad_()
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    # (rounded through dtype, as the inputs are: the reference gets what the kernel gets)
    grad64 = torch.randn(x64.shape, dtype=torch.float64).to(dtype).double()
    ref, gx_ref, gw_ref, gb_ref = reference_with_grads(x64, w64, b64, H, W, P, grad64)

    before = [t.detach().clone() for t in (x, w, b) if t is not None]
    poison_allocator(x.shape, w.shape, dtype=dtype)
    out = ck.fused_peg(x, w, b, size=(H, W), num_prefix_tokens=P, backend=backend)
    assert all(torch.equal(t.detach(), c) for t, c in zip([x, w, b], before)), "input modified"
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    tol = TOLERANCE[dtype]
    assert not out.isnan().any()
    assert rel_err(out, ref) < tol
    if P > 0:  # prefix tokens pass through exactly
        assert torch.equal(out[:, :P], x[:, :P].detach())

    out.backward(grad64.to(device=device, dtype=dtype))
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert rel_err(x.grad, gx_ref) < tol
    assert rel_err(w.grad, gw_ref) < tol
    if b is not None:
        assert rel_err(b.grad, gb_ref) < tol
    if B == 0:
        assert torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", GRAD_NEEDS)
def test_only_required_grads(backend, needs):
    check_only_required_grads(backend, require_backend(backend), needs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_grad_out(backend):
    """``out.sum().backward()`` hands the backward a stride-0 gradient."""
    check_expanded_grad_out(backend, require_backend(backend), C=7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
def test_strided_grad_out(backend, dtype, layout):
    """A grad_out laid out otherwise than x (a transposed or sliced upstream gradient)."""
    check_strided_grad_out(backend, require_backend(backend), layout, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("P,kh,kw,bias", [(1, 3, 3, True), (0, 3, 5, False), (2, 1, 1, True)])
def test_gradcheck(backend, P, kh, kw, bias):
    device = require_backend(backend)
    H, W, C = 4, 3, 5
    _, (x, w, b) = make_inputs(2, P, H, W, C, kh, kw, bias, torch.float64, device)
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def fn(*args):
        return ck.fused_peg(args[0], args[1], args[2] if bias else None, (H, W), P,
                            backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grads_are_deterministic(backend):
    """The same inputs give bitwise the same grad_weight and grad_bias on every run."""
    device = require_backend(backend)
    _, (x, w, b) = make_inputs(8, 1, 14, 14, 40, 3, 3, True, torch.float32, device)
    grad = torch.randn(x.shape, dtype=torch.float32, device=device)
    results = []
    for _ in range(5):
        ws, bs = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        ck.fused_peg(x, ws, bs, (14, 14), 1, backend=backend).backward(grad)
        results.append((ws.grad, bs.grad))
    for gw, gb in results[1:]:
        assert torch.equal(gw, results[0][0]) and torch.equal(gb, results[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["x", "weight"])
def test_nan_and_inf_propagate_like_reference(backend, where):
    check_nonfinite_forward(backend, require_backend(backend), where)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["x", "weight", "grad_out"])
def test_nan_and_inf_propagate_through_backward(backend, where):
    """Output and every gradient: NaN and Inf where the reference has them, including where they
    meet the zero padding (Inf * 0 is NaN, in the reference as in a fused kernel)."""
    check_nonfinite_backward(backend, require_backend(backend), where)


@pytest.mark.parametrize("dtype,dot", [(torch.float32, None), (torch.bfloat16, "0"),
                                       (torch.bfloat16, "1")], ids=str)
@pytest.mark.parametrize("where", ["x", "weight", "grad_out"])
def test_nan_and_inf_in_float32_and_bfloat16(monkeypatch, dtype, dot, where):
    """The cpu backend's vector paths (C=16) keep the reference's NaN and Inf in float32 and
    bfloat16 as well, forward and backward; bfloat16 with the dot-product forward (below) off
    and on."""
    if dot is not None:
        monkeypatch.setenv("CPVT_CPU_BF16_DOT", dot)
    check_nonfinite_backward("cpu", require_backend("cpu"), where, C=16, dtype=dtype)


@pytest.mark.parametrize("k", [3, 5, (3, 5), (5, 3)], ids=str)
def test_nonfinite_weight_grad_x_only_cpu(k):
    check_nonfinite_grad_x_only("cpu", require_backend("cpu"), k, C=10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kh,kw", [(31, 1), (1, 31), (31, 31)])
def test_largest_kernel(backend, kh, kw):
    """Kernels 31 tall or wide, the limit, run (the limit is inclusive), as in the eager PEG."""
    device = require_backend(backend)
    (x64, w64, b64), (x, w, b) = make_inputs(2, 1, 5, 6, 8, kh, kw, True, torch.float32, device)
    out = ck.fused_peg(x, w, b, (5, 6), 1, backend=backend)
    assert rel_err(out, peg_reference(x64, w64, b64, 5, 6, 1)) < TOLERANCE[torch.float32]
    peg = ck.PEG(8, (kh, kw))
    peg.load_state_dict({"proj.weight": w.cpu(), "proj.bias": b.cpu()})
    assert rel_err(peg(x.cpu(), 5, 6), out.cpu()) < TOLERANCE[torch.float32]


def test_reference_rounds_half_types_once():
    """The reference backend computes bfloat16 in float32 and rounds once, as the fused kernels
    do (not a bfloat16 convolution rounded, then a bfloat16 add rounded again)."""
    _, (x, w, b) = make_inputs(2, 1, 14, 14, 64, 3, 3, True, torch.bfloat16)
    out = ck.fused_peg(x, w, b, (14, 14), 1, backend="reference")
    assert torch.equal(out, peg_reference(x.float(), w.float(), b.float(), 14, 14, 1).bfloat16())


def test_backends_agree_with_each_other():
    require_backend("cpu")
    _, (x, w, b) = make_inputs(3, 1, 9, 8, 31, 5, 3, True, torch.float32, "cpu")
    a = ck.fused_peg(x, w, b, (9, 8), 1, backend="cpu")
    r = ck.fused_peg(x, w, b, (9, 8), 1, backend="reference")
    assert rel_err(a, r) < 1e-5


@pytest.mark.parametrize("backend", ck.available_backends("cpu"))
def test_no_channels(backend):
    """C = 0: every backend returns x's empty shape and empty gradients (the reference's conv2d
    takes no groups=0)."""
    x = torch.randn(2, 1 + 3 * 4, 0, requires_grad=True)
    w = torch.randn(0, 1, 3, 3, requires_grad=True)
    b = torch.randn(0, requires_grad=True)
    out = ck.fused_peg(x, w, b, (3, 4), 1, backend=backend)
    assert out.shape == x.shape and out.dtype == x.dtype
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), torch.randn(out.shape))
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape


def test_size_forms():
    _, (x, w, b) = make_inputs(2, 1, 6, 6, 8, 3, 3, True, torch.float32, "cpu")
    ref = ck.fused_peg(x, w, b, (6, 6), 1)
    assert torch.equal(ck.fused_peg(x, w, b, 6, 1), ref)
    assert torch.equal(ck.fused_peg(x, w, b, None, 1), ref)
    # An integer of numpy or a 0-d tensor is an int too (they were "not a pair"), for size and
    # for num_prefix_tokens (which the modules' constructors already took)
    np = pytest.importorskip("numpy")
    for side in (np.int64(6), torch.tensor(6)):
        assert torch.equal(ck.fused_peg(x, w, b, side, 1), ref)
    assert torch.equal(ck.fused_peg(x, w, b, (6, 6), np.int64(1)), ref)
    for bad in (6.0, True, (6,), torch.tensor([6, 6, 6])):
        with pytest.raises(TypeError, match="size must be a pair \\(H, W\\) or an int"):
            ck.fused_peg(x, w, b, bad, 1)
    with pytest.raises(ValueError, match="size"):
        ck.fused_peg(x[:, :-1], w, b, None, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C,layout", [(32, "contiguous"), (48, "offset_slice"), (20, "contiguous")])
def test_cpu_streaming_stores(monkeypatch, dtype, C, layout):
    """The cpu kernels write large outputs with non-temporal stores when every vector store is
    aligned (by default with AVX-512 only); CPVT_CPU_STREAM_BYTES=0 takes that path at any size,
    with any vector width. Aligned (C=32, 48), unaligned channel counts (C=20) and half types
    (which never stream) must all give the same results."""
    require_backend("cpu")
    monkeypatch.setenv("CPVT_CPU_STREAM_BYTES", "0")
    B, P, H, W, k = 2, 1, 5, 7, 3
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, k, k, True, dtype)
    x = layout_as(x, layout).requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    grad64 = torch.randn(x64.shape, dtype=torch.float64).to(dtype).double()
    ref, gx_ref, gw_ref, gb_ref = reference_with_grads(x64, w64, b64, H, W, P, grad64)
    poison_allocator(x.shape, dtype=dtype)
    out = ck.fused_peg(x, w, b, size=(H, W), num_prefix_tokens=P, backend="cpu")
    tol = TOLERANCE[dtype]
    assert not out.isnan().any()
    assert rel_err(out, ref) < tol
    out.backward(grad64.to(dtype))
    assert not x.grad.isnan().any()
    for got, want in ((x.grad, gx_ref), (w.grad, gw_ref), (b.grad, gb_ref)):
        assert rel_err(got, want) < tol


def _mapping(t: torch.Tensor) -> tuple[set[str], str]:
    """The VmFlags and the name ("[heap]", "" for an anonymous mapping) of this process's
    mapping (/proc/self/smaps) that holds the first whole 2 MiB page of ``t`` (the advice for
    huge pages covers whole ones only)."""
    address = (t.data_ptr() + (2 << 20) - 1) & ~((2 << 20) - 1)
    inside, name = False, ""
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:  # a mapping's first line: "lo-hi ..."
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                inside, name = lo <= address < hi, " ".join(fields[5:])
            elif inside and line.startswith("VmFlags:"):
                return set(fields[1:]), name
    raise AssertionError(f"no mapping holds {address:#x}")


def _first_huge_page_resident(t: torch.Tensor) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    address = (t.data_ptr() + (2 << 20) - 1) & ~((2 << 20) - 1)
    vec = ctypes.create_string_buffer(1)
    assert libc.mincore(address, 1, vec) == 0, os.strerror(ctypes.get_errno())
    return bool(vec.raw[0] & 1)


# 36 MB a float32 tensor: above glibc's largest mmap threshold (32 MiB), so fresh memory.
HUGE_CASE = (2, 1, 96, 92, 512)  # B, P, H, W, C


def _skip_unless_fresh_plain_memory(shape):
    """Skip where a new tensor of ``shape`` is not fresh, unadvised memory of glibc's own
    mapping: another allocator preloaded, glibc's hugetlb tunable, no transparent huge pages."""
    if not os.path.isdir("/sys/kernel/mm/transparent_hugepage"):
        pytest.skip("no transparent huge pages (Linux only)")
    if os.environ.get("LD_PRELOAD"):
        pytest.skip("LD_PRELOAD may put another allocator in glibc's place (no advice then)")
    probe = torch.empty(shape)
    flags, name = _mapping(probe)
    if "hg" in flags or name or _first_huge_page_resident(probe):
        pytest.skip(f"a new {probe.nbytes >> 20} MiB tensor is not fresh, unadvised anonymous "
                    f"memory here (flags {sorted(flags)}, mapping {name!r})")


def _in_a_fresh_heap(request) -> bool:
    """True in a new interpreter running this test alone, where the test goes on; elsewhere runs
    it there and passes, skips or fails as it did. Earlier tests can leave a freed block in
    glibc's heap large enough for these tensors, which then come from the heap, not fresh
    mappings, and the test could only skip (it did in full runs)."""
    if os.environ.get("CPVT_TEST_FRESH_HEAP") == "1":
        return True
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           request.node.nodeid], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, CPVT_TEST_FRESH_HEAP="1"), timeout=600)
    out = proc.stdout + proc.stderr
    if proc.returncode == 0 and re.search(r"\b1 skipped\b", out):
        pytest.skip("in a new interpreter: " + " | ".join(
            ln for ln in out.splitlines() if ln.startswith("SKIPPED")))
    assert proc.returncode == 0 and re.search(r"\b1 passed\b", out), out
    return False


def _fused_fwd_bwd(x, w, b, g, H, W, P):
    xg = x.clone().requires_grad_()
    out = ck.fused_peg(xg, w, b, size=(H, W), num_prefix_tokens=P, backend="cpu")
    (gx,) = torch.autograd.grad(out, xg, g)
    return out.detach(), gx


def test_cpu_fresh_large_outputs_get_huge_pages(monkeypatch, request):
    """Outputs of 32 MiB and more that are fresh memory (glibc maps every block that large anew)
    are advised to use transparent huge pages ("hg" in the mapping's VmFlags), the forward's
    and the backward's, with the same results as without the advice
    (CPVT_CPU_HUGE_PAGE_BYTES=0)."""
    require_backend("cpu")
    if not _in_a_fresh_heap(request):
        return
    B, P, H, W, C = HUGE_CASE
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, 3, 3, True, torch.float32)
    g = torch.randn(x.shape)
    _skip_unless_fresh_plain_memory(x.shape)
    monkeypatch.setenv("CPVT_CPU_HUGE_PAGE_BYTES", "0")
    out_off, gx_off = _fused_fwd_bwd(x, w, b, g, H, W, P)
    assert out_off.numel() * 4 > 32 << 20
    assert "hg" not in _mapping(out_off)[0] | _mapping(gx_off)[0]
    monkeypatch.delenv("CPVT_CPU_HUGE_PAGE_BYTES")
    out, gx = _fused_fwd_bwd(x, w, b, g, H, W, P)
    assert "hg" in _mapping(out)[0] and "hg" in _mapping(gx)[0]
    assert torch.equal(out, out_off) and torch.equal(gx, gx_off)
    assert rel_err(out, peg_reference(x64, w64, b64, H, W, P)) < TOLERANCE[torch.float32]


def test_cpu_heap_memory_gets_no_huge_page_advice(request):
    """A large output from glibc's brk heap (no mmap: M_MMAP_MAX=0) is fresh too, but the block
    stays in glibc's free lists after the tensor is freed, so it is not advised."""
    require_backend("cpu")
    if not _in_a_fresh_heap(request):
        return
    B, P, H, W, C = HUGE_CASE
    _, (x, w, b) = make_inputs(B, P, H, W, C, 3, 3, True, torch.float32)
    g = torch.randn(x.shape)
    _skip_unless_fresh_plain_memory(x.shape)
    mallopt = ctypes.CDLL(None).mallopt
    M_MMAP_MAX = -4
    assert mallopt(M_MMAP_MAX, 0)
    try:
        out, gx = _fused_fwd_bwd(x, w, b, g, H, W, P)
        if _mapping(out)[1] != "[heap]":
            pytest.skip("glibc did not take the output from its heap")
        assert "hg" not in _mapping(out)[0] | _mapping(gx)[0]
        ref = ck.fused_peg(x, w, b, (H, W), P, backend="reference")
        assert rel_err(out, ref) < TOLERANCE[torch.float32]
    finally:
        assert mallopt(M_MMAP_MAX, 65536)  # glibc's default


# Each CPVT_CPU_* switch is read where its path runs, and checked by both ops on entry: a bad
# value is an error on every path, also on those that never read it (and never inside a loop
# on the worker threads).
def _cpu_switch_paths():
    def run(B, C, k, dtype):
        _, (x, w, b) = make_inputs(B, 1, 4, 4, C, k, k, True, dtype)
        out = ck.fused_peg(x.requires_grad_(), w.requires_grad_(), b, (4, 4), 1, backend="cpu")
        return lambda: out.sum().backward()

    # The forward of an empty batch; float32 7x7 over a channel tail (rings); bfloat16 3x3 over
    # whole vectors (in place; the dot-product path where built). Each backward after.
    return [lambda: run(0, 32, 3, torch.float32), lambda: run(1, 5, 7, torch.float32),
            lambda: run(1, 32, 3, torch.bfloat16)]


@pytest.mark.parametrize("var", ["CPVT_CPU_HUGE_PAGE_BYTES", "CPVT_CPU_STREAM_BYTES",
                                 "CPVT_CPU_PARTIALS_BYTES"])
@pytest.mark.parametrize("value", ["32M", "-1", "1e6", " ", "+5", " 12"])
def test_cpu_byte_counts_must_be_numbers(monkeypatch, var, value):
    require_backend("cpu")
    message = re.escape(f"{var} must be a number of bytes, got '{value}'")
    for path in _cpu_switch_paths():
        monkeypatch.setenv(var, value)
        with pytest.raises(RuntimeError, match=message):
            path()  # the forward
        monkeypatch.setenv(var, "12345")
        backward = path()
        monkeypatch.setenv(var, value)
        with pytest.raises(RuntimeError, match=message):
            backward()


@pytest.mark.parametrize("var", ["CPVT_CPU_PREFETCH", "CPVT_CPU_NARROW_BLOCKS",
                                 "CPVT_CPU_IN_PLACE", "CPVT_CPU_BF16_DOT"])
@pytest.mark.parametrize("value", ["off", "true", "2", " 1", "-0"])
def test_cpu_switches_must_be_0_or_1(monkeypatch, var, value):
    """A switch set to anything but 0 or 1 (or empty) is an error naming it, not a guess: "off"
    read as "not 0" would turn a path on."""
    require_backend("cpu")
    message = re.escape(f"{var} must be 0 or 1, got '{value}'")
    for path in _cpu_switch_paths():
        for ok in ("0", "1", ""):
            monkeypatch.setenv(var, ok)
            path()()
        monkeypatch.setenv(var, value)
        with pytest.raises(RuntimeError, match=message):
            path()
        monkeypatch.setenv(var, "1")
        backward = path()
        monkeypatch.setenv(var, value)
        with pytest.raises(RuntimeError, match=message):
            backward()


# The cpu backward splits the rows into a fixed set of chunks, each with its own partial sums of
# the weight and bias gradients, added in chunk order. Where those sums would pass
# CPVT_CPU_PARTIALS_BYTES the chunks run in waves, each wave's sums added to the earlier ones':
# the same sums in the same order, so bitwise the same gradients for any budget and thread count.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("B,H,W,C", [(3, 9, 10, 40), (4, 70, 6, 24)],
                         ids=["27rows", "280rows"])
def test_cpu_backward_waves_match_one_pass(monkeypatch, dtype, k, B, H, W, C):
    """27 rows: a chunk a row; 280 rows: 3 rows a chunk (pairs of rows, prefetches across
    chunks) and chunks past the last row. Every budget and thread count: the same bits."""
    require_backend("cpu")
    P = 1
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, k, k, True, dtype)
    grad = torch.randn(x.shape, dtype=dtype)
    _, gx_ref, gw_ref, gb_ref = reference_with_grads(x64, w64, b64, H, W, P, grad.double())
    threads = torch.get_num_threads()
    # "": one pass; 20000 bytes: waves of several chunks at k = 3 and of one per thread at
    # k = 7 (float32); 1: waves of one chunk per thread.
    budgets = ("", "20000", "1")
    masks = ([True, True, True], [False, True, True], [False, True, False], [True, False, True],
             [False, False, True], [True, False, False])
    first = {}  # mask -> the first thread count's one-pass gradients
    try:
        for n in sorted({1, 2, threads}):
            torch.set_num_threads(n)
            for mask in masks:
                runs = under_settings(
                    monkeypatch, "CPVT_CPU_PARTIALS_BYTES", budgets,
                    lambda: torch.ops.cpvt.peg_backward(grad, x, w, H, W, P, mask),
                    x.shape, dtype)
                one_pass = first.setdefault(tuple(mask), runs[0])
                for want, got, ref in zip(mask, one_pass, (gx_ref, gw_ref, gb_ref)):
                    if want:
                        assert rel_err(got, ref) < TOLERANCE[dtype]
                for other in runs:
                    for want, a, c in zip(mask, one_pass, other):
                        if want:
                            assert not c.isnan().any() and torch.equal(a, c)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("kh,kw", [(1, 1), (3, 3), (5, 5), (7, 7), (3, 5)])
def test_cpu_gradients_do_not_depend_on_the_mask(dtype, kh, kw):
    """Each gradient has the same bits whichever others are wanted: grad_bias alone (or with
    grad_x) is summed in the order the weight-gradient sweeps sum it, over pairs of rows where
    they take pairs and row by row elsewhere. Up to 128 grid rows every chunk is a row; past it
    (130 and 131 rows here) chunks take pairs of rows, and an odd H ends an image with a single
    row. Rows read in place (contiguous) and through the rings (a channel slice)."""
    require_backend("cpu")
    for B, P, H, W, C, layout in [(3, 1, 7, 14, 64, "contiguous"), (2, 0, 5, 6, 20, "contiguous"),
                                  (2, 2, 6, 9, 32, "offset_slice"), (2, 1, 65, 9, 32, "contiguous"),
                                  (1, 0, 131, 5, 17, "offset_slice")]:
        _, (x, w, _) = make_inputs(B, P, H, W, C, kh, kw, False, dtype)
        x = layout_as(x, layout)
        grad = torch.randn(x.shape, dtype=dtype)
        full = torch.ops.cpvt.peg_backward(grad, x, w, H, W, P, [True, True, True])
        for mask in ([False, False, True], [True, False, True], [False, True, True],
                     [False, True, False], [True, True, False], [True, False, False]):
            got = torch.ops.cpvt.peg_backward(grad, x, w, H, W, P, mask)
            for want, a, c in zip(mask, got, full):
                if want:
                    assert not a.isnan().any() and torch.equal(a, c), (B, H, W, C, mask)


_PARTIALS_PEAK = r"""
import os, sys, torch
import cpvt_kernels

torch.set_num_threads(2)  # a wave holds at least a chunk per thread, each with its row buffers


def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


B, H, W, C, k = 16, 8, 8, 512, 31  # 128 row chunks of 961 * 512 * 4 bytes: 240 MiB in all
torch.manual_seed(0)
x = torch.randn(B, 1 + H * W, C)
w = torch.randn(C, 1, k, k)
g = torch.randn(x.shape)
os.environ["CPVT_CPU_PARTIALS_BYTES"] = sys.argv[1]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size (VmHWM) starts again from the current one
before = status_kib("VmRSS")
torch.ops.cpvt.peg_backward(g, x, w, H, W, 1, [False, True, True])
print((status_kib("VmHWM") - before) / 1024)
"""


def test_cpu_backward_partial_sums_stay_within_budget():
    """At k = 31 with C = 512 the partial sums of 128 chunks would take 240 MiB; with the
    default budget of 64 MiB the chunks run in waves of 32 (two threads) or fewer, and the
    backward's peak memory rises by less than 100 MiB. The same run with a budget that fits them
    all shows that the measurement sees them."""
    require_backend("cpu")
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")

    def peak_rise(budget):  # MiB, in a fresh process
        out = subprocess.run([sys.executable, "-c", _PARTIALS_PEAK, budget],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    waves, one_pass = peak_rise(""), peak_rise(str(1 << 40))
    assert waves < 100, f"peak rose {waves:.0f} MiB with the default budget"
    assert one_pass > 200, f"peak rose only {one_pass:.0f} MiB with every chunk at once"


# bfloat16 forwards of the square kernels PEG uses can run, on CPUs with AVX512-BF16, as bfloat16
# dot products over pairs of rows (see csrc/cpu/peg_cpu_impl.h, namespace dot): by default on AMD
# CPUs; CPVT_CPU_BF16_DOT=1 or 0 turns it on or off anywhere. Grids with an odd H end an image
# with a single-row pass.
DOT_CASES = [  # (B, P, H, W, C, k, layout)
    (2, 1, 14, 14, 192, 3, "contiguous"),
    (3, 0, 7, 9, 20, 3, "offset_slice"),
    (2, 2, 5, 6, 33, 5, "contiguous"),
    (3, 1, 9, 4, 48, 7, "transposed"),
    (2, 1, 6, 7, 17, 1, "offset_slice"),
    (1, 1, 1, 1, 16, 3, "contiguous"),
    # W * C large enough that every thread takes single rows: with 2 threads the second range
    # starts at row 5, so its row pairs have the other parity.
    (1, 1, 9, 16, 2048, 3, "contiguous"),
    # Several images per thread, where a thread's rows cross from one image to the next and the
    # row ring's slots must not be taken for the last image's rows.
    (2, 0, 30, 1, 16, 3, "contiguous"),
    (3, 1, 12, 5, 16, 3, "contiguous"),
]


@pytest.mark.parametrize("case", DOT_CASES, ids=lambda c: "B{}-P{}-{}x{}-C{}-k{}-{}".format(*c))
def test_cpu_bfloat16_forward_paths_agree(monkeypatch, case):
    """The dot-product and the float bfloat16 forward sum the same float products in another
    order: every output within one bfloat16 rounding step (plus float rounding of its terms) of
    the other, and within tolerance of the reference."""
    require_backend("cpu")
    B, P, H, W, C, k, layout = case
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, k, k, True, torch.bfloat16)
    x = layout_as(x, layout)
    ref = ck.fused_peg(x64, w64, b64, (H, W), P, backend="reference")
    monkeypatch.setenv("CPVT_CPU_BF16_DOT", "1")
    poison_allocator(x.shape, dtype=torch.bfloat16)
    dot = ck.fused_peg(x, w, b, (H, W), P, backend="cpu")
    monkeypatch.setenv("CPVT_CPU_BF16_DOT", "0")
    poison_allocator(x.shape, dtype=torch.bfloat16)
    flt = ck.fused_peg(x, w, b, (H, W), P, backend="cpu")
    # One bfloat16 step of the value, plus a few float roundings of the terms summed into it
    # (sum |w| |x| + |x| + |b|): where the terms nearly cancel, the two summation orders differ
    # by float rounding, which can exceed a step of the tiny result.
    terms = ck.fused_peg(x64.abs(), w64.abs(), b64.abs(), (H, W), P, backend="reference")
    step = flt.double().abs() * 2.0 ** -7 + terms * 2.0 ** -20
    assert not dot.isnan().any() and not flt.isnan().any()
    assert ((dot.double() - flt.double()).abs() <= step).all()
    assert rel_err(dot, ref) < TOLERANCE[torch.bfloat16]
    assert torch.equal(dot[:, :P], x[:, :P])


# Forwards of k = 1 and 3 with whole vectors of channels and contiguous tokens read their input
# rows in place (half types converted as they load), and the float32 and float64 backwards
# grad_out's rows (see csrc/cpu/peg_cpu_impl.h, reads_in_place); CPVT_CPU_IN_PLACE=0 sends them
# through the row rings. Both do the same operations in the same order, so they agree bit for
# bit, NaN and Inf included. (bfloat16 with the dot-product forward turned off.)
IN_PLACE_CASES = [  # (B, P, H, W, C, k, layout)
    (2, 1, 14, 14, 192, 3, "contiguous"),
    (3, 0, 7, 9, 32, 3, "shifted"),
    (2, 2, 5, 1, 16, 3, "contiguous"),  # one column: a block that starts and ends the row
    (2, 1, 1, 2, 48, 3, "contiguous"),
    (2, 1, 3, 13, 16, 3, "contiguous"),  # column blocks of 8, 4 and 1
    # W * C large enough that every thread takes single rows (single-row passes).
    (1, 1, 9, 16, 2048, 3, "contiguous"),
    (2, 1, 6, 17, 64, 1, "shifted"),
    (2, 1, 4, 5, 24, 3, "contiguous"),  # float32: not whole vectors (the ring); float64: in place
    (2, 1, 4, 5, 32, 3, "offset_slice"),  # tokens not contiguous: the ring
    # bfloat16 in blocks of 32 channels (the even/odd loop): one column, odd widths, and passes
    # of 4, 3, 2 and 1 rows.
    (2, 1, 5, 1, 32, 3, "contiguous"),
    (2, 1, 7, 3, 64, 3, "shifted"),
    (3, 0, 6, 5, 96, 3, "contiguous"),
    (2, 1, 5, 7, 32, 3, "contiguous"),
]


def under_settings(monkeypatch, var, settings, run, shape, dtype):
    """run() once under each value of the environment variable var (read by the C++ op at each
    call), on a poisoned allocator, then var unset again: the list of results."""
    results = []
    for setting in settings:
        monkeypatch.setenv(var, setting)
        poison_allocator(shape, dtype=dtype)
        results.append(run())
    monkeypatch.delenv(var)
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("case", IN_PLACE_CASES,
                         ids=lambda c: "B{}-P{}-{}x{}-C{}-k{}-{}".format(*c))
def test_cpu_in_place_matches_ring(monkeypatch, dtype, case):
    require_backend("cpu")
    monkeypatch.setenv("CPVT_CPU_BF16_DOT", "0")
    B, P, H, W, C, k, layout = case
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, k, k, True, dtype)
    x = layout_as(x, layout)
    grad = layout_as(torch.randn(x.shape, dtype=dtype), layout)

    def both():
        return under_settings(monkeypatch, "CPVT_CPU_IN_PLACE", ("1", "0"),
                              lambda: ck.fused_peg(x, w, b, (H, W), P, backend="cpu"),
                              x.shape, dtype)

    in_place, ring = both()
    assert not in_place.isnan().any()
    assert rel_err(in_place, ck.fused_peg(x64, w64, b64, (H, W), P, backend="reference")) < (
        TOLERANCE[dtype])
    assert torch.equal(in_place, ring)
    # The backward, for every output mask.
    for mask in ([True, True, True], [True, False, False], [False, True, True],
                 [False, False, True]):
        grads = under_settings(monkeypatch, "CPVT_CPU_IN_PLACE", ("1", "0"),
                               lambda: torch.ops.cpvt.peg_backward(grad, x, w, H, W, P, mask),
                               x.shape, dtype)
        for want, got_in_place, got_ring in zip(mask, *grads):
            if want:
                assert not got_in_place.isnan().any()
                assert torch.equal(got_in_place, got_ring)
    # Inf and NaN at the grid's corners and in a tap: where they meet the zero padding, both give
    # NaN (0 * Inf) as the reference does.
    x[:, P, 0] = float("inf")
    x[:, -1, C - 1] = float("nan")
    w[C // 2, 0, 0, 0] = float("-inf")
    in_place, ring = both()
    torch.testing.assert_close(in_place, ring, rtol=0, atol=0, equal_nan=True)
    ref = ck.fused_peg(x.double(), w.double(), b.double(), (H, W), P, backend="reference")
    assert torch.equal(in_place.isnan(), ref.isnan())


# AVX2 builds run the float32 and float64 forwards over rows read in place in narrow column
# blocks (6 rows x 1 column) where the input is larger than the last-level cache or 10 MiB, and
# in 4 x 2 blocks below that; CPVT_CPU_NARROW_BLOCKS=1 / 0 forces either (no effect where the
# two shapes are the same, as with AVX-512). The same operations in the same order: bitwise the
# same. A thread that takes a whole 14-row image runs narrow passes of 6, 6 and 2 rows.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", [c for c in IN_PLACE_CASES if c[6] != "offset_slice"],
                         ids=lambda c: "B{}-P{}-{}x{}-C{}-k{}-{}".format(*c))
def test_cpu_narrow_blocks_match_wide(monkeypatch, dtype, case):
    require_backend("cpu")
    B, P, H, W, C, k, layout = case
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, k, k, True, dtype)
    x = layout_as(x, layout)
    ref = ck.fused_peg(x64, w64, b64, (H, W), P, backend="reference")

    def both():
        return under_settings(monkeypatch, "CPVT_CPU_NARROW_BLOCKS", ("1", "0"),
                              lambda: ck.fused_peg(x, w, b, (H, W), P, backend="cpu"),
                              x.shape, dtype)

    narrow, wide = both()
    assert not narrow.isnan().any()
    assert rel_err(narrow, ref) < TOLERANCE[dtype]
    assert torch.equal(narrow, wide)
    x[:, P, 0] = float("inf")
    x[:, -1, C - 1] = float("nan")
    w[C // 2, 0, 0, 0] = float("-inf")
    narrow, wide = both()
    torch.testing.assert_close(narrow, wide, rtol=0, atol=0, equal_nan=True)
    ref = ck.fused_peg(x.double(), w.double(), b.double(), (H, W), P, backend="reference")
    assert torch.equal(narrow.isnan(), ref.isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [3, 7])
def test_cpu_prefetch_settings_agree(monkeypatch, dtype, k):
    """CPVT_CPU_PREFETCH (none / ring rows only / also rows read in place) only moves cache
    lines: forward and every gradient are bitwise the same, and correct, under each setting.
    k = 3 reads its rows in place, k = 7 through the rings; several passes per thread."""
    require_backend("cpu")
    B, P, H, W, C = 3, 1, 9, 10, 48
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, k, k, True, dtype)
    grad = torch.randn(x.shape, dtype=dtype)
    ref = ck.fused_peg(x64, w64, b64, (H, W), P, backend="reference")
    results = under_settings(
        monkeypatch, "CPVT_CPU_PREFETCH", ("", "0", "1"),
        lambda: (ck.fused_peg(x, w, b, (H, W), P, backend="cpu"),
                 *torch.ops.cpvt.peg_backward(grad, x, w, H, W, P, [True, True, True])),
        x.shape, dtype)
    assert not results[0][0].isnan().any()
    assert rel_err(results[0][0], ref) < TOLERANCE[dtype]
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert not a.isnan().any() and torch.equal(a, c)


@pytest.mark.parametrize("dot", ["0", "1"])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("H,W", [(6, 5), (5, 3)])
def test_cpu_bfloat16_forward_nonfinite_rows(monkeypatch, k, H, W, dot):
    """An Inf or NaN in one input row reaches only the output rows whose window holds it (the
    dot-product path multiplies rows outside the window by a zero tap, so it must hand such
    inputs to the float path), and a non-finite tap meets the zero padding as in the reference;
    with the dot-product path off and on (CPVT_CPU_BF16_DOT)."""
    require_backend("cpu")
    monkeypatch.setenv("CPVT_CPU_BF16_DOT", dot)
    B, P, C = 2, 1, 18
    (x64, w64, b64), _ = make_inputs(B, P, H, W, C, k, k, True, torch.bfloat16)
    specials = [float("inf"), float("-inf"), float("nan")]
    for row in range(H):
        xs = x64.clone()
        xs[row % B, P + row * W + row % W, (5 * row) % C] = specials[row % 3]
        ref = ck.fused_peg(xs, w64, b64, (H, W), P, backend="reference")
        out = ck.fused_peg(xs.bfloat16(), w64.bfloat16(), b64.bfloat16(), (H, W), P,
                           backend="cpu")
        assert torch.equal(out.isnan(), ref.isnan()), f"row {row}"
        assert torch.equal(out.isinf(), ref.isinf()), f"row {row}"
        finite = ref.isfinite()
        assert torch.equal(out[~finite & ~ref.isnan()], ref[~finite & ~ref.isnan()].bfloat16())
        assert rel_err(out[finite], ref[finite]) < TOLERANCE[torch.bfloat16]
    ws = w64.clone()
    ws[3, 0, 0, k - 1] = float("inf")
    ws[7, 0, k // 2, 0] = float("nan")
    ref = ck.fused_peg(x64, ws, b64, (H, W), P, backend="reference")
    out = ck.fused_peg(x64.bfloat16(), ws.bfloat16(), b64.bfloat16(), (H, W), P, backend="cpu")
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
