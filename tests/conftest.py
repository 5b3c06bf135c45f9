"""Shared test helpers: input factories, the float64 reference, tolerances (README, "Using it").

Without a GPU, Triton runs on CPU tensors through its interpreter; TRITON_INTERPRET must be set
before triton is first imported, so it is set here, before cpvt_kernels is imported.
"""
import contextlib
import fcntl
import functools
import gc
import math
import os
import sys
import tempfile

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist (a GPU machine's test step), each worker takes its share of the cores for
# the float64 CPU references, instead of every worker starting a thread per core.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

import cpvt_kernels as ck  # noqa: E402
from cpvt_kernels.reference import peg_reference  # noqa: E402

# max |out - ref| / max |ref| against the float64 reference (README, "Using it")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HAS_GPU = torch.cuda.is_available()
# Set when the extension was built with CPVT_BUILD_CPU=0 (a GPU machine's quick build): the
# cpu backend's tests skip instead of failing. CI never sets it.
CPU_LEFT_OUT = os.environ.get("CPVT_BUILD_CPU", "").strip().lower() in ("0", "false", "no", "off")


@contextlib.contextmanager
def exclusive_among_processes(name: str, folder: str | None = None):
    """Holds an exclusive lock on a file named ``name`` in ``folder`` (the temporary folder by
    default): one process of this machine at a time runs the body (pytest-xdist workers, and the
    GPU suite's test runs side by side, all take the same lock)."""
    with open(os.path.join(folder or tempfile.gettempdir(), name), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def large_gpu_memory(need: int):
    """For a test that allocates tens of GiB of GPU memory: it runs alone among the tests of
    this machine that do (several at once would run out of memory, or skip each other), skips
    when the GPU has less than ``need`` bytes free, and gives its memory back to the GPU when it
    returns, so that the next one finds it free."""
    def wrap(test):
        @functools.wraps(test)
        def run(*args, **kwargs):
            with exclusive_among_processes("cpvt_kernels_large_gpu_tests.lock"):
                gc.collect()
                torch.cuda.empty_cache()
                free = torch.cuda.mem_get_info()[0]
                if free < need:
                    pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, "
                                f"{free / 2**30:.1f} GiB free")
                try:
                    return test(*args, **kwargs)
                finally:
                    gc.collect()
                    torch.cuda.empty_cache()
        return run
    return wrap


def subnormal_spacing(a: torch.Tensor) -> float:
    """The spacing of a's dtype below its normal range (0 for integers): the closest a rounded
    result there can come to an exact one."""
    if not a.is_floating_point():
        return 0.0
    info = torch.finfo(a.dtype)
    return info.smallest_normal * info.eps


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (README), less the spacing of a's dtype below its normal
    range: a result there, rounded to that dtype, can be no closer than that, however small the
    relative bound (float16 spaces its subnormals 6e-8 apart, so a one-element gradient of 1e-5
    would otherwise fail the 2e-3 bound on the rounding alone)."""
    floor = subnormal_spacing(a)
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    assert a.shape == ref.shape, f"shape {tuple(a.shape)} != reference {tuple(ref.shape)}"
    if ref.numel() == 0:
        return 0.0
    denom = ref.abs().max().item()
    diff = max((a - ref).abs().max().item() - floor, 0.0)
    return diff / denom if denom > 0 else diff


def make_inputs(B, P, H, W, C, kh, kw, bias=True, dtype=torch.float32, device="cpu",
                seed=None):
    """Fresh random float64 master inputs and their copies in ``dtype`` on ``device``.

    Memory layouts (strides, storage offsets) are the tests' own: see ``layout_as`` below and
    ``_materialize`` in test_fuzz.py.
    """
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    N = P + H * W
    # The masters hold exactly the values the kernel sees (rounded through ``dtype``), so the
    # comparison measures the kernel's error, not the rounding of its inputs.
    x64 = torch.randn(B, N, C, dtype=torch.float64, generator=g).to(dtype).double()
    w64 = (torch.randn(C, 1, kh, kw, dtype=torch.float64, generator=g) / (kh * kw) ** 0.5
           ).to(dtype).double()
    b64 = torch.randn(C, dtype=torch.float64, generator=g).to(dtype).double() if bias else None
    x = x64.to(device=device, dtype=dtype)
    return (x64, w64, b64), (x, w64.to(device=device, dtype=dtype),
                             None if b64 is None else b64.to(device=device, dtype=dtype))


def reference_with_grads(x64, w64, b64, H, W, P, grad_out64):
    """The float64 reference output and gradients of x, weight and bias."""
    x = x64.detach().clone().requires_grad_()
    w = w64.detach().clone().requires_grad_()
    b = None if b64 is None else b64.detach().clone().requires_grad_()
    out = peg_reference(x, w, b, H, W, P)
    out.backward(grad_out64)
    return out.detach(), x.grad, w.grad, (None if b is None else b.grad)


# The needs of test_only_required_grads: the gradients required, joined by "+".
GRAD_NEEDS = ["x", "weight", "bias", "weight+bias", "x+bias"]


def layout_as(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout on its device (NaN in the gaps)."""
    B, N, C = x.shape
    nan = dict(fill_value=float("nan"), dtype=x.dtype, device=x.device)
    if layout == "contiguous":
        return x.contiguous()
    if layout == "strided_channels":  # channel stride 2
        y = torch.full((B, N, 2 * C), **nan)[:, :, ::2]
    elif layout == "offset_slice":  # channel-contiguous, storage offset breaks vector alignment
        y = torch.full((B, N, C + 3), **nan)[:, :, 1:C + 1]
    elif layout == "shifted":  # contiguous, storage offset by 3 elements (vectors unaligned)
        y = torch.full((B * N * C + 3,), **nan)[3:].view(B, N, C)
    elif layout == "padded_tokens":  # token and batch strides larger than C, aligned
        y = torch.full((B, N + 1, C + 8), **nan)[:, 1:, 8:]
    elif layout == "transposed":  # (N, B, C) storage viewed as (B, N, C)
        y = torch.full((N, B, C), **nan).transpose(0, 1)
    elif layout == "channels_first":  # (B, C, N) storage: channel stride N
        y = torch.full((B, C, N), **nan).transpose(1, 2)
    else:
        raise ValueError(layout)
    y.copy_(x)
    return y


def poison_allocator(*shapes, dtype, device="cpu"):
    """Free NaN-filled blocks of the output sizes, so that new outputs likely reuse NaN memory:
    an element a kernel forgets to write then fails the test instead of passing."""
    blocks = [torch.full(s, float("nan"), dtype=dtype, device=device)
              for s in shapes if math.prod(s) > 0]
    del blocks


class Record:
    """A torch function or dispatch mode that records every function it sees in ``seen``."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def _record(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


class RecordFunctions(Record, torch.overrides.TorchFunctionMode):
    __torch_function__ = Record._record


class RecordOps(Record, torch.utils._python_dispatch.TorchDispatchMode):
    __torch_dispatch__ = Record._record


def leaf(t):
    """A detached copy of ``t`` that requires grad (None stays None)."""
    return None if t is None else t.detach().requires_grad_()


def check_only_required_grads(backend: str, device, needs: str, H=5, W=6, C=11):
    """Each gradient is computed only when required (the others stay None), and is right."""
    B, P = 2, 1
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, 3, 3, True, torch.float64, device)
    parts = needs.split("+")
    for name, t in (("x", x), ("weight", w), ("bias", b)):
        t.requires_grad_(name in parts)
    grad64 = torch.randn(x64.shape, dtype=torch.float64)
    _, gx_ref, gw_ref, gb_ref = reference_with_grads(x64, w64, b64, H, W, P, grad64)
    ck.fused_peg(x, w, b, (H, W), P, backend=backend).backward(grad64.to(device))
    for name, t, ref in (("x", x, gx_ref), ("weight", w, gw_ref), ("bias", b, gb_ref)):
        if name in parts:
            assert rel_err(t.grad, ref) < 1e-12, name
        else:
            assert t.grad is None, name


def check_expanded_grad_out(backend: str, device, C=8):
    """``out.sum().backward()`` hands the backward a stride-0 gradient; the gradients are right."""
    (x64, w64, b64), (x, w, b) = make_inputs(2, 1, 4, 5, C, 3, 3, True, torch.float64, device)
    for t in (x, w, b):
        t.requires_grad_()
    ck.fused_peg(x, w, b, (4, 5), 1, backend=backend).sum().backward()
    _, gx_ref, gw_ref, gb_ref = reference_with_grads(x64, w64, b64, 4, 5, 1,
                                                     torch.ones_like(x64))
    assert rel_err(x.grad, gx_ref) < 1e-12
    assert rel_err(w.grad, gw_ref) < 1e-12
    assert rel_err(b.grad, gb_ref) < 1e-12


# Layouts of an upstream gradient (see layout_as): tokens apart (a slice of a wider tensor), the
# batch and token dimensions swapped, an unaligned channel-contiguous slice, channels apart.
GRAD_LAYOUTS = ["padded_tokens", "transposed", "offset_slice", "channels_first"]


def check_strided_grad_out(backend: str, device, layout: str, dtype=torch.float32, C=20):
    """A grad_out in another layout than x's, with two prefix tokens: grad_x (whose prefix rows
    are grad_out's own), grad_weight and grad_bias as the reference's."""
    B, P, H, W = 3, 2, 5, 6
    (x64, w64, b64), (x, w, b) = make_inputs(B, P, H, W, C, 3, 3, True, dtype, device)
    grad64 = torch.randn(x64.shape, dtype=torch.float64).to(dtype).double()
    _, gx_ref, gw_ref, gb_ref = reference_with_grads(x64, w64, b64, H, W, P, grad64)
    grad = layout_as(grad64.to(device, dtype), layout)
    for t in (x, w, b):
        t.requires_grad_()
    poison_allocator(x.shape, w.shape, dtype=dtype, device=device)
    ck.fused_peg(x, w, b, (H, W), P, backend=backend).backward(grad)
    assert torch.equal(x.grad[:, :P], grad[:, :P])
    tol = TOLERANCE[dtype]
    assert rel_err(x.grad, gx_ref) < tol
    assert rel_err(w.grad, gw_ref) < tol
    assert rel_err(b.grad, gb_ref) < tol


def backend_device(backend: str) -> str:
    """The device of the tensors a backend's tests use. The reference runs on CPU tensors, where
    the float64 references are computed: on CUDA tensors its convolution is cuDNN's, which keeps
    NaN and Inf at other border pixels than the CPU's (seen on an H100)."""
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        return "cuda" if HAS_GPU else "cpu"
    return "cpu"


def require_backend(backend: str) -> str:
    """Skip unless ``backend`` can run here; returns the device its tests use."""
    device = backend_device(backend)
    if backend not in ck.available_backends(device):
        reason = ck.ops._unavailable_reason(backend, device)
        if backend == "cuda" and not HAS_GPU:
            pytest.skip("GPU-only: no CUDA device")
        if backend == "cpu" and CPU_LEFT_OUT:
            pytest.skip("the extension was built without CPU kernels (CPVT_BUILD_CPU=0)")
        pytest.fail(f"backend {backend!r} unavailable on {device}: {reason}")
    return device


# bench/cuda_micro's build (a minute and a half of nvcc on 2 cores) for test_cuda_micro_builds:
# started when the tests are collected, at low priority, so that it compiles beside the tests
# that run before it; the test then waits for it.
_MICRO_BUILD = {}


def cuda_micro_nvcc() -> str | None:
    """The nvcc that builds bench/cuda_micro: $NVCC, else the PATH's, else $CUDA_HOME's."""
    import shutil
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc and os.environ.get("CUDA_HOME"):
        nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    return nvcc if nvcc and os.access(nvcc, os.X_OK) else None


def _start_cuda_micro_build():
    import subprocess
    nvcc = cuda_micro_nvcc()
    if nvcc is None or _MICRO_BUILD:
        return
    folder = tempfile.mkdtemp(prefix="cpvt_cuda_micro_")
    log = open(os.path.join(folder, "build.log"), "w+")
    build = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                         "cuda_micro", "build.sh")
    proc = subprocess.Popen(
        ["nice", "-n", "10", "bash", build], stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "OUT": os.path.join(folder, "peg_micro"), "NVCC": nvcc,
             "PYTHON": sys.executable})
    _MICRO_BUILD.update(proc=proc, folder=folder, log=log)


def cuda_micro_build(timeout: float) -> tuple[int, str, str]:
    """(exit status, output, binary) of bench/cuda_micro/build.sh: the build started at
    collection, waited for, or one started now (a test run by itself under pytest-xdist)."""
    _start_cuda_micro_build()
    b = _MICRO_BUILD
    rc = b["proc"].wait(timeout=timeout)
    b["log"].seek(0)
    return rc, b["log"].read(), os.path.join(b["folder"], "peg_micro")


def pytest_collection_finish(session):
    """Starts bench/cuda_micro's build when test_cuda_micro_builds is to run (not under
    pytest-xdist, whose workers each collect every test; there the test builds it itself)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None and any(
            item.name == "test_cuda_micro_builds" for item in session.items):
        _start_cuda_micro_build()


def pytest_unconfigure(config):
    """Stops an unfinished cuda_micro build and removes its folder."""
    import shutil
    b = _MICRO_BUILD
    if not b:
        return
    if b["proc"].poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(b["proc"].pid, 9)
        b["proc"].wait()
    b["log"].close()
    shutil.rmtree(b["folder"], ignore_errors=True)
    b.clear()


def pytest_terminal_summary(terminalreporter):
    """Cases run per category (test file), so CI logs show what was covered."""
    counts = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            if getattr(rep, "when", "call") not in ("call", "setup") or (
                    outcome == "passed" and rep.when != "call"):
                continue
            module = rep.nodeid.split("::")[0].rsplit("/", 1)[-1]
            counts.setdefault(module, {}).setdefault(outcome, 0)
            counts[module][outcome] += 1
    if not counts:
        return
    terminalreporter.section("cases per category")
    for module in sorted(counts):
        c = counts[module]
        terminalreporter.write_line(
            f"{module:28s} " + "  ".join(f"{k} {c[k]}" for k in ("passed", "failed", "skipped",
                                                                   "error") if c.get(k)))


def nonfinite_case(where: str, device="cpu", C=9, dtype=torch.float64):
    """Inputs of a small float64 PEG (C >= 8 channels) with NaN and Inf planted in `where` (x,
    weight or grad_out), next to the grid's borders so that they meet the zero padding, rounded
    to `dtype`. Returns the inputs, the output gradient and the reference output and gradients
    (float64, of the rounded inputs)."""
    H, W, P = 6, 7, 1
    (x64, w64, b64), _ = make_inputs(2, P, H, W, C, 3, 3, True, torch.float64)
    grad64 = torch.randn(x64.shape, dtype=torch.float64)
    if where == "x":
        x64[0, P + 2 * W + 3, 4] = float("nan")
        x64[1, P + 5 * W + 6, 2] = float("inf")
        x64[1, P + 0 * W + 3, 7] = float("-inf")
        x64[1, 0, 1] = float("-inf")
    elif where == "weight":
        w64[4, 0, 1, 2] = float("nan")
        w64[2, 0, 0, 0] = float("inf")
    elif where == "grad_out":
        grad64[0, P + 0 * W + 2, 3] = float("inf")
        grad64[1, P + 5 * W + 0, 5] = float("nan")
        grad64[1, P + 3 * W + 6, 1] = float("-inf")
    else:
        raise ValueError(where)
    x64, w64, b64, grad64 = (t.to(dtype).double() for t in (x64, w64, b64, grad64))
    ref = reference_with_grads(x64, w64, b64, H, W, P, grad64)
    return (H, W, P), (x64, w64, b64, grad64), ref


def assert_same_nonfinite(got: torch.Tensor, ref: torch.Tensor, tol=1e-12):
    """NaN where the reference has NaN, the same infinities, and close (`tol`) elsewhere."""
    got = got.detach().cpu().double()
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.isinf(), ref.isinf())
    assert torch.equal(got[ref.isinf()], ref[ref.isinf()])
    finite = ref.isfinite()
    if finite.any():
        assert rel_err(got[finite], ref[finite]) < tol


def check_nonfinite_grad_x_only(backend: str, device, k, C: int):
    """grad_x alone from the backward op on `backend` (the input-gradient kernel, without the
    weight sums): an Inf or NaN tap gives NaN and Inf where the reference's gradient has them,
    and none from the zero padding. `k` is the kernel size, or (kh, kw)."""
    H, W, P = 6, 7, 1
    kh, kw = (k, k) if isinstance(k, int) else k
    (x64, w64, b64), _ = make_inputs(2, P, H, W, C, kh, kw, True, torch.float64)
    w64[2, 0, 0, 0] = float("inf")
    w64[4, 0, kh - 1, kw // 2] = float("nan")
    w64[5, 0, kh // 2, kw - 1] = float("-inf")
    grad64 = torch.randn(x64.shape, dtype=torch.float64)
    _, gx_ref, _, _ = reference_with_grads(x64, w64, b64, H, W, P, grad64)
    op = torch.ops.cpvt.peg_backward_triton if backend == "triton" else torch.ops.cpvt.peg_backward
    gx, _, _ = op(grad64.to(device), x64.to(device), w64.to(device), H, W, P, [True, False, False])
    assert_same_nonfinite(gx, gx_ref)


def check_nonfinite_forward(backend: str, device, where: str, C=9, dtype=torch.float64):
    """fused_peg on `backend` keeps the reference's NaN and Inf (nonfinite_case), in `dtype`."""
    (H, W, P), (x64, w64, b64, _), ref = nonfinite_case(where, C=C, dtype=dtype)
    out = ck.fused_peg(x64.to(device, dtype), w64.to(device, dtype), b64.to(device, dtype),
                       (H, W), P, backend=backend)
    tol = 1e-12 if dtype == torch.float64 else TOLERANCE[dtype]
    assert_same_nonfinite(out, ref[0], tol)


def check_nonfinite_backward(backend: str, device, where: str, C=9, dtype=torch.float64):
    """fused_peg on `backend` and its gradients keep the reference's NaN and Inf
    (nonfinite_case), in `dtype`."""
    (H, W, P), (x64, w64, b64, grad64), ref = nonfinite_case(where, C=C, dtype=dtype)
    x, w, b = (t.to(device, dtype).requires_grad_() for t in (x64, w64, b64))
    out = ck.fused_peg(x, w, b, (H, W), P, backend=backend)
    out.backward(grad64.to(device, dtype))
    tol = 1e-12 if dtype == torch.float64 else TOLERANCE[dtype]
    for got, want in zip((out, x.grad, w.grad, b.grad), ref):
        assert_same_nonfinite(got, want, tol)
