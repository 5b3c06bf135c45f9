"""Every bad input raises a clear error that names the argument.

Each case runs through the public ``fused_peg`` on every backend that runs on CPU tensors, and,
where the C++ extension is built, straight through ``torch.ops.cpvt`` so that callers who skip
the Python layer are guarded too. No input tensor may be modified.
"""
import sys

import pytest
import torch

import cpvt_kernels as ck
from cpvt_kernels import _checks
from conftest import rel_err

B, P, H, W, C = 2, 1, 3, 4, 6


def _good():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(B, P + H * W, C, generator=g),
                weight=torch.randn(C, 1, 3, 3, generator=g),
                bias=torch.randn(C, generator=g), H=H, W=W, P=P)


def _with(**changes):
    a = _good()
    a.update(changes)
    return a


# name -> (arguments, error type, words the message must contain)
BAD = {
    "x_not_3d": (_with(x=torch.randn(P + H * W, C)), ValueError, ["x", "3-D"]),
    "x_4d": (_with(x=torch.randn(B, P + H * W, C, 1)), ValueError, ["x", "3-D"]),
    "tokens_mismatch": (_with(x=torch.randn(B, P + H * W + 1, C)), ValueError,
                        ["x.shape[1]", "num_prefix_tokens + H*W"]),
    "tokens_match_other_prefix": (_with(P=2), ValueError, ["x.shape[1]", "2 + 3*4"]),
    "hw_overflows_int32": (_with(H=2**16, W=2**16 + 1), ValueError,
                           ["x.shape[1]", "65536*65537"]),
    "hw_overflows_int64": (_with(H=2**62, W=8), ValueError, ["x.shape[1]", "num_prefix_tokens"]),
    "H_zero": (_with(H=0), ValueError, ["H", ">= 1"]),
    "W_negative": (_with(W=-4), ValueError, ["W", ">= 1"]),
    "prefix_negative": (_with(P=-1), ValueError, ["num_prefix_tokens", ">= 0"]),
    "weight_wrong_channels": (_with(weight=torch.randn(C + 1, 1, 3, 3)), ValueError,
                              ["weight", "(C, 1, kh, kw)"]),
    "weight_full_conv": (_with(weight=torch.randn(C, C, 3, 3)), ValueError,
                         ["weight", "depthwise"]),
    "weight_3d": (_with(weight=torch.randn(C, 3, 3)), ValueError, ["weight", "(C, 1, kh, kw)"]),
    "kernel_even": (_with(weight=torch.randn(C, 1, 2, 3)), ValueError, ["kernel size", "odd"]),
    # Each half of the kernel-size check on its own: an even or too-wide kw beside a good kh.
    "kernel_width_even": (_with(weight=torch.randn(C, 1, 3, 2)), ValueError,
                          ["kernel size", "odd", "(3, 2)"]),
    "kernel_too_big": (_with(weight=torch.randn(C, 1, 33, 33)), ValueError,
                       ["kernel size", "31"]),
    "kernel_too_wide": (_with(weight=torch.randn(C, 1, 3, 33)), ValueError,
                        ["kernel size", "31", "(3, 33)"]),
    "kernel_too_tall": (_with(weight=torch.randn(C, 1, 33, 1)), ValueError,
                        ["kernel size", "31", "(33, 1)"]),
    "bias_wrong_shape": (_with(bias=torch.randn(C + 2)), ValueError, ["bias", "(C,)"]),
    "bias_2d": (_with(bias=torch.randn(C, 1)), ValueError, ["bias", "(C,)"]),
    "weight_dtype": (_with(weight=torch.randn(C, 1, 3, 3, dtype=torch.float64)), TypeError,
                     ["weight dtype", "float32", "float64"]),
    "bias_dtype": (_with(bias=torch.randn(C, dtype=torch.float16)), TypeError,
                   ["bias dtype", "float16"]),
    "x_integer": (_with(x=torch.randint(0, 5, (B, P + H * W, C)),
                        weight=torch.randint(0, 5, (C, 1, 3, 3)), bias=None), TypeError,
                  ["x", "int64"]),
    "x_complex": (_with(x=torch.randn(B, P + H * W, C, dtype=torch.complex64),
                        weight=torch.randn(C, 1, 3, 3, dtype=torch.complex64), bias=None),
                  TypeError, ["x", "complex64"]),
    "weight_other_device": (_with(weight=torch.randn(C, 1, 3, 3, device="meta")), RuntimeError,
                            ["weight", "device", "meta"]),
    "bias_other_device": (_with(bias=torch.randn(C, device="meta")), RuntimeError,
                          ["bias", "device", "meta"]),
}


def _backends():
    return [b for b in ck.available_backends("cpu")]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_public_api(name, backend):
    args, err, words = BAD[name]
    snapshot = {k: v.clone() for k, v in args.items()
                if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(err) as info:
        ck.fused_peg(args["x"], args["weight"], args["bias"], size=(args["H"], args["W"]),
                     num_prefix_tokens=args["P"], backend=backend)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    for k, v in snapshot.items():
        assert torch.equal(args[k], v), f"{k} was modified"


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_reference_function(name):
    """peg_reference, public as the eager definition, checks its arguments as fused_peg does:
    it computed a negative num_prefix_tokens (passing 4 tokens through and convolving the last),
    integer tokens, and C = 0 with any weight, without an error."""
    args, err, words = BAD[name]
    with pytest.raises(err) as info:
        ck.peg_reference(args["x"], args["weight"], args["bias"], args["H"], args["W"],
                         args["P"])
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_reference_function_checks_its_ints_and_channels():
    x, w = torch.randn(2, 5, 3), torch.randn(3, 1, 3, 3)
    with pytest.raises(ValueError, match="num_prefix_tokens must be >= 0, got -1"):
        ck.peg_reference(x, w, None, 1, 1, -1)
    with pytest.raises(TypeError, match="peg_reference: H must be an int, got float"):
        ck.peg_reference(x, w, None, 2.0, 2, 1)
    with pytest.raises(ValueError, match=r"weight must have shape \(C, 1, kh, kw\) with C = 0"):
        ck.peg_reference(torch.randn(2, 5, 0), torch.randn(7, 2, 2), None, 2, 2, 1)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_cpp_op(name):
    """The C++ op checks its inputs itself (callers may skip the Python layer)."""
    if "cpu" not in ck.available_backends("cpu"):
        pytest.skip(f"no cpu backend: {ck.ops._unavailable_reason('cpu', 'cpu')}")
    args, err, words = BAD[name]
    with pytest.raises(err) as info:
        torch.ops.cpvt.peg_forward(args["x"], args["weight"], args["bias"], args["H"],
                                   args["W"], args["P"])
    msg = str(info.value)
    for w in words:
        assert w in msg.replace("torch.", ""), f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("name", list(BAD))
def test_cpp_op_messages_are_the_python_checks(name):
    """The C++ op's message for a bad input is word for word that of the Python checks
    (_checks.check_inputs): the same shapes, dtypes and totals."""
    if "cpu" not in ck.available_backends("cpu"):
        pytest.skip(f"no cpu backend: {ck.ops._unavailable_reason('cpu', 'cpu')}")
    args, err, _ = BAD[name]
    call = (args["x"], args["weight"], args["bias"], args["H"], args["W"], args["P"])
    with pytest.raises(err) as py:
        _checks.check_inputs(*call)
    with pytest.raises(err) as cpp:
        torch.ops.cpvt.peg_forward(*call)
    # (the first line: TORCH_SHOW_CPP_STACKTRACES=1 appends the C++ stack)
    assert str(cpp.value).splitlines()[0] == str(py.value)


# name -> (grad_out made from x, error type, words the message must contain)
BAD_GRAD_OUT = {
    "grad_out_shape": (lambda x: x[:, :-1], ValueError, ["grad_out", "shape of x"]),
    "grad_out_dtype": (lambda x: x.double(), TypeError, ["grad_out dtype", "float64"]),
    "grad_out_device": (lambda x: torch.empty_like(x, device="meta"), RuntimeError,
                        ["grad_out", "device", "meta"]),
}


@pytest.mark.parametrize("name", list(BAD_GRAD_OUT))
def test_bad_backward_inputs_cpp_op(name):
    """The C++ backward op and the Python checks (which its fake kernel and the Triton backward
    use) refuse a bad grad_out alike."""
    if "cpu" not in ck.available_backends("cpu"):
        pytest.skip(f"no cpu backend: {ck.ops._unavailable_reason('cpu', 'cpu')}")
    a = _good()
    make, err, words = BAD_GRAD_OUT[name]
    grad = make(a["x"])
    with pytest.raises(err) as py:
        _checks.check_backward_inputs(grad, a["x"], a["weight"], H, W, P)
    with pytest.raises(err) as cpp:
        torch.ops.cpvt.peg_backward(grad, a["x"], a["weight"], H, W, P, [True, True, True])
    for w in words:
        assert w in str(py.value), f"{w!r} not in {str(py.value)!r}"
    assert str(cpp.value).splitlines()[0] == str(py.value)


def test_tensors_on_another_gpu_are_refused():
    """weight, bias or grad_out on another GPU than x (checked on fake tensors: no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(B, P + H * W, C, device="cuda:0")
        w0, w1 = (torch.empty(C, 1, 3, 3, device=f"cuda:{i}") for i in (0, 1))
        b1 = torch.empty(C, device="cuda:1")
        with pytest.raises(RuntimeError, match=r"weight must be on the device of x \(cuda:0\), "
                                               r"got cuda:1"):
            _checks.check_inputs(x, w1, None, H, W, P)
        with pytest.raises(RuntimeError, match=r"bias must be on the device of x \(cuda:0\), "
                                               r"got cuda:1"):
            _checks.check_inputs(x, w0, b1, H, W, P)
        with pytest.raises(RuntimeError, match=r"grad_out must be on the device of x"):
            _checks.check_backward_inputs(x.to("cuda:1"), x, w0, H, W, P)


def test_unknown_backend():
    a = _good()
    with pytest.raises(ValueError, match="backend must be one of"):
        ck.fused_peg(a["x"], a["weight"], a["bias"], (H, W), P, backend="cudnn")
    with pytest.raises(TypeError, match="backend"):
        ck.fused_peg(a["x"], a["weight"], a["bias"], (H, W), P, backend=3)


def test_backend_that_cannot_run_on_device():
    a = _good()
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .*CUDA tensors"):
        ck.fused_peg(a["x"], a["weight"], a["bias"], (H, W), P, backend="cuda")


def test_cuda_kernels_left_out_of_the_build_say_why(monkeypatch):
    """A GPU process whose extension has no CUDA kernels is told what the build recorded about
    leaving them out (setup.py's CUDA_KERNELS_WHY), beside how to get them."""
    import types
    if ck.ops._EXT_ERROR is not None:
        pytest.skip(f"no extension: {ck.ops._EXT_ERROR}")
    why = "auto: the CUDA toolkit at /opt/cuda is CUDA 12.4 and torch was built with CUDA 13.0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ck.ops, "HAS_CUDA_KERNELS", False)
    monkeypatch.setitem(sys.modules, "cpvt_kernels._build_info",
                        types.SimpleNamespace(CUDA_KERNELS_WHY=why))
    monkeypatch.setattr(ck, "_build_info", sys.modules["cpvt_kernels._build_info"], raising=False)
    reason = ck.ops._unavailable_reason("cuda", "cuda")
    assert reason.startswith(f"the extension was built without CUDA kernels ({why}); ")
    assert "CPVT_BUILD_CUDA=1" in reason


def test_triton_older_than_tested_is_refused(monkeypatch):
    """The triton backend refuses a Triton older than the oldest it is tested with, at import,
    saying which it needs; nothing is registered before the check."""
    import importlib
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    monkeypatch.delitem(sys.modules, "cpvt_kernels.triton_peg", raising=False)
    with pytest.raises(ImportError, match=r"needs triton >= 3\.6, got triton 3\.2\.0"):
        importlib.import_module("cpvt_kernels.triton_peg")


def test_triton_on_cpu_without_interpreter_says_how():
    reason = ck.ops._unavailable_reason("triton", "cpu")
    if ck.ops.TRITON_INTERPRET and ck.ops._TRITON_ERROR is None:
        assert reason is None
    else:
        assert "TRITON_INTERPRET" in reason or "pip install triton" in reason


@pytest.mark.parametrize("bad", [(3,), (3, 4, 5), "3x4", (3.0, 4)])
def test_bad_size(bad):
    a = _good()
    with pytest.raises(TypeError, match="size"):
        ck.fused_peg(a["x"], a["weight"], a["bias"], bad, P)


def test_non_tensor_arguments():
    a = _good()
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ck.fused_peg(a["x"].tolist(), a["weight"], a["bias"], (H, W), P)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        ck.fused_peg(a["x"], None, a["bias"], (H, W), P)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None"):
        ck.fused_peg(a["x"], a["weight"], 1.0, (H, W), P)
    with pytest.raises(TypeError, match="num_prefix_tokens must be an int"):
        ck.fused_peg(a["x"], a["weight"], a["bias"], (H, W), 1.0)


def test_module_bad_kernel_size():
    with pytest.raises(ValueError, match="kernel_size"):
        ck.FusedPEG(8, kernel_size=4)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        ck.PEG(8, num_prefix_tokens=-1)


@pytest.mark.parametrize("cls", [ck.PEG, ck.FusedPEG])
@pytest.mark.parametrize("kwargs,err,words", [
    (dict(dim=0), ValueError, ["dim", ">= 1", "0"]),
    (dict(dim=True), TypeError, ["dim", "bool"]),
    (dict(dim=8.0), TypeError, ["dim", "float"]),
    (dict(num_prefix_tokens=True), TypeError, ["num_prefix_tokens", "bool"]),
    (dict(num_prefix_tokens=1.0), TypeError, ["num_prefix_tokens", "float"]),
    (dict(kernel_size=True), TypeError, ["kernel_size", "bool"]),
    (dict(kernel_size=torch.tensor(True)), TypeError, ["kernel_size", "bool"]),
    (dict(num_prefix_tokens=torch.tensor(True)), TypeError, ["num_prefix_tokens", "bool"]),
    (dict(dim=torch.tensor(True)), TypeError, ["dim", "bool"]),
    (dict(kernel_size=(3, True)), TypeError, ["kernel_size", "bool"]),
    (dict(kernel_size=3.0), TypeError, ["kernel_size", "float"]),
    (dict(kernel_size="3"), TypeError, ["kernel_size", "str"]),
    (dict(kernel_size=(3,)), TypeError, ["kernel_size", "pair"]),
    (dict(kernel_size=(3, 3, 3)), TypeError, ["kernel_size", "pair"]),
    (dict(kernel_size=(3, 4)), ValueError, ["kernel_size", "odd"]),
    (dict(kernel_size=-1), ValueError, ["kernel_size", "odd"]),
    (dict(kernel_size=33), ValueError, ["kernel_size", "odd"]),
])
def test_module_constructor_arguments(cls, kwargs, err, words):
    """Constructor arguments get the error that names them (a bool is not a size: True would
    otherwise mean one prefix token or a 1x1 kernel)."""
    kwargs = {"dim": 8, **kwargs}
    with pytest.raises(err) as info:
        cls(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_module_constructor_takes_integer_like_sizes():
    np = pytest.importorskip("numpy")
    peg = ck.PEG(np.int64(8), kernel_size=(np.int32(3), torch.tensor(5)),
                 num_prefix_tokens=np.int64(2))
    assert peg.proj.weight.shape == (8, 1, 3, 5) and peg.proj.padding == (1, 2)
    assert type(peg.num_prefix_tokens) is int and peg.num_prefix_tokens == 2
    for pair in (np.array([3, 5]), torch.tensor([3, 5]), [3, 5], torch.Size([3, 5])):
        assert ck.PEG(8, kernel_size=pair).proj.weight.shape == (8, 1, 3, 5)
    fused = ck.FusedPEG(8, kernel_size=(3, 5), num_prefix_tokens=2)
    fused.load_state_dict(peg.state_dict())
    x = torch.randn(2, 2 + 4 * 5, 8)
    assert rel_err(fused(x, 4, 5), peg(x, 4, 5)) < 1e-5


@pytest.mark.parametrize("backend", _backends())
def test_sizes_past_int64_name_the_argument(backend):
    a = _good()
    with pytest.raises(ValueError, match=r"x.shape\[1\] must equal"):
        ck.fused_peg(a["x"], a["weight"], a["bias"], (2**63, 1), P, backend=backend)
    with pytest.raises(ValueError, match=r"x.shape\[1\] must equal"):
        ck.fused_peg(a["x"], a["weight"], a["bias"], (H, W), 2**63, backend=backend)


def test_non_tensor_weight_under_autocast():
    a = _good()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
            ck.fused_peg(a["x"], None, a["bias"], (H, W), P)
        with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
            ck.fused_peg(a["x"], a["weight"].tolist(), a["bias"], (H, W), P)


def _not_dense(kind, t):
    if kind == "sparse":
        return t.to_sparse()
    if kind == "mkldnn":
        return t.to_mkldnn()
    if kind == "quantized":
        return torch.quantize_per_tensor(t, 0.05, 0, torch.qint8)
    return torch.nested.nested_tensor(list(t.unbind(0)), layout=torch.jagged)


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions:UserWarning")
@pytest.mark.parametrize("backend", ["auto"] + _backends())
@pytest.mark.parametrize("size", [(H, W), None], ids=["size", "no_size"])
@pytest.mark.parametrize("arg, kind", [("x", "sparse"), ("x", "mkldnn"), ("x", "quantized"),
                                       ("x", "nested"), ("weight", "sparse"),
                                       ("weight", "quantized"), ("bias", "sparse")])
def test_tensors_without_strides_name_the_argument(backend, size, arg, kind):
    """Sparse, MKL-DNN, quantized and nested tensors, which the ops have no kernel for: an error
    naming the argument and what to do, where the cpu op gave the dispatcher's ("Could not run
    'cpvt::peg_forward' with arguments from the 'SparseCPU' backend") and a nested x an internal
    error. The FusedPEG and PEG modules give the same for x."""
    a = _with(P=0, x=torch.randn(B, H * H, C)) if size is None else _good()
    hw = (H, H) if size is None else (H, W)
    a[arg] = _not_dense(kind, a[arg])
    what = {"sparse": "layout torch.sparse_coo", "mkldnn": "layout torch._mkldnn",
            "quantized": "a quantized tensor", "nested": "a nested tensor"}[kind]
    msg = f"{arg} must be a dense \\(strided\\) tensor, got {what}"
    with pytest.raises(TypeError, match=msg):
        ck.fused_peg(a["x"], a["weight"], a["bias"], size, a["P"], backend=backend)
    if arg == "x" and backend == "auto":
        for peg in (ck.PEG(C, num_prefix_tokens=a["P"]), ck.FusedPEG(C, num_prefix_tokens=a["P"])):
            with pytest.raises(TypeError, match=msg):
                peg(a["x"], *hw)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("arg, dtype", [("weight", torch.int64), ("weight", torch.complex64),
                                        ("weight", torch.float64), ("bias", torch.bool),
                                        ("bias", torch.int32)])
def test_autocast_casts_only_floating_parameters(backend, arg, dtype):
    """Under autocast the op casts x, weight and bias to the dtype it computes in, but, like
    autocast itself, only floating tensors other than float64: an integer, bool or complex
    weight or bias was cast and the op returned a result (dropping a complex weight's imaginary
    part), where it must be refused as without autocast and as by the eager PEG."""
    a = _good()
    a[arg] = (torch.randn(a[arg].shape, dtype=dtype) if dtype.is_complex or dtype.is_floating_point
              else torch.randint(-3, 3, a[arg].shape).to(dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=f"{arg} dtype must match x .*, got {dtype}"):
            ck.fused_peg(a["x"], a["weight"], a["bias"], (H, W), P, backend=backend)


def test_module_bad_backend_raises_at_construction():
    with pytest.raises(ValueError, match="FusedPEG: backend must be one of"):
        ck.FusedPEG(8, backend="cudnn")
    with pytest.raises(ValueError, match="FusedPEG: backend must be one of"):
        ck.FusedPEG(8, backend=None)


@pytest.mark.parametrize("backend", _backends())
def test_double_backward_raises_instead_of_zeros(backend):
    """A gradient of a gradient: the fused backends have no second derivative and say so (the
    reference computes it); none may return zeros."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    out = ck.fused_peg(x, w, None, (2, 2), 1, backend=backend)
    gx, = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    if backend == "reference":
        gw, = torch.autograd.grad(gx.sum(), w)
        assert gw.abs().sum() > 0
        return
    with pytest.raises(RuntimeError, match="(not implemented|no autograd formula)"):
        torch.autograd.grad(gx.sum(), w)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script:FutureWarning")  # torch.func's import
@pytest.mark.parametrize("how", ["torch.func.jvp", "forward_ad"])
@pytest.mark.parametrize("backend", _backends())
def test_forward_mode_ad_raises_instead_of_zeros(backend, how):
    """Forward-mode AD: the fused backends have no formula and say so (the reference computes
    the tangent); none may return an output without one."""
    import torch.autograd.forward_ad as fwAD
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 3, dtype=torch.float64, generator=g)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, generator=g)
    t = torch.randn(x.shape, dtype=torch.float64, generator=g)

    def tangent():
        if how == "torch.func.jvp":
            return torch.func.jvp(lambda v: ck.fused_peg(v, w, None, (2, 3), 1, backend=backend),
                                  (x,), (t,))[1]
        with fwAD.dual_level():
            out = ck.fused_peg(fwAD.make_dual(x, t), w, None, (2, 3), 1, backend=backend)
            return fwAD.unpack_dual(out).tangent

    if backend == "reference":  # the op is linear in x: its tangent is the op of t, less its bias
        assert rel_err(tangent(), ck.peg_reference(t, w, None, 2, 3, 1)) < 1e-12
    else:
        with pytest.raises(RuntimeError, match="forward-mode AD .* is not supported"):
            tangent()


@pytest.mark.parametrize("tokens, P", [(P, P), (P + 12, P), (P + 2, P + 3)],
                         ids=["only_prefix", "not_square", "fewer_than_prefix"])
def test_size_none_without_a_square_grid(tokens, P):
    """size=None infers a square grid; with no grid tokens left, a count that is not a square
    or fewer tokens than prefix tokens, the error says so and asks for size=(H, W)."""
    a = _good()
    x = torch.randn(B, tokens, C)
    with pytest.raises(ValueError, match=r"size=None needs a square grid.*pass size=\(H, W\)"):
        ck.fused_peg(x, a["weight"], a["bias"], None, P)
