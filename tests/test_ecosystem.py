"""The fused PEG inside real stacks: torch.compile of the full model, torch.export and
AOTInductor, autocast, and DistributedDataParallel under torchrun."""
import os
import subprocess
import sys

import torch

import cpvt_kernels as ck
from cpvt_kernels import models
from conftest import rel_err, require_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_classes=10, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
            peg_impl="fused", peg_backend="cpu")


def _tiny(**over):
    torch.manual_seed(0)
    return models.cpvt_tiny(**{**TINY, **over})


def test_compile_full_model_no_graph_break():
    require_backend("cpu")
    torch._dynamo.reset()
    model = _tiny(peg_positions=(0, 1))
    x = torch.randn(2, 3, 32, 32)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    targets = [str(n.target) for g in explain.graphs for n in g.graph.nodes]
    assert sum("cpvt.peg_forward" in t for t in targets) == 2


def test_compile_full_model_forward_backward_matches_eager():
    require_backend("cpu")
    torch._dynamo.reset()
    eager = _tiny()
    compiled_model = _tiny()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    y_e, y_c = eager(x), compiled(x)
    assert rel_err(y_c, y_e) < 1e-4
    y_e.square().sum().backward()
    y_c.square().sum().backward()
    for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        assert rel_err(p_c.grad, p_e.grad) < 1e-3, name


def test_compile_dynamic_two_resolutions_without_recompiling():
    require_backend("cpu")
    torch._dynamo.reset()
    model = _tiny().eval()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for size in (32, 48, 64):
            x = torch.randn(2, 3, size, size)
            assert rel_err(compiled(x), model(x)) < 1e-5
    assert counter.frame_count == 1


def test_export_model_and_aot_inductor_package(tmp_path):
    require_backend("cpu")
    model = _tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(model, (x,))
    assert any("cpvt.peg_forward" in str(n.target) for n in ep.graph.nodes)
    x2 = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x2)
        assert rel_err(ep.module()(x2), want) < 1e-5
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "cpvt.pt2"))
        loaded = torch._inductor.aoti_load_package(path)
        assert rel_err(loaded(x2), want) < 1e-4


def test_autocast_model_bfloat16_forward_backward():
    require_backend("cpu")
    model = _tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    peg = next(m for m in model.modules() if isinstance(m, ck.FusedPEG))
    assert peg.proj.weight.grad is not None and peg.proj.weight.grad.dtype == torch.float32
    assert torch.isfinite(peg.proj.weight.grad).all()


def test_ddp_torchrun_matches_single_process(tmp_path):
    """Two gloo processes train a few steps; parameters equal single-process training."""
    require_backend("cpu")
    # TMPDIR: torchrun's log folders go to the test's folder, not to stay behind in /tmp
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "python", "train_ddp.py"), "--check", "--steps", "3",
           "--backend", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "-> PASS" in out, out
