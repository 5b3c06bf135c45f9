"""Property-based tests: random shapes, dtypes, layouts and storage offsets on every backend
that runs on CPU tensors here, against the float64 reference, output and every gradient.

On a GPU the same problems run on CUDA tensors through the cuda and triton backends.

A second set aims at the cpu backend's fast paths (channel counts that fill its vectors, k = 3,
grids up to 30 x 30), with its CPVT_CPU_* switches and the thread count drawn as well.

Bounded for CI (CPVT_FUZZ_EXAMPLES, default 40 per backend and set; the Triton interpreter gets a
quarter of that). Hypothesis prints the falsifying example and a reproduction blob on failure.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpvt_kernels as ck
from conftest import (TOLERANCE, poison_allocator, reference_with_grads, rel_err,
                      subnormal_spacing)

EXAMPLES = int(os.environ.get("CPVT_FUZZ_EXAMPLES", "40"))
BACKENDS = [b for b in ("cpu", "triton", "reference") if b in ck.available_backends("cpu")]


# Memory layouts of x and of grad_out (see _materialize).
LAYOUTS = ["contiguous", "channel_stride", "offset", "transposed"]


@st.composite
def peg_problems(draw, small=False):
    B = draw(st.integers(0, 2 if small else 3))
    P = draw(st.integers(0, 3))
    H = draw(st.integers(1, 5 if small else 9))
    W = draw(st.integers(1, 5 if small else 9))
    C = draw(st.integers(1, 12 if small else 40))
    kh = draw(st.sampled_from([1, 3, 5, 7] + ([] if small else [9, 11])))
    kw = draw(st.sampled_from([1, 3, 5, 7] + ([] if small else [9, 31])))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    bias = draw(st.booleans())
    layout = draw(st.sampled_from(LAYOUTS))
    offset = draw(st.integers(0, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    needs = draw(st.sampled_from(["all", "x", "params"]))
    grad_layout = draw(st.sampled_from(LAYOUTS))
    return B, P, H, W, C, kh, kw, dtype, bias, layout, offset, seed, needs, grad_layout


def _materialize(x64, dtype, layout, offset, device="cpu"):
    """``x64`` in ``dtype`` on ``device``, stored with the given layout, starting ``offset``
    elements in."""
    B, N, C = x64.shape
    if layout == "contiguous" and offset == 0:
        return x64.to(device=device, dtype=dtype)

    def nans(n):
        return torch.full((n,), float("nan"), dtype=dtype, device=device)

    if layout == "transposed":
        x = nans(offset + N * B * C)[offset:].view(N, B, C).transpose(0, 1)
    elif layout == "channel_stride":
        x = nans(offset + B * N * C * 2)[offset:].view(B, N, 2 * C)[:, :, ::2]
    else:  # channel-contiguous rows with padding between tokens and an unaligned start
        x = nans(offset + B * N * (C + 1))[offset:].view(B, N, C + 1)[:, :, :C]
    x.copy_(x64)
    return x


def _close(a, ref, ref_abs, tol) -> bool:
    """Within ``tol`` of the reference by the README's measure (``rel_err``), or, where that
    measure is ill-conditioned, element by element relative to the sum of the absolute values of
    the terms that make up each element (``ref_abs``: the reference computed on |x|, |w|, |b|,
    |grad|). A tiny draw can cancel: one channel, a 1 x 1 grid, no prefix tokens and a centre tap
    near -1 give out = x * (1 + w), a residue far below the terms, that no float32 computation
    matches to 1e-5 of itself (eager conv2d + x neither); each element's error is still bounded
    by its terms, and a wrong or missing term breaks that bound."""
    if rel_err(a, ref) < tol:
        return True
    floor = subnormal_spacing(a)
    a, ref, ref_abs = (t.detach().double().cpu() for t in (a, ref, ref_abs))
    diff = ((a - ref).abs() - floor).clamp_min(0.0)
    return bool((diff <= tol * ref_abs).all())


def _check(backend, problem, device="cpu"):
    B, P, H, W, C, kh, kw, dtype, bias, layout, offset, seed, needs, grad_layout = problem
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(B, P + H * W, C, dtype=torch.float64, generator=g).to(dtype).double()
    w64 = torch.randn(C, 1, kh, kw, dtype=torch.float64, generator=g).to(dtype).double()
    b64 = torch.randn(C, dtype=torch.float64, generator=g).to(dtype).double() if bias else None
    grad64 = torch.randn(x64.shape, dtype=torch.float64, generator=g).to(dtype).double()
    ref, gx_ref, gw_ref, gb_ref = reference_with_grads(x64, w64, b64, H, W, P, grad64)
    scales = reference_with_grads(x64.abs(), w64.abs(), None if b64 is None else b64.abs(), H, W,
                                  P, grad64.abs())

    x = _materialize(x64, dtype, layout, offset, device)
    w = w64.to(device=device, dtype=dtype)
    b = None if b64 is None else b64.to(device=device, dtype=dtype)
    x.requires_grad_(needs in ("all", "x"))
    w.requires_grad_(needs in ("all", "params"))
    if b is not None:
        b.requires_grad_(needs in ("all", "params"))
    before = [t.detach().clone() for t in (x, w, b) if t is not None]
    poison_allocator(x.shape, dtype=dtype, device=device)
    out = ck.fused_peg(x, w, b, (H, W), P, backend=backend)
    tol = TOLERANCE[dtype]
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert _close(out, ref, scales[0], tol), "output"
    # grad_out in a layout of its own (contiguous as autograd mostly hands it over, else
    # starting elsewhere than x)
    grad_offset = 0 if grad_layout == "contiguous" else (offset + 3) % 8
    grad = _materialize(grad64, dtype, grad_layout, grad_offset, device)
    poison_allocator(x.shape, w.shape, (C,), dtype=dtype, device=device)
    out.backward(grad)
    if x.requires_grad:
        assert _close(x.grad, gx_ref, scales[1], tol), "grad_x"
    if w.requires_grad:
        assert _close(w.grad, gw_ref, scales[2], tol), "grad_weight"
    if b is not None and b.requires_grad:
        assert _close(b.grad, gb_ref, scales[3], tol), "grad_bias"
    after = [t.detach() for t in (x, w, b) if t is not None]
    assert all(torch.equal(a, c) for a, c in zip(after, before)), "an input was modified"



def test_close_takes_cancellation_but_not_a_missing_term():
    """The cancelling draw of _close: the README's measure fails on float32 (eager PyTorch's too),
    the element-wise bound passes; a result without the residual or with the centre tap's sign
    flipped fails both."""
    x64 = torch.randn(2, 1, 1, dtype=torch.float64).float().double()
    w64 = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    w64[0, 0, 2, 2] = -1 + 1e-4
    w64 = w64.float().double()
    grad64 = torch.randn(x64.shape, dtype=torch.float64)
    ref = reference_with_grads(x64, w64, None, 1, 1, 0, grad64)[0]
    scale = reference_with_grads(x64.abs(), w64.abs(), None, 1, 1, 0, grad64.abs())[0]
    x, w = x64.float(), w64.float()
    eager = torch.nn.functional.conv2d(x.view(2, 1, 1, 1), w, padding=2).view(2, 1, 1) + x
    assert rel_err(eager, ref) > TOLERANCE[torch.float32]
    assert _close(eager, ref, scale, TOLERANCE[torch.float32])
    for wrong in (eager - x, x * (1 - w[0, 0, 2, 2])):
        assert not _close(wrong, ref, scale, TOLERANCE[torch.float32])

@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_against_reference(backend):
    small = backend == "triton"
    n = max(2, EXAMPLES // 4) if small else EXAMPLES

    @settings(max_examples=n, deadline=None, print_blob=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(problem=peg_problems(small=small))
    def run(problem):
        _check(backend, problem)

    run()


# The cpu backend's fast paths need whole vectors or blocks of channels (C a multiple of 16 or 32
# for the bfloat16 even/odd loop), k = 3 and grids tall and wide enough for its row and column
# blocks, which the problems above seldom draw; its switches (CPVT_CPU_*) pick between paths that
# must agree. These problems aim there, with the switches and the thread count drawn too.
CPU_SWITCHES = {"CPVT_CPU_PREFETCH": ("0", "1"), "CPVT_CPU_NARROW_BLOCKS": ("0", "1"),
                "CPVT_CPU_STREAM_BYTES": ("0",), "CPVT_CPU_BF16_DOT": ("0", "1"),
                "CPVT_CPU_IN_PLACE": ("0", "1")}


@st.composite
def cpu_fast_path_problems(draw):
    k = draw(st.sampled_from([3, 3, 3, 1, 5, 7]))
    problem = (draw(st.integers(1, 3)), draw(st.integers(0, 2)), draw(st.integers(1, 30)),
               draw(st.integers(1, 30)), draw(st.sampled_from([16, 17, 32, 33, 48, 64, 96, 192])),
               k, k, draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16,
                                           torch.float64])),
               draw(st.booleans()), draw(st.sampled_from(["contiguous", "contiguous", "offset",
                                                          "transposed", "channel_stride"])),
               draw(st.integers(0, 7)), draw(st.integers(0, 2**31 - 1)),
               draw(st.sampled_from(["all", "x", "params"])),
               draw(st.sampled_from(["contiguous", "contiguous"] + LAYOUTS[1:])))
    switches = {name: draw(st.sampled_from((None,) + values))
                for name, values in CPU_SWITCHES.items()}
    return problem, switches, draw(st.sampled_from([1, 2]))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
def test_fuzz_cpu_fast_paths():
    @settings(max_examples=EXAMPLES, deadline=None, print_blob=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=cpu_fast_path_problems())
    def run(case):
        problem, switches, threads = case
        saved_threads = torch.get_num_threads()
        with pytest.MonkeyPatch.context() as mp:
            for name, value in switches.items():
                if value is None:
                    mp.delenv(name, raising=False)
                else:
                    mp.setenv(name, value)
            torch.set_num_threads(threads)
            try:
                _check("cpu", problem)
            finally:
                torch.set_num_threads(saved_threads)

    run()


# On CUDA tensors (a GPU only): the cuda and triton backends, each kernel family, on the problems
# of both sets above (Triton a quarter as many: each new kernel size or dtype compiles its kernels).
CUDA_VARIANTS = [("cuda", "CPVT_CUDA_KERNELS", "tile"), ("cuda", "CPVT_CUDA_KERNELS", "stream"),
                 ("cuda", "CPVT_CUDA_KERNELS", "pipe"),
                 ("triton", "CPVT_TRITON_KERNELS", "tile"),
                 ("triton", "CPVT_TRITON_KERNELS", "stream")]


@pytest.mark.parametrize("backend,switch,kernels", CUDA_VARIANTS,
                         ids=[f"{b}-{k}" for b, _, k in CUDA_VARIANTS])
def test_fuzz_on_cuda(backend, switch, kernels, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("GPU-only: no CUDA device")
    if backend not in ck.available_backends("cuda"):
        pytest.skip(f"the {backend} backend is not available on CUDA tensors here")
    monkeypatch.setenv(switch, kernels)

    @settings(max_examples=max(2, EXAMPLES // 4) if backend == "triton" else EXAMPLES,
              deadline=None, print_blob=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(problem=st.one_of(peg_problems(), cpu_fast_path_problems().map(lambda case: case[0])))
    def run(problem):
        _check(backend, problem, "cuda")

    run()
