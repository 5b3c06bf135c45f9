"""Model surgery: make the PEGs of an existing model run the fused op, in place."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import _checks
from .modules import PEG, FusedPEG, _has_forward_hooks, _hw
from .ops import _AUTOCAST_ELIGIBLE, BACKENDS, fused_peg

__all__ = ["replace_peg"]


class _FusedPosConv:
    """Mixed into a copy of timm's ``PosConv`` (or the Twins/CPVT authors' ``PosCNN``) class.

    Only ``forward`` changes; the module keeps its attributes, hooks and parameters
    (``proj.0.weight``, ``proj.0.bias``), so checkpoints load either way. Where ``proj`` or its
    conv has forward hooks, the module's own forward runs, so that they do.
    """

    backend: str
    _autocast_dtype_out = False  # returns the autocast dtype under autocast (timm's PosConv)

    def forward(self, x: torch.Tensor, H, W=None) -> torch.Tensor:
        conv = self.proj[0]
        if _has_forward_hooks(self.proj) or _has_forward_hooks(conv):
            # The fused op reads the conv's parameters without calling it, so hooks on it would
            # not run (the legacy weight_norm and spectral_norm compute the weight in one): the
            # module's own forward, which calls it.
            base = _original_class(type(self))
            return base.forward(self, x, H) if W is None else base.forward(self, x, H, W)
        H, W = _hw(x, H, W)
        if (self._autocast_dtype_out and _checks.autocast_enabled(x)
                and x.dtype in _AUTOCAST_ELIGIBLE):
            # timm's (Twins) PosConv adds the tokens in place into its conv's output, so under
            # autocast it returns the autocast dtype (bfloat16 from float32 tokens), where
            # PosCNN and the eager PEG return the promotion of the two: the fused op then runs
            # in that dtype.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return fused_peg(x, conv.weight, conv.bias, (H, W), 0, self.backend)

    def __reduce_ex__(self, protocol):
        # Pickles name the original class, not the one generated at run time.
        return _new_fused_posconv, (_original_class(type(self)),), self.__dict__.copy()


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(base: type) -> type:
    cls = _FUSED_CLASSES.get(base)
    if cls is None:
        timm_twins = base.__name__ == "PosConv" and base.__module__ == "timm.models.twins"
        cls = type("Fused" + base.__name__, (_FusedPosConv, base),
                   {"__module__": __name__, "_autocast_dtype_out": timm_twins})
        _FUSED_CLASSES[base] = cls
    return cls


def _original_class(cls: type) -> type:
    return next(b for b in cls.__mro__[1:] if b is not _FusedPosConv)


def _new_fused_posconv(base: type):
    return object.__new__(_fused_class(base))


def _posconv_conv(m: nn.Module, name: str) -> nn.Conv2d | None:
    """The depthwise conv of a stride-1 ``PosConv``/``PosCNN`` that computes a PEG, else None."""
    kind = type(m).__name__
    if kind == "PosConv":
        stride = getattr(m, "stride", None)
    elif kind == "PosCNN":
        stride = getattr(m, "s", None)
    else:
        return None
    if stride != 1:  # strided: a downsampling conv without the residual, not a PEG
        return None
    proj = getattr(m, "proj", None)
    conv = proj[0] if isinstance(proj, nn.Sequential) and len(proj) == 1 else None
    if isinstance(conv, nn.Conv2d):
        kh, kw = conv.kernel_size
        C = conv.out_channels
        if (conv.in_channels == C == conv.groups and conv.stride == (1, 1)
                and conv.dilation == (1, 1) and conv.padding == (kh // 2, kw // 2)
                and conv.padding_mode == "zeros" and kh % 2 == 1 and kw % 2 == 1
                and kh <= 31 and kw <= 31):
            return conv
    warnings.warn(f"replace_peg: left {name!r} ({kind}) unchanged: expected proj = Sequential("
                  f"Conv2d(C, C, k, stride=1, padding=k//2, groups=C)) with odd k <= 31, "
                  f"got {proj!r}", stacklevel=3)
    return None


def replace_peg(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every PEG in ``model`` run the fused op (``fused_peg``), in place.

    Swapped: this package's :class:`PEG` (becomes :class:`FusedPEG`), timm's ``PosConv`` with
    stride 1 (Twins, PCPVT) and the Twins/CPVT authors' ``PosCNN`` with ``s == 1``; a
    :class:`FusedPEG` or an already swapped module gets the new ``backend``. Each module keeps
    its parameters, their names and its hooks (only its class changes), so state dicts saved
    before the swap load after it and the reverse, and optimizers keep working. timm's modules
    have no prefix tokens (``num_prefix_tokens = 0``).

    Args:
        model: any ``nn.Module``.
        backend: ``"auto"`` or a name from :func:`cpvt_kernels.available_backends`; checked
            against the tensors' device when the model runs.
    Returns:
        ``model`` itself. Warns if it holds no PEG.

    Example:
        >>> import timm, cpvt_kernels as ck
        >>> model = timm.create_model("twins_pcpvt_small", pretrained=False)
        >>> model = ck.replace_peg(model, backend="auto")
        >>> type(model.pos_block[0]).__name__
        'FusedPosConv'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_peg: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(backend, str) or backend.lower() not in ("auto",) + BACKENDS:
        raise ValueError(f"replace_peg: backend must be one of {('auto',) + BACKENDS}, "
                         f"got {backend!r}")
    found = 0
    for name, m in model.named_modules():
        if isinstance(m, (FusedPEG, _FusedPosConv)):
            pass
        elif type(m) is PEG:
            m.__class__ = FusedPEG
        elif _posconv_conv(m, name) is not None:
            m.__class__ = _fused_class(type(m))
        else:
            continue
        m.backend = backend
        found += 1
    if not found:
        warnings.warn(f"replace_peg: found no PEG module in {type(model).__name__} "
                      "(looked for cpvt_kernels.PEG, timm's PosConv and PosCNN with stride 1)",
                      stacklevel=2)
    return model
