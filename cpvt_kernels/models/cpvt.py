"""CPVT: a DeiT-style vision transformer whose position information comes from PEGs.

Chu et al., "Conditional Positional Encodings for Vision Transformers" (arXiv 2102.10882).
The model is DeiT (patch embedding, pre-norm transformer blocks, cls-token or GAP head) without
the fixed table of position embeddings; instead a PEG (``cpvt_kernels.PEG`` or ``FusedPEG``)
runs after chosen blocks. Because a PEG is a convolution over the token grid, the same weights
work at any input size divisible by the patch size.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import PEG, FusedPEG, _kernel_pair
from ..ops import BACKENDS

__all__ = ["CPVT", "cpvt_tiny", "cpvt_small", "cpvt_base"]

_GLOBAL_POOLS = ("token", "avg")
_PEG_IMPLS = ("eager", "fused")


def _pair(v, name: str) -> tuple[int, int]:
    try:
        pair = (v, v) if isinstance(v, int) else () if isinstance(v, str) else tuple(v)
    except TypeError:
        pair = ()
    if not (len(pair) == 2 and all(isinstance(a, int) and not isinstance(a, bool) and a >= 1
                                   for a in pair)):
        raise ValueError(f"CPVT: {name} must be a positive int or a pair of them, got {v!r}")
    return pair


def _positive_int(v, name: str, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"CPVT: {name} must be an int >= {low}, got {v!r}")
    return v


def _real(v, name: str, low: float, high: float | None = None, low_open: bool = False) -> float:
    """``v`` as a float in [low, high] (or (low, high] with ``low_open``)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    ok = ok and (v > low if low_open else v >= low) and (high is None or v <= high)
    if not ok:
        where = ("(" if low_open else "[") + f"{low}, " + ("inf)" if high is None else f"{high}]")
        raise ValueError(f"CPVT: {name} must be a number in {where}, got {v!r}")
    return float(v)


class PatchEmbed(nn.Module):
    """Non-overlapping patches, linearly embedded: ``(B, C, H, W) -> (B, N, D)`` and ``(h, w)``."""

    def __init__(self, patch_size=16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = _pair(patch_size, "patch_size")
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.dim() != 4:
            raise ValueError(f"CPVT: images must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
        ph, pw = self.patch_size
        if x.shape[-2] % ph or x.shape[-1] % pw:
            raise ValueError(f"CPVT: image size (H, W) must be divisible by the patch size "
                             f"{self.patch_size}, got {tuple(x.shape[-2:])}")
        x = self.proj(x)
        size = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), size


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CPVT: embed_dim must be divisible by num_heads, "
                             f"got embed_dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep if keep > 0 else x * mask  # (p = 1: every branch dropped)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer encoder block, as in ViT/DeiT."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CPVT(nn.Module):
    """Conditional Position encoding Vision Transformer: DeiT with PEGs instead of a position table.

    Tokens are ``[cls][dist] + H*W patch tokens`` (the prefix tokens depend on the head), and a
    PEG runs right after each block listed in ``peg_positions``.

    Args:
        img_size: default input size; used only to size ``pos_embed`` when
            ``abs_pos_embed=True``. ``forward`` accepts any size divisible by ``patch_size``.
        patch_size: side of the square (or ``(ph, pw)``) patches. 16 in the paper.
        in_chans: image channels.
        num_classes: classes of the head; 0 gives no head (``forward`` returns features).
        global_pool: ``"token"`` (classify the cls token, as DeiT) or ``"avg"`` (the paper's
            CPVT-GAP: no cls token, average the patch tokens after the final norm).
        embed_dim, depth, num_heads, mlp_ratio: transformer size (see ``cpvt_tiny`` etc.).
        peg_positions: blocks after which a PEG runs; ``(0,)`` is the paper's default,
            ``(0, 1, 2, 3, 4, 5)`` its strongest; ``-1`` means before block 0 (right after the
            patch embedding); ``()`` means no PEG; an int is one block.
        peg_kernel_size: the PEG convolution's kernel size (odd, up to 31; 3 in the paper).
        distilled: add DeiT's distillation token and a second head (``head_dist``).
        peg_impl: ``"eager"`` (``cpvt_kernels.PEG``) or ``"fused"`` (``FusedPEG``); both have the
            same parameters, so state dicts are interchangeable.
        peg_backend: backend of the fused PEG: ``"auto"`` or a name from
            ``cpvt_kernels.available_backends()``. Ignored when ``peg_impl="eager"``.
        abs_pos_embed: also add a learnable absolute position embedding, resampled bicubically
            to other grid sizes (as DeiT does). With ``peg_positions=()`` this is DeiT; it exists
            to compare the two.
        drop_rate, attn_drop_rate, drop_path_rate: dropout after projections and MLP, on the
            attention weights, and stochastic depth (linearly increasing over the blocks, to
            ``drop_path_rate`` at the last); each in [0, 1]. ``mlp_ratio`` must be > 0.

    Shapes: ``forward(images (B, in_chans, H, W)) -> logits (B, num_classes)``. With
    ``distilled=True`` the logits are the average of both heads, except in training mode after
    ``set_distilled_training(True)``, where ``forward`` returns the pair ``(cls, dist)``;
    ``forward_head(tokens, pre_logits=True)`` gives the average of the two tokens' features.

    Example:
        >>> from cpvt_kernels import models
        >>> m = models.cpvt_tiny(num_classes=10, peg_impl="fused")
        >>> m(torch.randn(2, 3, 224, 224)).shape, m(torch.randn(2, 3, 384, 320)).shape
        (torch.Size([2, 10]), torch.Size([2, 10]))
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "token", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, peg_positions=(0,),
                 peg_kernel_size=3, distilled: bool = False, peg_impl: str = "eager",
                 peg_backend: str = "auto", abs_pos_embed: bool = False, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if global_pool not in _GLOBAL_POOLS:
            raise ValueError(f"CPVT: global_pool must be one of {_GLOBAL_POOLS}, "
                             f"got {global_pool!r}")
        if peg_impl not in _PEG_IMPLS:
            raise ValueError(f"CPVT: peg_impl must be one of {_PEG_IMPLS}, got {peg_impl!r}")
        if not isinstance(peg_backend, str) or peg_backend.lower() not in ("auto",) + BACKENDS:
            raise ValueError(f"CPVT: peg_backend must be one of {('auto',) + BACKENDS}, "
                             f"got {peg_backend!r}")
        depth = _positive_int(depth, "depth")
        num_classes = _positive_int(num_classes, "num_classes", 0)
        in_chans = _positive_int(in_chans, "in_chans")
        embed_dim = _positive_int(embed_dim, "embed_dim")
        num_heads = _positive_int(num_heads, "num_heads")
        mlp_ratio = _real(mlp_ratio, "mlp_ratio", 0.0, low_open=True)
        drop_rate = _real(drop_rate, "drop_rate", 0.0, 1.0)
        attn_drop_rate = _real(attn_drop_rate, "attn_drop_rate", 0.0, 1.0)
        drop_path_rate = _real(drop_path_rate, "drop_path_rate", 0.0, 1.0)
        # Checked whether or not a pos_embed uses it, so that a bad value never passes silently.
        img_size = _pair(img_size, "img_size")
        if isinstance(peg_positions, int) and not isinstance(peg_positions, bool):
            peg_positions = (peg_positions,)  # one block
        try:
            given = (peg_positions,) if isinstance(peg_positions, str) else tuple(peg_positions)
        except TypeError:
            given = (peg_positions,)  # not a collection: the check below names it
        if any(isinstance(p, bool) or not isinstance(p, int) or not -1 <= p < depth
               for p in given) or len(set(given)) != len(given):
            raise ValueError(f"CPVT: peg_positions must be distinct block indices in "
                             f"[-1, depth - 1 = {depth - 1}], got {peg_positions!r}")
        positions = tuple(sorted(given))
        try:
            _kernel_pair(peg_kernel_size)
        except (TypeError, ValueError) as e:
            raise type(e)(str(e).replace("PEG: kernel_size", "CPVT: peg_kernel_size")) from None

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.peg_positions = positions
        self.peg_impl = peg_impl
        self.distilled = distilled
        self.distilled_training = False
        self.num_prefix_tokens = int(global_pool == "token") + int(distilled)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.patch_size = self.patch_embed.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) \
            if global_pool == "token" else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        if abs_pos_embed:
            ih, iw = img_size
            ph, pw = self.patch_size
            if ih % ph or iw % pw:
                raise ValueError(f"CPVT: img_size must be divisible by patch_size {self.patch_size}"
                                 f", got {img_size!r}")
            self.pos_embed_size = (ih // ph, iw // pw)
            n = self.num_prefix_tokens + self.pos_embed_size[0] * self.pos_embed_size[1]
            self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))
        else:
            self.pos_embed_size = None
            self.pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate, dpr[i], norm_layer)
            for i in range(depth))
        if peg_impl == "fused":
            make_peg = partial(FusedPEG, backend=peg_backend)
        else:
            make_peg = PEG
        # Keyed by block index, so state-dict names say where each PEG sits.
        self.pos_block = nn.ModuleDict({
            str(p): make_peg(embed_dim, peg_kernel_size, self.num_prefix_tokens)
            for p in positions})
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = (nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()) \
            if distilled else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """DeiT's initialisation, and the PEG convolution as in the paper's code.

        Linear: truncated normal, std 0.02, bias 0; LayerNorm: weight 1, bias 0; cls,
        distillation tokens and ``pos_embed``: truncated normal, std 0.02; the patch
        embedding keeps PyTorch's default; PEG conv: normal with std ``sqrt(2 / fan_out)``
        (``fan_out = kh * kw * out_channels / groups``), bias 0.
        """
        for t in (self.cls_token, self.dist_token, self.pos_embed):
            if t is not None:
                nn.init.trunc_normal_(t, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for peg in self.pos_block.values():
            conv = peg.proj
            fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay: tokens, ``pos_embed`` and every PEG."""
        names = {n for n in ("cls_token", "dist_token", "pos_embed")
                 if getattr(self, n) is not None}
        names |= {f"pos_block.{n}" for n, _ in self.pos_block.named_parameters()}
        return names

    def set_distilled_training(self, enable: bool = True) -> None:
        """With a distillation token, make training-mode ``forward`` return ``(cls, dist)``."""
        self.distilled_training = enable

    def _pos_embed(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        P = self.num_prefix_tokens
        pe = self.pos_embed
        if tuple(size) != self.pos_embed_size:
            gh, gw = self.pos_embed_size
            grid = pe[:, P:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            if grid.dtype in (torch.float16, torch.bfloat16):
                grid = grid.float()
            grid = F.interpolate(grid, size=tuple(size), mode="bicubic", align_corners=False,
                                 antialias=True).to(pe.dtype)
            pe = torch.cat([pe[:, :P], grid.flatten(2).transpose(1, 2)], dim=1)
        return x + pe

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_chans, H, W)`` to normed tokens ``(B, P + (H/ph)*(W/pw), embed_dim)``."""
        x, size = self.patch_embed(images)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token)
                  if t is not None]
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        if self.pos_embed is not None:
            x = self._pos_embed(x, size)
        x = self.pos_drop(x)
        pegs = self.pos_block
        if "-1" in pegs:
            x = pegs["-1"](x, size)
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            key = str(i)
            if key in pegs:
                x = pegs[key](x, size)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Tokens from ``forward_features`` to logits ``(B, num_classes)`` (see the class doc)."""
        if self.global_pool == "avg":
            feat = x[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            feat = x[:, 0]
        feat = self.head_drop(feat)
        if self.head_dist is None:
            return feat if pre_logits else self.head(feat)
        # As DeiT (timm's VisionTransformerDistilled): the distillation token gets the same
        # dropout, and the features before the heads are the average of the two.
        dist = self.head_drop(x[:, self.num_prefix_tokens - 1])
        if pre_logits:
            return (feat + dist) / 2
        out, out_dist = self.head(feat), self.head_dist(dist)
        if self.distilled_training and self.training:
            return out, out_dist
        return (out + out_dist) / 2

    def forward(self, images: torch.Tensor):
        return self.forward_head(self.forward_features(images))


_CONFIGS = {
    "tiny": dict(embed_dim=192, num_heads=3),
    "small": dict(embed_dim=384, num_heads=6),
    "base": dict(embed_dim=768, num_heads=12),
}


def _build(name: str, options: dict) -> CPVT:
    cfg = dict(patch_size=16, depth=12, mlp_ratio=4.0, **_CONFIGS[name])
    cfg.update(options)
    return CPVT(**cfg)


def cpvt_tiny(**options) -> CPVT:
    """CPVT-Ti: DeiT-Ti's transformer (patch 16, depth 12, dim 192, 3 heads, MLP ratio 4).

    About 5.7M parameters. ``options`` are :class:`CPVT`'s keyword arguments, e.g.
    ``global_pool="avg"`` (CPVT-Ti-GAP), ``peg_positions=range(6)``, ``peg_impl="fused"``.

    Example:
        >>> m = cpvt_tiny(num_classes=10, global_pool="avg")
        >>> m(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 10])
    """
    return _build("tiny", options)


def cpvt_small(**options) -> CPVT:
    """CPVT-S: DeiT-S's transformer (patch 16, depth 12, dim 384, 6 heads); about 22M parameters.

    Example:
        >>> cpvt_small(peg_impl="fused").embed_dim
        384
    """
    return _build("small", options)


def cpvt_base(**options) -> CPVT:
    """CPVT-B: DeiT-B's transformer (patch 16, depth 12, dim 768, 12 heads); about 86M parameters.

    Example:
        >>> cpvt_base(num_classes=100).head.out_features
        100
    """
    return _build("base", options)
