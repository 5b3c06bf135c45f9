"""PEG modules: the eager reference ``PEG`` and the drop-in ``FusedPEG``."""
from __future__ import annotations

import torch
from torch import nn

from . import _checks
from .ops import BACKENDS, fused_peg_hw
from .reference import peg_unchecked


def _int_arg(name: str, v, low: int | None = None) -> int:
    """``v`` as an int (:func:`_checks.as_int`), >= ``low`` if given."""
    v = _checks.as_int(v, f"PEG: {name}")
    if low is not None and v < low:
        raise ValueError(f"PEG: {name} must be >= {low}, got {v}")
    return v


def _kernel_pair(kernel_size) -> tuple[int, int]:
    try:
        pair = (_int_arg("kernel_size", kernel_size),) * 2
    except TypeError:
        try:  # a pair: tuple, list, torch.Size, a 1-D array or tensor of two
            pair = () if isinstance(kernel_size, str) else tuple(kernel_size)
        except TypeError:
            pair = ()
        if len(pair) != 2:
            raise TypeError("PEG: kernel_size must be an int or a pair (kh, kw), "
                            f"got {_checks.type_name(kernel_size)} {kernel_size!r}") from None
        pair = tuple(_int_arg("kernel_size", k) for k in pair)
    for k in pair:
        if not (k % 2 == 1 and 1 <= k <= _checks.MAX_KERNEL_SIZE):
            raise ValueError(f"PEG: kernel_size must be odd and in [1, {_checks.MAX_KERNEL_SIZE}], "
                             f"got {kernel_size!r}")
    return pair


def _hw(x, H, W):
    """Accept forward(x, H, W) (paper, Twins) and forward(x, (H, W)) (timm)."""
    if W is None:
        if isinstance(H, (tuple, list, torch.Size)):
            return _checks.parse_size(tuple(H))
        raise TypeError("PEG.forward: call as forward(x, H, W) or forward(x, (H, W)), "
                        f"got H={H!r} and no W")
    if type(H) is int and type(W) is int:
        return H, W
    return _checks.parse_size((H, W))


_MISSING = object()


def _has_forward_hooks(m: nn.Module) -> bool:
    return bool(m._forward_pre_hooks or m._forward_hooks)


def _peg_calling_proj(x: torch.Tensor, proj: nn.Module, H: int, W: int, P: int) -> torch.Tensor:
    """The PEG with its convolution run by calling ``proj`` (the paper's ``self.proj(feat) +
    feat``), so that hooks on it run: the legacy ``weight_norm`` and ``spectral_norm`` compute the
    weight in a forward pre-hook, which reading ``proj.weight`` would skip."""
    B, N, C = x.shape
    grid = x[:, P:].transpose(1, 2).reshape(B, C, H, W)
    y = (proj(grid) + grid).flatten(2).transpose(1, 2)
    return torch.cat([x[:, :P], y], dim=1)


def _conv_parameters(proj: nn.Module):
    """``(proj.weight, proj.bias)``, read from the module's parameter dict where they are there.

    ``Module.__getattr__`` is a Python call per attribute; on a CPU the three of ``proj.weight``
    and ``proj.bias`` on each forward are a few percent of the CPVT-Ti op. Where a parameter is
    not in the dict (a parametrization, ``weight_norm``'s computed attribute) the attribute is
    read the usual way.
    """
    params = proj._parameters
    weight = params.get("weight")
    if weight is None:
        weight = proj.weight
    bias = params.get("bias", _MISSING)
    if bias is _MISSING:
        bias = proj.bias
    return weight, bias


class PEG(nn.Module):
    """CPVT's Positional Encoding Generator in eager PyTorch (the reference).

    ``forward(x, H, W)`` or ``forward(x, (H, W))`` with ``x`` of shape ``(B, P + H*W, dim)``;
    returns the same shape: prefix tokens pass through, the grid gets ``proj(grid) + grid``.
    ``proj`` is ``nn.Conv2d(dim, dim, kernel_size, padding=kernel_size//2, groups=dim)``, as in
    the paper's PEG (its Algorithm 1), so checkpoints of that module load unchanged. Where
    ``proj`` has forward hooks (the legacy ``weight_norm`` or ``spectral_norm``), it is called,
    so that they run. The authors' ``PosCNN`` (CPVT and Twins code) keeps its convolution as ``proj.0``:
    :func:`cpvt_kernels.replace_peg` swaps such modules in place, keeping their names.

    Example:
        >>> peg = PEG(192)
        >>> peg(torch.randn(2, 1 + 14 * 14, 192), 14, 14).shape
        torch.Size([2, 197, 192])
    """

    def __init__(self, dim: int, kernel_size=3, num_prefix_tokens: int = 1, bias: bool = True):
        super().__init__()
        dim = _int_arg("dim", dim, 1)
        kh, kw = _kernel_pair(kernel_size)
        self.num_prefix_tokens = _int_arg("num_prefix_tokens", num_prefix_tokens, 0)
        self.proj = nn.Conv2d(dim, dim, (kh, kw), 1, (kh // 2, kw // 2), bias=bias, groups=dim)

    def forward(self, x: torch.Tensor, H, W=None) -> torch.Tensor:
        H, W = _hw(x, H, W)
        # Under autocast the convolution casts the parameters, so they may differ from x in dtype
        # (bfloat16 tokens with float32 parameters), as with a plain nn.Conv2d.
        # Each parameter read once: a parametrization (spectral_norm's power iteration) runs on
        # every read.
        weight, bias = self.proj.weight, self.proj.bias
        _checks.check_inputs(x, weight, bias, H, W, self.num_prefix_tokens,
                             same_dtype=not _checks.autocast_enabled(x))
        if _has_forward_hooks(self.proj):
            return _peg_calling_proj(x, self.proj, H, W, self.num_prefix_tokens)
        return peg_unchecked(x, weight, bias, H, W, self.num_prefix_tokens)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}"


class FusedPEG(PEG):
    """Drop-in replacement of :class:`PEG` that runs the fused op (``fused_peg``).

    Same parameters and state-dict keys as ``PEG`` (``proj.weight``, ``proj.bias``).
    ``backend`` is any of ``available_backends()`` or ``"auto"``. The fused op reads ``proj``'s
    parameters without calling it: where ``proj`` has forward hooks (the legacy ``weight_norm``
    or ``spectral_norm``, which compute the weight in one), ``PEG``'s eager forward runs instead,
    so that they do (``torch.nn.utils.parametrizations`` need no hooks and keep the fused op).

    Example:
        >>> peg = FusedPEG(192, backend="auto")
        >>> peg(torch.randn(2, 1 + 14 * 14, 192), (14, 14)).shape
        torch.Size([2, 197, 192])
    """

    def __init__(self, dim: int, kernel_size=3, num_prefix_tokens: int = 1, bias: bool = True,
                 backend: str = "auto"):
        super().__init__(dim, kernel_size, num_prefix_tokens, bias)
        if not isinstance(backend, str) or backend.lower() not in ("auto",) + BACKENDS:
            raise ValueError(f"FusedPEG: backend must be one of {('auto',) + BACKENDS}, "
                             f"got {backend!r}")
        self.backend = backend

    def forward(self, x: torch.Tensor, H, W=None) -> torch.Tensor:
        # fused_peg's checks with the fewest Python operations for the usual call (two ints):
        # this layer's cost per call is a few percent of the CPVT-Ti op on a CPU.
        if type(H) is not int or type(W) is not int:
            H, W = _checks.parse_size(_hw(x, H, W))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"fused_peg: x must be a torch.Tensor, got {type(x).__name__}")
        proj = self._modules["proj"]
        if proj._forward_pre_hooks or proj._forward_hooks:
            return PEG.forward(self, x, H, W)
        weight, bias = _conv_parameters(proj)
        return fused_peg_hw(x, weight, bias, H, W, self.num_prefix_tokens, self.backend)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}, backend={self.backend!r}"
