"""PEG and FusedPEG: same parameters and state dict, both call forms, same results."""
import platform
import re

import pytest
import torch

import cpvt_kernels as ck
from conftest import RecordOps, rel_err


@pytest.mark.parametrize("kernel_size,bias,P", [(3, True, 1), (7, False, 0), ((3, 5), True, 2)])
def test_fused_matches_eager_module(kernel_size, bias, P):
    torch.manual_seed(0)
    eager = ck.PEG(24, kernel_size, num_prefix_tokens=P, bias=bias).double()
    fused = ck.FusedPEG(24, kernel_size, num_prefix_tokens=P, bias=bias).double()
    assert list(eager.state_dict()) == list(fused.state_dict())
    assert list(eager.state_dict()) == ["proj.weight"] + (["proj.bias"] if bias else [])
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(3, P + 6 * 5, 24, dtype=torch.float64)
    y_e = eager(x, 6, 5)
    assert rel_err(fused(x, 6, 5), y_e) < 1e-12
    assert rel_err(fused(x, (6, 5)), y_e) < 1e-12
    assert rel_err(eager(x, (6, 5)), y_e) < 1e-12


def test_checkpoint_loads_both_ways():
    a = ck.FusedPEG(16)
    b = ck.PEG(16)
    b.load_state_dict(a.state_dict())
    a2 = ck.FusedPEG(16)
    a2.load_state_dict(b.state_dict())
    assert torch.equal(a2.proj.weight, a.proj.weight) and torch.equal(a2.proj.bias, a.proj.bias)


def test_module_gradients_match():
    torch.manual_seed(1)
    eager = ck.PEG(10).double()
    fused = ck.FusedPEG(10, backend="auto").double()
    fused.load_state_dict(eager.state_dict())
    x1 = torch.randn(2, 1 + 16, 10, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    eager(x1, 4, 4).pow(2).sum().backward()
    fused(x2, 4, 4).pow(2).sum().backward()
    assert rel_err(x2.grad, x1.grad) < 1e-12
    assert rel_err(fused.proj.weight.grad, eager.proj.weight.grad) < 1e-12
    assert rel_err(fused.proj.bias.grad, eager.proj.bias.grad) < 1e-12


@pytest.mark.parametrize("change", ["weight_norm", "parametrization", "replaced", "no_bias"])
def test_fused_module_follows_changed_parameters(change):
    """FusedPEG reads proj's weight and bias as they are now: after a parametrization, a
    replaced Parameter, or a bias removed, it matches PEG with the same change, forward and
    backward."""
    torch.manual_seed(2)
    eager, fused = ck.PEG(12).double(), ck.FusedPEG(12).double()
    fused.load_state_dict(eager.state_dict())
    for peg in (eager, fused):
        if change == "weight_norm":
            torch.nn.utils.parametrizations.weight_norm(peg.proj)
        elif change == "parametrization":
            torch.nn.utils.parametrize.register_parametrization(peg.proj, "weight", _Scale())
        elif change == "replaced":
            peg.proj.weight = torch.nn.Parameter(torch.ones_like(peg.proj.weight) * 0.25)
        else:
            peg.proj.bias = None
    x = torch.randn(2, 1 + 20, 12, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_e, y_f = eager(x1, 4, 5), fused(x2, 4, 5)
    assert rel_err(y_f, y_e) < 1e-12
    y_e.pow(2).sum().backward()
    y_f.pow(2).sum().backward()
    assert rel_err(x2.grad, x1.grad) < 1e-12
    for (name, p_e), (_, p_f) in zip(eager.named_parameters(), fused.named_parameters()):
        assert p_f.grad is not None, name
        assert rel_err(p_f.grad, p_e.grad) < 1e-12, name


class _Scale(torch.nn.Module):
    def forward(self, w):
        return 2.0 * w


class _Counted(torch.nn.Module):
    calls = 0

    def forward(self, w):
        _Counted.calls += 1
        return w


@pytest.mark.parametrize("cls", [ck.PEG, ck.FusedPEG])
def test_modules_compute_a_parametrized_weight_once_a_call(cls):
    """A parametrization runs on every read of proj.weight (spectral_norm does a power iteration
    and updates its state each time): PEG read it twice a call, for its checks and for the
    convolution, so its state drifted from a plain nn.Conv2d's with the same parametrization."""
    peg = cls(6)
    torch.nn.utils.parametrize.register_parametrization(peg.proj, "weight", _Counted())
    _Counted.calls = 0
    peg(torch.randn(2, 1 + 9, 6), 3, 3)
    assert _Counted.calls == 1


@pytest.mark.filterwarnings("ignore:.*weight_norm:FutureWarning")
@pytest.mark.parametrize("cls", [ck.PEG, ck.FusedPEG])
@pytest.mark.parametrize("hook", ["weight_norm", "spectral_norm", "forward_hook"])
def test_modules_run_the_hooks_on_proj(cls, hook):
    """The legacy weight_norm and spectral_norm compute proj.weight in a forward pre-hook of
    proj, which the modules skipped by reading proj.weight without calling proj: the output
    then used a stale weight, without an error. They now call proj where it has hooks, so the
    output is the paper's proj(grid) + grid, a forward hook on proj sees the call, and the
    gradients reach the hooked parameters."""
    torch.manual_seed(5)
    peg = cls(6, num_prefix_tokens=2).double()
    calls = []
    if hook == "weight_norm":
        torch.nn.utils.weight_norm(peg.proj)
        with torch.no_grad():
            peg.proj.weight_g.mul_(3.0)  # proj.weight is stale until the hook runs
    elif hook == "spectral_norm":
        torch.nn.utils.spectral_norm(peg.proj)
        peg.eval()  # no power iteration: each call of proj computes the same weight
        with torch.no_grad():
            peg.proj.weight_orig.add_(torch.randn_like(peg.proj.weight_orig))
    else:
        peg.proj.register_forward_hook(lambda m, args, out: calls.append(out.shape) or out * 2)
    x = torch.randn(2, 2 + 12, 6, dtype=torch.float64, requires_grad=True)
    out = peg(x, 3, 4)
    expected = _paper_peg(peg.proj, x.detach(), 3, 4, 2)
    assert out.dtype == x.dtype and rel_err(out, expected) < 1e-12
    if hook == "forward_hook":
        assert calls[0] == (2, 6, 3, 4)
    out.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in peg.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _paper_peg(proj, x, H, W, P):
    """The paper's PEG: cls tokens kept, proj(feat) + feat on the grid (proj called)."""
    with torch.no_grad():
        B, _, C = x.shape
        feat = x[:, P:].transpose(1, 2).reshape(B, C, H, W)
        return torch.cat([x[:, :P], (proj(feat) + feat).flatten(2).transpose(1, 2)], dim=1)


@pytest.mark.parametrize("cls", [ck.PEG, ck.FusedPEG])
def test_forward_call_form_errors(cls):
    peg = cls(4)
    with pytest.raises(TypeError, match="forward"):
        peg(torch.randn(1, 5, 4), 2)
    with pytest.raises(TypeError, match="size H must be an int, got float"):
        peg(torch.randn(1, 5, 4), 2.0, 2)
    with pytest.raises(TypeError, match="size W must be an int, got float"):
        peg(torch.randn(1, 5, 4), (2, 2.0))


def test_available_backends():
    names = ck.available_backends()
    assert "reference" in names
    assert set(names) <= {"cuda", "triton", "cpu", "reference"}
    cpu = ck.available_backends("cpu")
    assert "reference" in cpu and "cuda" not in cpu
    if ck.ops.HAS_CPU_KERNELS:
        assert cpu[0] == "cpu"
    if not torch.cuda.is_available():
        assert "cuda" not in names
    # Fastest first without a device too: a device type's fastest backend leads (not triton
    # on CPU tensors, which runs there only through its slow interpreter), and the reference,
    # the slowest, comes after every fused backend that is some device type's first choice.
    types = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
    firsts = {ck.available_backends(t)[0] for t in types}
    assert names[0] in firsts
    if firsts != {"reference"}:
        assert names.index("reference") > min(names.index(n) for n in firsts)


def test_auto_prefers_fused_cpu_kernel():
    if "cpu" in ck.available_backends("cpu"):
        assert ck.ops.resolve_backend("auto", "cpu") == "cpu"


def test_env_override_falls_back_loudly(monkeypatch):
    monkeypatch.setattr(ck.ops, "_RESOLVED", {})
    monkeypatch.setattr(ck.ops, "ENV_BACKEND", "cuda")
    with pytest.warns(UserWarning, match="CPVT_PEG_BACKEND='cuda' cannot run here"):
        name = ck.ops.resolve_backend("auto", "cpu")
    assert name == ck.available_backends("cpu")[0]
    monkeypatch.setattr(ck.ops, "ENV_BACKEND", "reference")
    assert ck.ops.resolve_backend("auto", "cpu") == "reference"


@pytest.mark.parametrize("call", ["function", "module"])
def test_env_override_warning_points_at_the_callers_line(monkeypatch, call):
    monkeypatch.setattr(ck.ops, "_RESOLVED", {})
    monkeypatch.setattr(ck.ops, "ENV_BACKEND", "no-such-backend")
    peg = ck.FusedPEG(4)
    x = torch.randn(2, 10, 4)
    with pytest.warns(UserWarning, match="CPVT_PEG_BACKEND") as record:
        if call == "function":
            ck.fused_peg(x, peg.proj.weight, peg.proj.bias, (3, 3))
        else:
            peg(x, 3, 3)
    assert [w.filename for w in record if "CPVT_PEG_BACKEND" in str(w.message)] == [__file__]


def test_env_override_fallback_warns_once_and_compiles_whole(monkeypatch):
    """An override that cannot run warns on the first eager call only, and torch.compile of a
    module under it traces one graph (a warning inside it would break the graph)."""
    import warnings
    monkeypatch.setattr(ck.ops, "_RESOLVED", {})
    monkeypatch.setattr(ck.ops, "ENV_BACKEND", "no-such-backend")
    peg = ck.FusedPEG(4)
    x = torch.randn(2, 10, 4)
    ref = ck.peg_reference(x, peg.proj.weight, peg.proj.bias, 3, 3, 1)
    torch._dynamo.reset()
    out = torch.compile(lambda t: peg(t, 3, 3), fullgraph=True, backend="eager")(x)
    assert rel_err(out, ref) < 1e-6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            peg(x, 3, 3)
    assert [str(w.message) for w in caught if "CPVT_PEG_BACKEND" in str(w.message)] == [
        "cpvt_kernels: CPVT_PEG_BACKEND='no-such-backend' cannot run here (unknown backend "
        "name; expected one of ('cuda', 'triton', 'cpu', 'reference')); falling back to "
        "backend='auto'"]


def test_env_override_auto_is_no_override():
    import subprocess
    import sys
    code = ("import torch, cpvt_kernels as ck; assert ck.ops.ENV_BACKEND is None; "
            "ck.fused_peg(torch.randn(1, 5, 2), torch.randn(2, 1, 3, 3), None, (2, 2))")
    env = dict(__import__("os").environ, CPVT_PEG_BACKEND=" Auto ")
    # (A build without the extension warns that "auto" runs the reference: not this test's.)
    run = subprocess.run([sys.executable, "-W", "error::UserWarning", "-W",
                          "ignore:cpvt_kernels: backend='auto' runs the unfused reference",
                          "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "cuda", "triton"])
def test_meta_tensors(backend):
    """Shapes without data (the meta device), for the op and both modules, forward and backward,
    with every backend: a model that names its backend is sized on the meta device too."""
    missing = {"cpu": ck.ops._EXT_ERROR, "cuda": ck.ops._EXT_ERROR,
               "triton": ck.ops._TRITON_ERROR}.get(backend)
    if missing is not None:  # no GPU or kernels needed, only the op's registration
        pytest.skip(f"{backend}: {missing}")
    x = torch.randn(2, 13, 6, device="meta")
    w = torch.randn(6, 1, 3, 3, device="meta")
    assert ck.fused_peg(x, w, None, (3, 4), 1, backend=backend).shape == (2, 13, 6)
    assert ck.FusedPEG(6, backend=backend).to("meta")(x, 3, 4).shape == (2, 13, 6)
    assert ck.PEG(6).to("meta")(x, (3, 4)).device.type == "meta"
    x.requires_grad_()
    with torch.device("meta"):
        peg = ck.FusedPEG(6, backend=backend)
    y = peg(x, 3, 4)
    assert (y.shape, y.stride(), y.dtype, y.device.type) == ((2, 13, 6), (78, 6, 1),
                                                             torch.float32, "meta")
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"
    assert peg.proj.weight.grad.shape == (6, 1, 3, 3) and peg.proj.bias.grad.shape == (6,)
    from cpvt_kernels import models
    with torch.device("meta"):
        model = models.cpvt_tiny(num_classes=5, peg_impl="fused", peg_backend=backend)
    assert model(torch.empty(2, 3, 32, 48, device="meta")).shape == (2, 5)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_flop_counter_counts_the_convolution(backend):
    """FlopCounterMode counts the fused op as the eager PEG's convolution: 2 FLOPs a
    multiply-add, for the forward and for each gradient of x and of the weight (PyTorch's own
    formula for a convolution's weight gradient ignores groups: C times the depthwise count)."""
    from torch.utils.flop_counter import FlopCounterMode
    from conftest import require_backend
    device = require_backend(backend)
    B, C, H, W, k = 3, 10, 4, 5, 5
    torch.manual_seed(0)
    eager = ck.PEG(C, k).to(device)
    x = torch.randn(B, 1 + H * W, C, device=device)
    with FlopCounterMode(display=False) as counter:
        eager(x, H, W)
    conv = counter.get_total_flops()
    assert conv == 2 * B * C * H * W * k * k
    for need_x, need_w, need_b in ((True, True, True), (True, False, False),
                                   (False, True, False), (False, False, True)):
        fused = ck.FusedPEG(C, k, backend=backend).to(device)
        fused.proj.weight.requires_grad_(need_w)
        fused.proj.bias.requires_grad_(need_b)
        with FlopCounterMode(display=False) as counter:
            y = fused(x.clone().requires_grad_(need_x), H, W)
        assert counter.get_total_flops() == conv
        with FlopCounterMode(display=False) as counter:
            y.sum().backward()
        assert counter.get_total_flops() == conv * (need_x + need_w)


def test_sizes_as_numpy_ints_and_0d_tensors():
    """What the eager PEG takes as H and W, FusedPEG takes too."""
    np = pytest.importorskip("numpy")
    peg, eager = ck.FusedPEG(6), ck.PEG(6)
    eager.load_state_dict(peg.state_dict())
    x = torch.randn(2, 13, 6)
    for H, W in ((np.int64(3), np.int32(4)), (torch.tensor(3), torch.tensor(4))):
        assert rel_err(peg(x, H, W), eager(x, H, W)) < 1e-6
        assert rel_err(peg(x, (H, W)), eager(x, 3, 4)) < 1e-6
    for bad in (3.0, True, torch.tensor(3.0)):
        with pytest.raises(TypeError, match="size H must be an int"):
            peg(x, bad, 4)


def run_package_copy(tmp_path, name, code, ignore=(), edit=None):
    """Runs ``code`` in a fresh interpreter that imports a copy of the package as ``name`` (another
    name, so that an editable install's import hook cannot hand back the original), leaving out
    the files matching ``ignore``; ``edit(copy_dir)`` changes the copy first."""
    import os
    import shutil
    import subprocess
    import sys

    dst = tmp_path / name
    shutil.copytree(os.path.dirname(ck.__file__), dst,
                    ignore=shutil.ignore_patterns("__pycache__", *ignore))
    if edit is not None:
        edit(dst)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def unloaded_extension_script(name):
    """The start of a script for run_package_copy: imports the copy ``name`` as ``ck``, asserts
    that its compiled _C was left out of the process and no C++ backend is offered, and draws
    inputs x, w, b (3x4 grid, one prefix token)."""
    return ("import warnings, torch, {0} as ck\n"
            "so = [l for l in open('/proc/self/maps') if '{0}' in l]\n"
            "assert not so, so\n"
            "assert not ck.ops.HAS_CPU_KERNELS and not ck.ops.HAS_CUDA_KERNELS\n"
            "assert 'cpu' not in ck.available_backends('cpu')\n"
            "x = torch.randn(2, 13, 3); w = torch.randn(3, 1, 3, 3); b = torch.randn(3)\n"
            ).format(name)


# Prints the cpu backend's error, on a line starting with ERROR.
CPU_BACKEND_ERROR = ("try:\n"
                     "    ck.fused_peg(x, w, b, (3, 4), backend='cpu')\n"
                     "except RuntimeError as e:\n"
                     "    print('ERROR', e)\n")


def test_import_without_extension_reports_how_to_build(tmp_path):
    """A package copy without the compiled _C still imports; the cpu backend says how to build."""
    code = ("import torch, cpvt_kernels_noext as ck\n"
            "assert ck.ops._EXT_ERROR is not None\n"
            "assert 'cpu' not in ck.available_backends('cpu'), ck.available_backends('cpu')\n"
            "x = torch.randn(1, 5, 3); w = torch.randn(3, 1, 3, 3)\n"
            "assert ck.fused_peg(x, w, None, (2, 2)).shape == x.shape\n"
            "try:\n"
            "    ck.fused_peg(x, w, None, (2, 2), backend='cpu')\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    proc = run_package_copy(tmp_path, "cpvt_kernels_noext", code, ignore=("*.so", "*.pyd"))
    assert "not built" in proc.stdout and "pip install" in proc.stdout, proc.stdout
    # backend="auto" fell back to the reference, and said so.
    assert "runs the unfused reference" in proc.stderr and "not built" in proc.stderr, proc.stderr


def test_build_info_names_this_torch_and_what_was_built():
    """setup.py records the torch the extension was built against and what it holds; the
    package refuses an extension recorded for another torch (next test)."""
    if ck.ops._EXT_ERROR is not None:
        pytest.skip(f"no extension loaded: {ck.ops._EXT_ERROR}")
    try:
        from cpvt_kernels import _build_info
    except ImportError:
        pytest.fail("the extension has no build record (cpvt_kernels/_build_info.py): it was "
                    "built before setup.py wrote one; rebuild it")
    assert _build_info.TORCH_VERSION == str(torch.__version__)
    assert _build_info.TORCH_CUDA == torch.version.cuda
    assert _build_info.CPU_KERNELS == ck.ops.HAS_CPU_KERNELS
    assert _build_info.CUDA_KERNELS == ck.ops.HAS_CUDA_KERNELS
    # The instruction sets the CPU kernels may use, which this CPU (the one they were built on,
    # or one they were checked against when loaded) has.
    flags = ck.ops._cpu_flags()
    features = _build_info.CPU_FEATURES
    if not _build_info.CPU_KERNELS or flags is None or platform.machine() != "x86_64":
        return
    assert isinstance(features, tuple) and set(features) <= flags, (features, flags)
    if _build_info.CPU_ARCH == "native":
        # Asked of the compiler for this CPU: the vector sets it has are all there.
        vector = {"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                  "avx512dq", "avx512_bf16"} & flags
        assert vector <= set(features), (sorted(vector - set(features)), features)
    elif _build_info.CPU_ARCH == "generic":
        assert not {"avx", "avx2", "avx512f"} & set(features), features


@pytest.mark.parametrize("record,want", [
    (None, None),                       # a build record from before CPU_FEATURES
    ((), None),                         # generic: nothing beyond x86-64
    (("avx2", "fma"), None),            # all present
    (("avx2", "cpvt_isa_a", "cpvt_isa_b"), "cpvt_isa_a, cpvt_isa_b"),
])
@pytest.mark.parametrize("flags", [{"avx2", "fma", "sse4_2"}, None], ids=["linux", "no_cpuinfo"])
def test_extension_built_for_another_cpu_names_what_it_lacks(monkeypatch, record, want, flags):
    records = {"CPU_FEATURES": record, "CPU_ARCH": "native"}
    monkeypatch.setattr(ck.ops, "_build_record", records.get)
    monkeypatch.setattr(ck.ops, "_cpu_flags", lambda: flags)
    why = ck.ops._built_for_other_cpu()
    if want is None or flags is None:  # without the CPU's flags there is nothing to check
        assert why is None
    else:
        assert f"compiled (CPVT_CPU_ARCH=native) for instructions this CPU lacks ({want})" in why
        assert "CPVT_CPU_ARCH=x86-64-v3" in why and "pip install" in why, why


def test_extension_built_for_another_cpu_is_not_loaded(tmp_path):
    """An extension whose build record names an instruction set this CPU lacks (a native build
    copied to an older machine) is not loaded, where it could die on an illegal instruction:
    the cpu backend says what is missing and how to rebuild."""
    if ck.ops._EXT_ERROR is not None:
        pytest.skip(f"no extension loaded: {ck.ops._EXT_ERROR}")
    if ck.ops._cpu_flags() is None:
        pytest.skip("no /proc/cpuinfo flags to check a build against")
    from cpvt_kernels import _build_info

    def record_other_cpu(dst):
        text = (dst / "_build_info.py").read_text()
        text = re.sub(r"^CPU_FEATURES = .*$", "CPU_FEATURES = ('cpvt_missing_isa',)", text,
                      flags=re.M)
        assert "cpvt_missing_isa" in text
        (dst / "_build_info.py").write_text(text)

    code = unloaded_extension_script("cpvt_kernels_cpu") + CPU_BACKEND_ERROR
    proc = run_package_copy(tmp_path, "cpvt_kernels_cpu", code, edit=record_other_cpu)
    error = next(line for line in proc.stdout.splitlines() if line.startswith("ERROR"))
    assert "backend 'cpu' is unavailable: the C++ extension cpvt_kernels._C was not loaded: its " \
           f"CPU kernels were compiled (CPVT_CPU_ARCH={_build_info.CPU_ARCH}) for instructions " \
           "this CPU lacks (cpvt_missing_isa); rebuild it on this machine" in error, error


def test_extension_built_for_another_torch_is_not_loaded(tmp_path):
    """An extension built against another torch (pip replacing torch after the build) is not
    loaded: the cpu backend says which torch it was built for and how to rebuild, and
    backend="auto" runs the reference with one warning that says why."""
    if ck.ops._EXT_ERROR is not None:
        pytest.skip(f"no extension loaded: {ck.ops._EXT_ERROR}")

    def record_other_torch(dst):
        (dst / "_build_info.py").write_text("TORCH_VERSION = '1.0.0+other'\n")

    code = (unloaded_extension_script("cpvt_kernels_other")
            + "ref = ck.peg_reference(x, w, b, 3, 4, 1)\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    for _ in range(3):\n"
            "        assert torch.allclose(ck.fused_peg(x, w, b, (3, 4)), ref)\n"
            "print('WARNINGS', [str(m.message) for m in caught])\n"
            + CPU_BACKEND_ERROR)
    proc = run_package_copy(tmp_path, "cpvt_kernels_other", code, edit=record_other_torch)
    warned = next(line for line in proc.stdout.splitlines() if line.startswith("WARNINGS"))
    assert warned.count("runs the unfused reference") == 1, warned
    assert f"built against torch 1.0.0+other, and this process has torch {torch.__version__}" \
        in warned, warned
    error = next(line for line in proc.stdout.splitlines() if line.startswith("ERROR"))
    assert "backend 'cpu' is unavailable: the C++ extension cpvt_kernels._C was not loaded: it " \
           f"was built against torch 1.0.0+other, and this process has torch " \
           f"{torch.__version__}; rebuild it against this torch: `pip install " \
           "--no-build-isolation --no-deps -e .` in the source tree" in error, error


def test_auto_falling_back_to_the_reference_warns_once_and_compiles_whole(monkeypatch):
    """With no fused kernel able to run, backend="auto" warns on the first eager call only,
    and torch.compile of a module traces one graph (a warning inside it would break it)."""
    import warnings
    monkeypatch.setattr(ck.ops, "_RESOLVED", {})
    monkeypatch.setattr(ck.ops, "ENV_BACKEND", None)
    monkeypatch.setattr(ck.ops, "_EXT_ERROR", "simulated: no extension")
    peg = ck.FusedPEG(4)
    x = torch.randn(2, 10, 4)
    ref = ck.peg_reference(x, peg.proj.weight, peg.proj.bias, 3, 3, 1)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(lambda t: peg(t, 3, 3), fullgraph=True, backend="eager")(x)
    assert rel_err(out, ref) < 1e-6
    assert not [w for w in caught if "unfused" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert rel_err(peg(x, 3, 3), ref) < 1e-6
        for spelling in ("AUTO", "Auto"):  # one answer, and one warning, for every spelling
            assert ck.ops.resolve_backend(spelling, "cpu") == "reference"
    messages = [str(w.message) for w in caught if "unfused" in str(w.message)]
    assert messages == [
        "cpvt_kernels: backend='auto' runs the unfused reference (eager PyTorch) on cpu tensors: "
        "cpu: the C++ extension cpvt_kernels._C is not built or failed to load (simulated: no "
        "extension); " + ck.ops._BUILD_HINT]
    assert [w.filename for w in caught if "unfused" in str(w.message)] == [__file__]
    # An explicit choice of the reference is not a fallback.
    monkeypatch.setattr(ck.ops, "_RESOLVED", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.ops.resolve_backend("reference", "cpu") == "reference"


def test_docstring_examples_run():
    """Every example in the package's docstrings runs and prints what it shows (those on CUDA
    tensors only where there is a GPU)."""
    import doctest
    import importlib
    import io
    import pkgutil
    from conftest import require_backend
    require_backend("cpu")  # available_backends' example names it
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report, ran = io.StringIO(), []
    for info in pkgutil.walk_packages(ck.__path__, "cpvt_kernels."):
        module = importlib.import_module(info.name)
        for test in finder.find(module, info.name):
            if test.examples and (torch.cuda.is_available()
                                  or not any('"cuda"' in e.source for e in test.examples)):
                runner.run(test, out=report.write)
                ran.append(test.name)
    assert runner.failures == 0, report.getvalue()
    assert len(ran) >= 10, ran


# The operator each backend runs on CPU tensors (the reference: none of this package's).
_BACKEND_OP = {"cpu": "cpvt.peg_forward", "triton": "cpvt.peg_forward_triton", "reference": None}


@pytest.mark.parametrize("backend", ck.available_backends("cpu"))
@pytest.mark.parametrize("form", ["function", "module", "model", "module_named_in_capitals"])
def test_a_named_backend_is_the_one_that_runs(backend, form):
    """fused_peg(backend=...), FusedPEG(backend=...) and a model's peg_backend run that backend,
    not the one auto picks (whose results would pass a comparison within tolerance)."""
    from cpvt_kernels import models
    torch.manual_seed(0)
    C = 16
    x = torch.randn(2, 1 + 3 * 4, C)
    if form == "function":
        proj = torch.nn.Conv2d(C, C, 3, padding=1, groups=C)
        run = lambda: ck.fused_peg(x, proj.weight, proj.bias, (3, 4), backend=backend)  # noqa: E731
    elif form == "model":
        model = models.CPVT(img_size=16, patch_size=4, embed_dim=C, depth=1, num_heads=2,
                            num_classes=3, peg_impl="fused", peg_backend=backend)
        run = lambda: model(torch.randn(2, 3, 16, 16))  # noqa: E731
    else:
        name = backend.upper() if form == "module_named_in_capitals" else backend
        peg = ck.FusedPEG(C, backend=name)
        run = lambda: peg(x, 3, 4)  # noqa: E731
    with RecordOps() as mode:  # the operators that reach the kernels (below autograd)
        run()
    names = {str(f.overloadpacket) for f in mode.seen}
    fused = {n for n in names if n.startswith("cpvt.")}
    want = _BACKEND_OP[backend]
    assert fused == ({want} if want else set()), names
    if want is None:
        assert "aten.convolution" in names


def test_module_repr_names_its_backend():
    assert "backend='reference'" in repr(ck.FusedPEG(8, backend="reference"))
    assert "num_prefix_tokens=2" in repr(ck.FusedPEG(8, num_prefix_tokens=2))
