"""The op as a torch.library citizen: opcheck, torch.compile, torch.export, autocast."""
import pytest
import torch

import cpvt_kernels as ck
from conftest import RecordFunctions, RecordOps, make_inputs, rel_err, require_backend

SAMPLES = [  # (B, P, H, W, C, kh, kw, bias)
    (2, 1, 5, 6, 8, 3, 3, True),
    (1, 0, 3, 3, 5, 3, 5, False),
    (3, 2, 4, 7, 3, 1, 1, True),
    (0, 1, 2, 2, 4, 3, 3, True),
]


def _needs_cpp():
    require_backend("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: "-".join(map(str, s)))
def test_opcheck_forward(sample, dtype):
    _needs_cpp()
    B, P, H, W, C, kh, kw, bias = sample
    _, (x, w, b) = make_inputs(B, P, H, W, C, kh, kw, bias, dtype, "cpu")
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(torch.ops.cpvt.peg_forward.default, (x, w, b, H, W, P))


def test_autograd_is_registered_in_cpp():
    """The extension's peg_forward differentiates through its C++ autograd (csrc/autograd.cpp),
    not through the slower Python registration that stands in for builds without it."""
    _needs_cpp()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("cpvt::peg_forward", "Autograd")
    x = torch.randn(2, 1 + 3 * 4, 5, requires_grad=True)
    w, b = torch.randn(5, 1, 3, 3), torch.randn(5)
    out = torch.ops.cpvt.peg_forward(x, w, b, 3, 4, 1)
    assert "PegFunction" in out.grad_fn.name()
    with torch.no_grad():
        assert torch.ops.cpvt.peg_forward(x, w, b, 3, 4, 1).grad_fn is None
    # Without any input that requires a gradient the op runs without a graph node; with only the
    # bias or only the weight requiring one, the node is there and gives that gradient.
    assert torch.ops.cpvt.peg_forward(x.detach(), w, b, 3, 4, 1).grad_fn is None
    for i in (1, 2):
        args = [x.detach(), w.clone(), b.clone()]
        args[i].requires_grad_()
        out = torch.ops.cpvt.peg_forward(*args, 3, 4, 1)
        assert "PegFunction" in out.grad_fn.name()
        g = torch.randn_like(out)
        (got,) = torch.autograd.grad(out, args[i], g)
        ref_args = [a.detach().double() for a in args]
        ref_args[i].requires_grad_()
        (want,) = torch.autograd.grad(ck.peg_reference(*ref_args, 3, 4, 1), ref_args[i],
                                      g.double())
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True),
                                  (False, False, True)])
@pytest.mark.parametrize("sample", SAMPLES[:3], ids=lambda s: "-".join(map(str, s)))
def test_opcheck_backward(sample, mask):
    _needs_cpp()
    B, P, H, W, C, kh, kw, _ = sample
    _, (x, w, _b) = make_inputs(B, P, H, W, C, kh, kw, False, torch.float32, "cpu")
    g = torch.randn_like(x)
    torch.library.opcheck(torch.ops.cpvt.peg_backward.default, (g, x, w, H, W, P, list(mask)))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compile_fullgraph_matches_eager(backend):
    require_backend(backend)
    torch._dynamo.reset()
    peg = ck.FusedPEG(16, 3, num_prefix_tokens=1, backend=backend)
    x = torch.randn(2, 1 + 5 * 6, 16, requires_grad=True)

    def step(m, x):
        y = m(x, 5, 6)
        return (y * y).sum(), y

    loss_e, y_e = step(peg, x)
    g_e = torch.autograd.grad(loss_e, [x, peg.proj.weight, peg.proj.bias])
    compiled = torch.compile(step, fullgraph=True)
    loss_c, y_c = compiled(peg, x)
    g_c = torch.autograd.grad(loss_c, [x, peg.proj.weight, peg.proj.bias])
    assert rel_err(y_c, y_e) < 1e-6
    for a, b in zip(g_c, g_e):
        assert rel_err(a, b) < 1e-5


def test_compile_has_no_graph_break_and_keeps_the_op():
    require_backend("cpu")
    torch._dynamo.reset()
    peg = ck.FusedPEG(8, 3, backend="cpu")
    x = torch.randn(2, 1 + 4 * 4, 8)
    explain = torch._dynamo.explain(lambda t: peg(t, 4, 4))(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    ops = [str(n.target) for g in explain.graphs for n in g.graph.nodes]
    assert any("cpvt.peg_forward" in o for o in ops), ops


def test_compile_dynamic_two_resolutions_without_recompiling():
    require_backend("cpu")
    torch._dynamo.reset()
    peg = ck.FusedPEG(8, 3, backend="cpu")
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda t, h, w: peg(t, h, w), backend=counter, dynamic=True,
                       fullgraph=True)
    for h, w in [(4, 5), (7, 3), (6, 6)]:
        x = torch.randn(2, 1 + h * w, 8)
        assert rel_err(fn(x, h, w), peg(x, h, w)) < 1e-6
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_compile_is_not_redone_when_an_eager_call_fills_the_backend_cache(backend, monkeypatch):
    """The name of the backend an argument resolves to is cached for eager calls. A traced call
    read that cache, so torch.compile guarded on its contents: a function compiled before any
    eager call was compiled again at the same shapes after the first eager call."""
    require_backend("cpu")
    import torch._dynamo.testing
    monkeypatch.setattr(ck.ops, "_RESOLVED", {})
    torch._dynamo.reset()
    peg = ck.FusedPEG(8, 3, backend=backend)
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(peg, backend=counter, fullgraph=True)
    x = torch.randn(2, 1 + 4 * 4, 8)
    first = fn(x, 4, 4)
    assert not ck.ops._RESOLVED  # tracing neither reads nor fills it
    assert torch.equal(peg(x, 4, 4), first)
    assert ck.ops._RESOLVED  # the eager call did
    assert torch.equal(fn(x, 4, 4), first)
    assert counter.frame_count == 1


def test_export_runs_and_matches_eager():
    require_backend("cpu")
    peg = ck.FusedPEG(8, 3, backend="cpu").eval()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.peg = peg

        def forward(self, x):
            return self.peg(x, 4, 5)

    x = torch.randn(3, 21, 8)
    ep = torch.export.export(Wrap(), (x,))
    assert any("cpvt.peg_forward" in str(n.target) for n in ep.graph.nodes)
    x2 = torch.randn(3, 21, 8)
    assert rel_err(ep.module()(x2), peg(x2, 4, 5)) < 1e-6


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_cpu_bfloat16(backend, x_dtype):
    """Under autocast the output has the eager PEG's dtype there (float32 tokens stay float32,
    so the residual stream after a PEG keeps its dtype); gradients reach float32 parameters in
    float32. Every backend computes in the output dtype, the reference backend too (its
    convolution would otherwise run in the autocast dtype, as the eager PEG's does)."""
    require_backend(backend)
    peg = ck.FusedPEG(12, 3, backend=backend)
    x = torch.randn(2, 1 + 4 * 4, 12).to(x_dtype).requires_grad_()
    eager = ck.PEG(12, 3)
    eager.load_state_dict(peg.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = peg(x, 4, 4)
        y_eager = eager(x, 4, 4)  # float32 parameters with bfloat16 tokens too, as nn.Conv2d
    assert y_eager.dtype == x_dtype
    assert y.dtype == x_dtype
    y.float().pow(2).sum().backward()
    assert x.grad.dtype == x_dtype and peg.proj.weight.grad.dtype == torch.float32
    # The float64 reference of the values the op sees (the parameters in x's dtype).
    w, b = (p.detach().to(x_dtype).double() for p in (peg.proj.weight, peg.proj.bias))
    ref = ck.peg_reference(x.detach().double(), w, b, 4, 4, 1)
    assert rel_err(y, ref) < (1e-5 if x_dtype == torch.float32 else 1.6e-2)
    assert rel_err(y, y_eager) < 1.6e-2


def test_eager_binding_is_the_same_op(monkeypatch):
    """fused_peg calls plain tensors' op through _C.peg_forward: the same dispatcher op, so the
    same output and gradients (bitwise) as torch.ops.cpvt.peg_forward, and dispatch modes see it;
    a torch function mode or a tensor subclass takes torch.ops, and so sees the op."""
    _needs_cpp()
    from cpvt_kernels import ops
    calls = []
    eager = ops._PEG_FORWARD_EAGER
    assert eager is not None
    monkeypatch.setattr(ops, "_PEG_FORWARD_EAGER", lambda *a: calls.append(1) or eager(*a))
    torch.manual_seed(3)
    x = torch.randn(2, 1 + 4 * 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 1 + 4 * 5, 6, dtype=torch.float64)

    def run(fn):
        out = fn(x, w, b, 4, 5, 1)
        return (out, *torch.autograd.grad(out, (x, w, b), g))

    fused = run(lambda *a: ck.fused_peg(*a[:3], (a[3], a[4]), a[5], backend="cpu"))
    assert calls == [1]
    direct = run(torch.ops.cpvt.peg_forward.default)
    for got, want in zip(fused, direct):
        assert torch.equal(got, want)
    assert "PegFunction" in fused[0].grad_fn.name()

    with RecordOps() as mode:
        ck.fused_peg(x, w, b, (4, 5), 1, backend="cpu")
    assert len(calls) == 2 and torch.ops.cpvt.peg_forward.default in mode.seen

    with RecordFunctions() as mode:
        ck.fused_peg(x, w, b, (4, 5), 1, backend="cpu")
    assert len(calls) == 2 and torch.ops.cpvt.peg_forward.default in mode.seen


def test_eager_binding_checks_its_arguments():
    _needs_cpp()
    from cpvt_kernels import _C
    x, w = torch.randn(1, 1 + 4, 2), torch.randn(2, 1, 3, 3)
    with pytest.raises(TypeError, match="takes 6 arguments"):
        _C.peg_forward(x, w, None, 2, 2)
    with pytest.raises(TypeError, match="must be tensors"):
        _C.peg_forward(x, w.tolist(), None, 2, 2, 1)
    with pytest.raises(TypeError, match="must be ints, got float"):
        _C.peg_forward(x, w, None, 2.0, 2, 1)
    with pytest.raises(ValueError, match="H"):  # the op's own checks, as Python exceptions
        _C.peg_forward(x, w, None, 3, 2, 1)
    assert torch.equal(_C.peg_forward(x, w, None, 2, 2, 1),
                       torch.ops.cpvt.peg_forward(x, w, None, 2, 2, 1))


@pytest.mark.filterwarnings("ignore::UserWarning")  # vmap's per-sample fallback for the op
@pytest.mark.filterwarnings("ignore:.*torch.jit.script:FutureWarning")  # torch.func's import
@pytest.mark.parametrize("backend", ["cpu", "auto", "triton", "reference"])
def test_torch_func_reverse_mode(backend):
    """torch.func.grad, vjp, jacrev and vmap of grad (per-sample gradients): the C++ autograd
    of the cpu and cuda ops refuses to run under torch.func ("cannot use C++
    torch::autograd::Function with functorch transforms"), so under them the op runs through
    a Python autograd.Function with the same backward op; the results are those of the
    reference. A second derivative is an error, not zeros. The triton op's autograd, which
    torch.library generates, cannot run under them either (PyTorch issue 170834): an error
    that says so and names the backends that can."""
    if backend not in ("auto", "reference"):
        require_backend(backend)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 1 + 2 * 3, 4, dtype=torch.float64, generator=g)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)

    def loss(fn):
        return lambda xx, ww, bb: fn(xx, ww, bb).square().sum()

    fused = lambda xx, ww, bb: ck.fused_peg(xx, ww, bb, (2, 3), 1, backend=backend)  # noqa: E731
    ref = lambda xx, ww, bb: ck.peg_reference(xx, ww, bb, 2, 3, 1)  # noqa: E731
    if backend == "triton":
        with pytest.raises(RuntimeError, match=r"triton.*torch.func's grad.*backend=\"cuda\""):
            torch.func.grad(loss(fused), argnums=1)(x, w, b)
        return
    got = torch.func.grad(loss(fused), argnums=(0, 1, 2))(x, w, b)
    want = torch.func.grad(loss(ref), argnums=(0, 1, 2))(x, w, b)
    for a, r in zip(got, want):
        assert rel_err(a, r) < 1e-12
    out, vjp = torch.func.vjp(fused, x, w, b)
    ct = torch.randn(out.shape, dtype=torch.float64, generator=g)
    for a, r in zip(vjp(ct), torch.func.vjp(ref, x, w, b)[1](ct)):
        assert rel_err(a, r) < 1e-12
    jac = torch.func.jacrev(lambda ww: fused(x, ww, b))(w)
    assert rel_err(jac, torch.func.jacrev(lambda ww: ref(x, ww, b))(w)) < 1e-12

    def per_sample(fn):
        return torch.func.vmap(torch.func.grad(lambda xx, ww: fn(xx[None], ww, b).square().sum(),
                                               argnums=1), in_dims=(0, None))(x, w)

    assert rel_err(per_sample(fused), per_sample(ref)) < 1e-12
    if backend == "reference":
        return
    with pytest.raises(RuntimeError, match="derivative for cpvt::peg_backward is not implemented"):
        torch.func.jacrev(torch.func.jacrev(lambda ww: fused(x, ww, b).square().sum()))(w)
    with pytest.raises(RuntimeError, match="forward-mode AD .* is not supported"):
        torch.func.hessian(lambda ww: fused(x, ww, b).square().sum())(w)
