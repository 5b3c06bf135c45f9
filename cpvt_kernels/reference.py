"""The eager definition of CPVT's PEG (README, "Using it"); tests and benchmarks import it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks


def peg_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  H: int, W: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """PEG in eager PyTorch: split, view as a grid, depthwise conv with zero padding, add, concat.

    The arguments are checked as ``fused_peg`` checks them (under autocast the weight and bias
    may differ from ``x`` in dtype, as for a convolution).

    Args:
        x: ``(B, P + H*W, C)`` tokens; the first ``P = num_prefix_tokens`` pass through.
        weight: ``(C, 1, kh, kw)`` depthwise kernel, ``kh`` and ``kw`` odd.
        bias: ``(C,)`` or ``None``.
    Returns:
        ``(B, P + H*W, C)``: ``out[:, :P] = x[:, :P]``, ``out[:, P:] = conv(grid) + grid``.

    Example:
        >>> x = torch.randn(2, 1 + 14 * 14, 64)
        >>> w = torch.randn(64, 1, 3, 3)
        >>> peg_reference(x, w, None, 14, 14).shape
        torch.Size([2, 197, 64])
    """
    H = _checks.as_int(H, "peg_reference: H")
    W = _checks.as_int(W, "peg_reference: W")
    num_prefix_tokens = _checks.as_int(num_prefix_tokens, "peg_reference: num_prefix_tokens")
    _checks.check_inputs(x, weight, bias, H, W, num_prefix_tokens,
                         same_dtype=not _checks.autocast_enabled(x))
    return peg_unchecked(x, weight, bias, H, W, num_prefix_tokens)


def peg_unchecked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  H: int, W: int, num_prefix_tokens: int) -> torch.Tensor:
    """:func:`peg_reference` for arguments already checked (the PEG module, the reference
    backend)."""
    B, N, C = x.shape
    if C == 0:
        # conv2d takes no groups=0; with no channels the output is x's empty shape, as from the
        # fused backends, with the weight and the bias kept in the autograd graph.
        zero = weight.sum() * 0
        return x + (zero if bias is None else zero + bias.sum() * 0)
    P = num_prefix_tokens
    prefix, tokens = x[:, :P], x[:, P:]
    grid = tokens.transpose(1, 2).reshape(B, C, H, W)
    kh, kw = weight.shape[-2:]
    y = F.conv2d(grid, weight, bias, stride=1, padding=(kh // 2, kw // 2), groups=C) + grid
    y = y.flatten(2).transpose(1, 2)
    return torch.cat([prefix, y], dim=1)
