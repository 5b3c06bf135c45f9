"""The CPVT models and replace_peg: parameter counts, eager/fused parity, surgery, resolutions."""
import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

import cpvt_kernels as ck
from cpvt_kernels import models
from conftest import TOLERANCE, rel_err, require_backend

BACKENDS = ["reference", "cpu", "triton", "cuda"]


def tiny(**options):
    """A CPVT small enough for fast CPU tests: 2 blocks, dim 24, 3 heads, patch 4."""
    cfg = dict(img_size=32, patch_size=4, embed_dim=24, depth=2, num_heads=3, num_classes=7)
    cfg.update(options)
    return models.CPVT(**cfg)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def forward_backward(model, images, seed=0):
    """Output and every gradient (images and parameters) for a fixed random cotangent."""
    images = images.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(images)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(g.to(out))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    grads["<images>"] = images.grad.detach().clone()
    return out.detach(), grads


# ---------------------------------------------------------------------------------------------
# Parameter counts (constructed on the meta device: no memory, no init time).

# DeiT's published counts (1000 classes, 224 px): a CPVT is DeiT without its (1 + 196) x C
# position table and with one PEG (C * 9 weights + C biases).
DEIT = {"tiny": (models.cpvt_tiny, 192, 5_717_416, 5.7),
        "small": (models.cpvt_small, 384, 22_050_664, 22),
        "base": (models.cpvt_base, 768, 86_567_656, 86)}


@pytest.mark.parametrize("name", list(DEIT))
def test_parameter_counts_match_the_paper(name):
    ctor, C, deit, paper = DEIT[name]
    with torch.device("meta"):
        cpvt = n_params(ctor())
        gap = n_params(ctor(global_pool="avg"))
        deep = n_params(ctor(peg_positions=range(6)))
        k7 = n_params(ctor(peg_kernel_size=7))
        deit_again = n_params(ctor(peg_positions=(), abs_pos_embed=True))
        distilled = n_params(ctor(distilled=True))
    assert deit_again == deit
    assert cpvt == deit - 197 * C + C * 9 + C
    assert round(cpvt / 1e6, 1 if paper < 10 else 0) == paper
    assert gap == cpvt - C  # no cls token
    assert deep == cpvt + 5 * (C * 9 + C)
    assert k7 == cpvt + C * (49 - 9)
    assert distilled == cpvt + C + C * 1000 + 1000  # dist token + head_dist


def test_configurations():
    with torch.device("meta"):
        for ctor, dim, heads in ((models.cpvt_tiny, 192, 3), (models.cpvt_small, 384, 6),
                                 (models.cpvt_base, 768, 12)):
            m = ctor()
            assert m.embed_dim == dim and len(m.blocks) == 12
            assert m.blocks[0].attn.num_heads == heads
            assert m.blocks[0].mlp.fc1.out_features == 4 * dim
            assert m.patch_size == (16, 16)
            assert m.num_prefix_tokens == 1 and m.pos_embed is None
            assert list(m.pos_block) == ["0"] and type(m.pos_block["0"]) is ck.PEG
            assert ctor(global_pool="avg").num_prefix_tokens == 0
            assert ctor(distilled=True).num_prefix_tokens == 2
            assert ctor(distilled=True, global_pool="avg").num_prefix_tokens == 1
            assert list(ctor(peg_positions=range(6)).pos_block) == [str(i) for i in range(6)]
            fused = ctor(peg_impl="fused", peg_backend="reference").pos_block["0"]
            assert type(fused) is ck.FusedPEG and fused.backend == "reference"


def test_init_and_no_weight_decay():
    torch.manual_seed(0)
    m = models.cpvt_small(num_classes=10, peg_positions=(0, 1, 2), distilled=True)
    for key in ("0", "1", "2"):
        conv = m.pos_block[key].proj
        # authors' init: normal, std sqrt(2 / fan_out), fan_out = 3 * 3 * C / C
        assert abs(conv.weight.std().item() / math.sqrt(2 / 9) - 1) < 0.05
        assert abs(conv.weight.mean().item()) < 0.05
        assert torch.all(conv.bias == 0)
    qkv = m.blocks[3].attn.qkv
    assert abs(qkv.weight.std().item() / 0.02 - 1) < 0.05
    assert torch.all(qkv.bias == 0)
    assert torch.all(m.norm.weight == 1) and torch.all(m.norm.bias == 0)
    assert 0.015 < m.cls_token.std().item() < 0.025
    assert 0.015 < m.dist_token.std().item() < 0.025
    assert m.no_weight_decay() == {"cls_token", "dist_token"} | {
        f"pos_block.{k}.proj.{p}" for k in "012" for p in ("weight", "bias")}
    assert set(m.no_weight_decay()) <= dict(m.named_parameters()).keys()
    assert tiny(global_pool="avg").no_weight_decay() == {"pos_block.0.proj.weight",
                                                         "pos_block.0.proj.bias"}
    with_table = tiny(abs_pos_embed=True)
    assert "pos_embed" in with_table.no_weight_decay()
    assert 0.015 < with_table.pos_embed.std().item() < 0.025


@pytest.mark.parametrize("options, match", [
    (dict(global_pool="max"), "global_pool"),
    (dict(peg_impl="triton"), "peg_impl"),
    (dict(peg_backend="cudnn"), "peg_backend"),
    (dict(peg_positions=(0, 2)), "peg_positions"),      # depth is 2
    (dict(peg_positions=(-2,)), "peg_positions"),
    (dict(peg_positions=(1, 1)), "peg_positions"),
    (dict(peg_positions="0"), "peg_positions"),
    (dict(peg_positions=None), "peg_positions"),
    (dict(peg_positions=(0, "a")), "peg_positions"),
    (dict(peg_kernel_size=4), "CPVT: peg_kernel_size"),
    (dict(num_heads=5), "num_heads"),
    (dict(num_classes="10"), "num_classes"),
    (dict(num_classes=-1), "num_classes"),
    (dict(abs_pos_embed=True, img_size=30), "img_size"),
    (dict(abs_pos_embed=True, img_size=224.0), "img_size"),
    (dict(img_size=(224, 224, 3)), "img_size"),
    (dict(img_size="big"), "img_size"),
    (dict(drop_path_rate=-0.5), r"drop_path_rate must be a number in \[0.0, 1.0\], got -0.5"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
    (dict(drop_rate=1.2), "drop_rate"),
    (dict(attn_drop_rate=float("nan")), "attn_drop_rate"),
    (dict(mlp_ratio=-1.0), r"mlp_ratio must be a number in \(0.0, inf\), got -1.0"),
    (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(mlp_ratio="4"), "mlp_ratio"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        tiny(**options)


def test_drop_path_rate_one_drops_every_branch():
    """drop_path_rate = 1 (the last block's branches always dropped in training) divided by a
    keep probability of 0: the logits were all NaN. The branches are now dropped to zero."""
    torch.manual_seed(0)
    m = tiny(drop_path_rate=1.0).train()
    out = m(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out).all()
    block = m.blocks[-1]
    y = torch.randn(2, 5, m.embed_dim)
    assert torch.equal(block.drop_path(y), torch.zeros_like(y))


def test_drop_path_keeps_the_expected_value():
    """In training each sample's branch is dropped (zeros) or kept and divided by the keep
    probability, so its expected value is the branch; in eval it is the branch itself."""
    from cpvt_kernels.models.cpvt import DropPath
    torch.manual_seed(0)
    p = 0.25
    dp = DropPath(p).train()
    x = torch.randn(4000, 3, 5)
    y = dp(x)
    kept = (y != 0).flatten(1).any(1)
    assert torch.equal(y[kept], x[kept] / (1 - p)) and torch.equal(y[~kept], 0 * x[~kept])
    assert abs(kept.float().mean().item() - (1 - p)) < 0.03  # 4000 draws: sd 0.007
    assert dp.eval()(x) is x


def test_gap_distilled_head_averages_patches_and_the_distillation_token():
    """global_pool="avg" with distilled=True: one prefix token (the distillation token); the
    features are the mean of the patch tokens and that token, averaged."""
    torch.manual_seed(0)
    m = tiny(global_pool="avg", distilled=True).eval()
    P = m.num_prefix_tokens
    assert P == 1
    t = torch.randn(2, P + 16, m.embed_dim)
    want = (t[:, P:].mean(dim=1) + t[:, P - 1]) / 2
    assert torch.allclose(m.forward_head(t, pre_logits=True), want, atol=1e-6)


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    m = tiny(attn_drop_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


def test_bad_kernel_size_type_names_the_option():
    with pytest.raises(TypeError, match="CPVT: peg_kernel_size"):
        tiny(peg_kernel_size="3")


def test_one_peg_position_as_an_int():
    assert tiny(peg_positions=1).peg_positions == (1,)
    assert list(tiny(peg_positions=1).pos_block) == ["1"]


def test_bad_image_size():
    m = tiny()
    with pytest.raises(ValueError, match=r"divisible by the patch size.*\(30, 32\)"):
        m(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(3, 32, 32))


# ---------------------------------------------------------------------------------------------
# Eager and fused models: one state dict, the same outputs and gradients.

HEADS = [dict(), dict(global_pool="avg"), dict(distilled=True),
         dict(global_pool="avg", distilled=True, peg_positions=(-1, 1), peg_kernel_size=(5, 1))]


@pytest.mark.parametrize("head", HEADS, ids=["token", "gap", "distilled", "gap-distilled-pegs"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_fused_parity(backend, head):
    device = require_backend(backend)
    torch.manual_seed(1)
    eager = tiny(**head).to(device)
    for peg in eager.pos_block.values():  # bias zero at init: make it count
        nn.init.normal_(peg.proj.bias)
    fused = tiny(**head, peg_impl="fused", peg_backend=backend).to(device)
    assert eager.state_dict().keys() == fused.state_dict().keys()
    fused.load_state_dict(eager.state_dict())
    eager.load_state_dict(fused.state_dict())
    images = torch.randn(3, 3, 20, 28, dtype=torch.float64, device=device)  # a 5 x 7 grid

    # float64: the two models compute the same function
    out64, g64 = forward_backward(eager.double(), images)
    out, g = forward_backward(fused.double(), images)
    assert rel_err(out, out64) < TOLERANCE[torch.float64]
    for n in g64:
        assert rel_err(g[n], g64[n]) < TOLERANCE[torch.float64], n

    # float32: the fused model is as close to float64 as the README's tolerances, and no farther
    # from it than the eager model is
    out32e, g32e = forward_backward(eager.float(), images.float())
    out32f, g32f = forward_backward(fused.float(), images.float())
    tol = TOLERANCE[torch.float32]
    assert rel_err(out32f, out64) < max(tol, 2 * rel_err(out32e, out64))
    assert rel_err(out32f, out32e) < tol
    for n in g64:
        assert rel_err(g32f[n], g64[n]) < max(tol, 2 * rel_err(g32e[n], g64[n])), n
        assert rel_err(g32f[n], g32e[n]) < tol, n


def test_pegs_sit_after_the_chosen_blocks_on_the_image_grid():
    torch.manual_seed(7)
    m = tiny(depth=3, peg_positions=(-1, 1), distilled=True).double()
    calls = []

    def record(name):
        def hook(module, args, out):
            calls.append((name, args[0].detach(), out.detach()))
        return hook

    for i, blk in enumerate(m.blocks):
        blk.register_forward_hook(record(f"block{i}"))
    for key, peg in m.pos_block.items():
        nn.init.normal_(peg.proj.bias)
        peg.register_forward_hook(record(f"peg{key}"))
    m(torch.randn(2, 3, 20, 28, dtype=torch.float64))  # 5 x 7 patches of 4 x 4
    assert [c[0] for c in calls] == ["peg-1", "block0", "block1", "peg1", "block2"]
    assert torch.equal(calls[3][1], calls[2][2])  # PEG 1 reads block 1's output
    for name, x, out in (calls[0], calls[3]):
        conv = m.pos_block[name[3:]].proj
        grid = x[:, 2:].reshape(2, 5, 7, 24).permute(0, 3, 1, 2)  # row-major 5 x 7 grid
        expected = (conv(grid) + grid).permute(0, 2, 3, 1).reshape(2, 35, 24)
        assert torch.equal(out[:, :2], x[:, :2])  # cls and distillation tokens pass through
        assert rel_err(out[:, 2:], expected) < TOLERANCE[torch.float64]


def test_distilled_training_returns_both_heads():
    m = tiny(distilled=True)
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    avg = m(x)
    m.set_distilled_training(True)
    assert torch.equal(m(x), avg)  # eval mode: still the average
    m.train()
    cls, dist = m(x)
    assert torch.allclose((cls + dist) / 2, avg, atol=1e-6)
    assert not torch.allclose(cls, dist)


def test_distilled_head_is_deits():
    """The distilled head as timm's DeiT (VisionTransformerDistilled): dropout on both tokens'
    features, in the same order, and their average before the heads. The distillation token's
    features skipped the dropout, and pre_logits gave the cls token's alone."""
    pytest.importorskip("timm")
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(0)
    m = tiny(distilled=True, drop_rate=0.4)
    deit = VisionTransformerDistilled(img_size=32, patch_size=4, embed_dim=24, depth=1,
                                      num_heads=3, num_classes=7, drop_rate=0.4)
    for name in ("head", "head_dist"):
        getattr(deit, name).load_state_dict(getattr(m, name).state_dict())
    tokens = torch.randn(3, 2 + 64, 24)
    for train in (False, True):
        m.train(train), deit.train(train)
        m.set_distilled_training(True), deit.set_distilled_training(True)
        for pre_logits in (False, True):
            torch.manual_seed(1)
            ours = m.forward_head(tokens, pre_logits=pre_logits)
            torch.manual_seed(1)
            theirs = deit.forward_head(tokens, pre_logits=pre_logits)
            for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (ours, theirs))):
                assert torch.allclose(a, b, rtol=0, atol=1e-6), (train, pre_logits)


# ---------------------------------------------------------------------------------------------
# Any input size divisible by the patch size.

@pytest.mark.parametrize("head", [dict(), dict(global_pool="avg")], ids=["token", "gap"])
def test_inference_at_two_resolutions(head):
    torch.manual_seed(2)
    m = models.cpvt_tiny(num_classes=10, depth=2, **head).eval()
    fused = models.cpvt_tiny(num_classes=10, depth=2, peg_impl="fused", **head).eval()
    fused.load_state_dict(m.state_dict())
    outs = {}
    with torch.no_grad():
        for size in ((224, 224), (384, 384), (160, 288)):
            x = torch.randn(2, 3, *size)
            out = m(x)
            assert out.shape == (2, 10) and torch.isfinite(out).all()
            tokens = m.forward_features(x)
            assert tokens.shape == (2, m.num_prefix_tokens + (size[0] // 16) * (size[1] // 16), 192)
            assert rel_err(fused(x), out) < TOLERANCE[torch.float32]
            # one image alone gives what it gives inside the batch
            assert rel_err(m(x[1:]), out[1:]) < TOLERANCE[torch.float32]
            outs[size] = out
    assert not torch.allclose(outs[(224, 224)], outs[(384, 384)])


def test_abs_pos_embed_is_resampled():
    torch.manual_seed(3)
    m = tiny(abs_pos_embed=True, peg_positions=(), img_size=(16, 24)).eval()
    assert m.pos_embed.shape == (1, 1 + 4 * 6, 24)
    x = torch.randn(2, 3, 16, 24)
    tokens, size = m.patch_embed(x)
    tokens = torch.cat([m.cls_token.expand(2, -1, -1), tokens], 1)
    assert torch.equal(m._pos_embed(tokens, size), tokens + m.pos_embed)
    # a constant table stays constant after resampling to another grid
    with torch.no_grad():
        m.pos_embed.copy_(torch.randn(1, 1, 24).expand_as(m.pos_embed))
    out = m._pos_embed(torch.zeros(1, 1 + 7 * 5, 24), (7, 5))
    assert torch.allclose(out, m.pos_embed[:, :1].expand(1, 36, 24), atol=1e-5)
    assert m(torch.randn(2, 3, 28, 20)).shape == (2, 7)


# ---------------------------------------------------------------------------------------------
# replace_peg on this package's models.

@pytest.mark.parametrize("backend", BACKENDS)
def test_replace_peg_on_cpvt(backend):
    device = require_backend(backend)
    torch.manual_seed(4)
    model = tiny(peg_positions=(0, 1), distilled=True).to(device).double()
    for peg in model.pos_block.values():
        nn.init.normal_(peg.proj.bias)
    images = torch.randn(2, 3, 24, 36, dtype=torch.float64, device=device)
    out_before, g_before = forward_backward(model, images)
    names_before = [n for n, _ in model.named_parameters()]
    params_before = list(model.parameters())
    saved = copy.deepcopy(model.state_dict())

    assert ck.replace_peg(model, backend=backend) is model
    assert all(type(p) is ck.FusedPEG and p.backend == backend for p in model.pos_block.values())
    assert [n for n, _ in model.named_parameters()] == names_before
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    out_after, g_after = forward_backward(model, images)
    assert rel_err(out_after, out_before) < TOLERANCE[torch.float64]
    for n in g_before:
        assert rel_err(g_after[n], g_before[n]) < TOLERANCE[torch.float64], n

    # state dicts load both ways
    model.load_state_dict(saved)
    back = tiny(peg_positions=(0, 1), distilled=True).to(device).double()
    back.load_state_dict(model.state_dict())
    assert rel_err(forward_backward(back, images)[0], out_before) < TOLERANCE[torch.float64]

    # called again: only the backend changes
    ck.replace_peg(model, backend="reference")
    assert all(type(p) is ck.FusedPEG and p.backend == "reference"
               for p in model.pos_block.values())


def test_replace_peg_leaves_other_modules_and_warns():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="found no PEG"):
        ck.replace_peg(model)
    assert type(model[0]) is nn.Conv2d
    with pytest.raises(ValueError, match="backend.*'cudnn'"):
        ck.replace_peg(tiny(), backend="cudnn")
    with pytest.raises(TypeError, match="model"):
        ck.replace_peg("model")


# ---------------------------------------------------------------------------------------------
# replace_peg on timm (Twins uses timm's PosConv), built with random weights: no download.

def small_twins(timm):
    from timm.models.twins import Twins
    return Twins(img_size=32, patch_size=4, num_classes=5, embed_dims=(16, 32), num_heads=(1, 2),
                 mlp_ratios=(2, 2), depths=(2, 1), sr_ratios=(2, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_replace_peg_on_timm_twins(backend):
    timm = pytest.importorskip("timm")
    from timm.models.twins import PosConv
    device = require_backend(backend)
    torch.manual_seed(5)
    model = small_twins(timm).to(device).double()
    for m in model.pos_block:
        nn.init.normal_(m.proj[0].bias)
    images = torch.randn(2, 3, 24, 40, dtype=torch.float64, device=device)  # 6x10, then 3x5
    out_before, g_before = forward_backward(model, images)
    saved = copy.deepcopy(model.state_dict())
    params_before = list(model.named_parameters())

    ck.replace_peg(model, backend=backend)
    assert all(isinstance(m, PosConv) and type(m).__name__ == "FusedPosConv"
               and m.backend == backend for m in model.pos_block)
    assert [(n, id(p)) for n, p in model.named_parameters()] == \
        [(n, id(p)) for n, p in params_before]
    assert "pos_block.0.proj.0.weight" in model.state_dict()
    out_after, g_after = forward_backward(model, images)
    assert rel_err(out_after, out_before) < TOLERANCE[torch.float64]
    for n in g_before:
        assert rel_err(g_after[n], g_before[n]) < TOLERANCE[torch.float64], n

    # state dicts load both ways
    model.load_state_dict(saved)
    eager = small_twins(timm).to(device).double()
    eager.load_state_dict(model.state_dict())
    assert rel_err(forward_backward(eager, images)[0], out_before) < TOLERANCE[torch.float64]

    # float32: as close to the float64 model as the README's tolerances, or as the eager model is
    out32e, g32e = forward_backward(eager.float(), images.float())
    out32f, g32f = forward_backward(copy.deepcopy(model).float(), images.float())
    tol = TOLERANCE[torch.float32]
    assert rel_err(out32f, out_before) < max(tol, 2 * rel_err(out32e, out_before))
    for n in g_before:
        assert rel_err(g32f[n], g_before[n]) < max(tol, 2 * rel_err(g32e[n], g_before[n])), n

    # the swapped model deep-copies and pickles
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.pos_block[0]).__name__ == "FusedPosConv"
        assert rel_err(forward_backward(clone, images)[0], out_before) < TOLERANCE[torch.float64]


def test_replace_peg_skips_strided_posconv():
    pytest.importorskip("timm")
    from timm.models.twins import PosConv
    model = nn.ModuleList([PosConv(8, 8, stride=2), PosConv(8, 8, stride=1)])
    ck.replace_peg(model, backend="reference")
    assert type(model[0]) is PosConv
    assert type(model[1]).__name__ == "FusedPosConv"
    x = torch.randn(2, 5 * 3, 8)
    assert model[1](x, (5, 3)).shape == (2, 15, 8)
    assert model[1](x, 5, 3).shape == (2, 15, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,autocast_dtype", [(torch.float32, torch.bfloat16),
                                                    (torch.float32, torch.float16),
                                                    (torch.bfloat16, torch.float16)], ids=str)
def test_replaced_posconv_keeps_timms_dtype_under_autocast(backend, x_dtype, autocast_dtype):
    """timm's PosConv adds the tokens in place into its conv's output, so under autocast it
    returns the autocast dtype, not the promotion the eager PEG returns: the swapped module
    returns the same dtype, values and gradients (within the autocast dtype's tolerance)."""
    pytest.importorskip("timm")
    from timm.models.twins import PosConv
    device = require_backend(backend)
    torch.manual_seed(7)
    eager = PosConv(16, 16).to(device)
    nn.init.normal_(eager.proj[0].bias)
    swapped = ck.replace_peg(copy.deepcopy(eager), backend=backend)
    x = torch.randn(2, 5 * 6, 16, device=device).to(x_dtype)
    grad = torch.randn(x.shape, device=device)
    results = []
    for m in (eager, swapped):
        xl = x.clone().requires_grad_()
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype):
            out = m(xl, (5, 6))
        out.backward(grad.to(out.dtype))
        results.append((out, xl.grad, m.proj[0].weight.grad, m.proj[0].bias.grad))
    tol = TOLERANCE[autocast_dtype]
    assert results[1][0].dtype == results[0][0].dtype == autocast_dtype
    for name, a, b in zip(("out", "grad_x", "grad_weight", "grad_bias"), *results):
        assert b.dtype == a.dtype, name
        assert rel_err(b.double(), a.double()) < 2 * tol, name


def test_replace_peg_on_authors_poscnn():
    class PosCNN(nn.Module):  # the Twins/CPVT authors' PEG (no cls token)
        def __init__(self, in_chans, embed_dim=768, s=1):
            super().__init__()
            self.proj = nn.Sequential(nn.Conv2d(in_chans, embed_dim, 3, s, 1, bias=True,
                                                groups=embed_dim))
            self.s = s

        def forward(self, x, H, W):
            B, N, C = x.shape
            cnn_feat = x.transpose(1, 2).view(B, C, H, W)
            x = self.proj(cnn_feat) + cnn_feat if self.s == 1 else self.proj(cnn_feat)
            return x.flatten(2).transpose(1, 2)

    m = PosCNN(6, 6).double()
    x = torch.randn(3, 4 * 7, 6, dtype=torch.float64)
    ref = m(x, 4, 7)
    ck.replace_peg(m, backend="reference")
    assert type(m).__name__ == "FusedPosCNN"
    assert rel_err(m(x, 4, 7), ref) < TOLERANCE[torch.float64]
    bad = PosCNN(6, 6)
    bad.proj[0].padding = (0, 0)
    with pytest.warns(UserWarning) as record:
        ck.replace_peg(bad)
    messages = [str(w.message) for w in record]
    assert any("left '' (PosCNN) unchanged" in m for m in messages)
    assert any("found no PEG" in m for m in messages)
    assert type(bad) is PosCNN
    # A kernel with an even side (padding (1, 1) is k // 2 for a 2 x 3 kernel too), or padding
    # other than zeros, is no PEG.
    for kernel, mode in (((2, 3), "zeros"), ((3, 2), "zeros"), ((3, 3), "reflect")):
        other = PosCNN(6, 6)
        other.proj[0] = nn.Conv2d(6, 6, kernel, 1, (1, 1), groups=6, padding_mode=mode)
        with pytest.warns(UserWarning) as record:
            ck.replace_peg(other)
        assert any("left '' (PosCNN) unchanged" in str(w.message) for w in record)
        assert type(other) is PosCNN


def test_checkpoint_roundtrip_through_torch_save():
    torch.manual_seed(6)
    fused = tiny(peg_impl="fused", peg_backend="reference")
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    eager = tiny()
    eager.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(2, 3, 12, 32)
    with torch.no_grad():
        assert rel_err(eager(x), fused(x)) < TOLERANCE[torch.float32]


@pytest.mark.filterwarnings("ignore:.*weight_norm:FutureWarning")
@pytest.mark.parametrize("where", ["conv", "proj"])
def test_replaced_posconv_runs_hooks_on_its_conv(where):
    """timm's PosConv with the legacy weight_norm on its conv (the weight is computed in a
    forward pre-hook): after replace_peg the module still follows the weight's parameters,
    and forward hooks on proj still fire."""
    pytest.importorskip("timm")
    from timm.models.twins import PosConv
    torch.manual_seed(6)
    swapped, eager = PosConv(8, 8), PosConv(8, 8)
    calls = []
    for m in (swapped, eager):
        if where == "conv":
            nn.utils.weight_norm(m.proj[0])
        else:
            m.proj.register_forward_hook(lambda mod, args, out: calls.append(1))
    eager.load_state_dict(swapped.state_dict())
    ck.replace_peg(swapped, backend="reference")
    x = torch.randn(2, 12, 8)
    if where == "conv":
        with torch.no_grad():  # an optimizer step on the norm's parameter
            for m in (swapped, eager):
                m.proj[0].weight_g.mul_(2)
    out = swapped(x, (3, 4))
    assert rel_err(out, eager(x, (3, 4))) < TOLERANCE[torch.float32]
    if where == "proj":
        assert len(calls) == 2  # one each
