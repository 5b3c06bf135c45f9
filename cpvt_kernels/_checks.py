"""Input checks of the fused PEG, run for every backend before dispatch.

The C++ ops repeat the checks that guard memory (csrc/peg.cpp) for callers that reach them
through ``torch.ops.cpvt`` directly; the messages are the same.
"""
from __future__ import annotations

import operator

import torch

from ._autograd import FORWARD_AD_ERROR

MAX_KERNEL_SIZE = 31
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def parse_size(size, num_tokens: int | None = None, num_prefix_tokens: int = 0) -> tuple[int, int]:
    """``size`` as ``(H, W)``: a pair, an int (a numpy integer or an integer 0-d tensor too) for
    a square grid, or ``None`` for a square grid inferred from the tokens."""
    if size is None:
        if num_tokens is None:
            raise ValueError("fused_peg: size must be given as (H, W), got None")
        n = num_tokens - num_prefix_tokens
        side = int(round(max(n, 0) ** 0.5))
        if n < 1 or side * side != n:
            raise ValueError(
                f"fused_peg: size=None needs a square grid, but x has {num_tokens} tokens and "
                f"num_prefix_tokens={num_prefix_tokens}, leaving {n}; pass size=(H, W)")
        return side, side
    if isinstance(size, (int, torch.SymInt)) and not isinstance(size, bool):
        return size, size
    try:
        H, W = size
    except (TypeError, ValueError):
        try:
            side = as_int(size, "fused_peg: size")
        except TypeError:
            raise TypeError(f"fused_peg: size must be a pair (H, W) or an int, got "
                            f"{type_name(size)} {size!r}") from None
        return side, side
    return _size_int("H", H), _size_int("W", W)


def _size_int(name: str, v):
    """An int (or SymInt) of the size: see :func:`as_int`."""
    return as_int(v, f"fused_peg: size {name}")


def as_int(v, what: str):
    """``v`` as an int: an int or SymInt, or a numpy integer or integer 0-d tensor (which the
    eager PEG also takes); a TypeError saying ``what`` must be an int for a bool (bool arrays
    too), a float or a string."""
    if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
        return v
    if not isinstance(v, (bool, float, str)) and "bool" not in str(getattr(v, "dtype", "")):
        try:
            return operator.index(v)
        except TypeError:
            pass
    raise TypeError(f"{what} must be an int, got {type_name(v)}")


def type_name(v) -> str:
    """``v``'s type for an error message, with its dtype where it has one."""
    return type(v).__name__ + (f" of {v.dtype}" if hasattr(v, "dtype") else "")


def autocast_enabled(x) -> bool:
    """Whether autocast is on for x's device type (False for a non-tensor, or a device type
    autocast does not know, such as "meta")."""
    if not isinstance(x, torch.Tensor):
        return False
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:
        return False


def check_no_forward_ad(*tensors) -> None:
    """Forward-mode AD has no formula in the fused backends: raise rather than return an output
    without a tangent (as if the derivative were zero)."""
    from torch.autograd.forward_ad import unpack_dual
    if any(t is not None and unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(FORWARD_AD_ERROR)


def check_argument_types(x, weight, bias, num_prefix_tokens) -> None:
    """The Python types of the arguments (what the C++ ops' own checks cannot see)."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_peg: {name} must be a torch.Tensor, got {type(t).__name__}")
        check_dense(name, t)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError("fused_peg: bias must be a torch.Tensor or None, "
                            f"got {type(bias).__name__}")
        check_dense("bias", bias)
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise TypeError("fused_peg: num_prefix_tokens must be an int, "
                        f"got {type(num_prefix_tokens).__name__}")


def check_dense(name: str, t: torch.Tensor) -> None:
    """``t`` is a dense tensor with strides: not sparse, MKL-DNN, quantized or nested (where the
    ops have no kernel, and the dispatcher's error names neither the argument nor the remedy)."""
    if t.is_nested:
        got, fix = "a nested tensor", "pad it (torch.nested.to_padded_tensor) or run each one"
    elif t.is_quantized:
        got, fix = "a quantized tensor", "dequantize it (.dequantize())"
    elif t.layout != torch.strided:
        got, fix = f"layout {t.layout}", "convert it (.to_dense())"
    else:
        return
    raise TypeError(f"fused_peg: {name} must be a dense (strided) tensor, got {got}: {fix}")


def check_inputs(x, weight, bias, H, W, num_prefix_tokens, same_dtype: bool = True) -> None:
    """Raise ValueError/TypeError/RuntimeError naming the bad argument; return None if valid.

    ``same_dtype=False`` lets weight and bias differ from x in dtype (the eager PEG under
    autocast, whose convolution casts them).
    """
    check_argument_types(x, weight, bias, num_prefix_tokens)
    if H < 1:
        raise ValueError(f"fused_peg: size H must be >= 1, got {H}")
    if W < 1:
        raise ValueError(f"fused_peg: size W must be >= 1, got {W}")
    if num_prefix_tokens < 0:
        raise ValueError(f"fused_peg: num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    if x.dim() != 3:
        raise ValueError("fused_peg: x must be 3-D (B, num_prefix_tokens + H*W, C), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError("fused_peg: x must be float32, float64, float16 or bfloat16, "
                        f"got {x.dtype}")
    if x.shape[1] != num_prefix_tokens + H * W:
        raise ValueError(
            f"fused_peg: x.shape[1] must equal num_prefix_tokens + H*W = "
            f"{num_prefix_tokens} + {H}*{W} = {num_prefix_tokens + H * W}, got {x.shape[1]}")
    C = x.shape[2]
    if weight.dim() != 4 or weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(f"fused_peg: weight must have shape (C, 1, kh, kw) with C = {C} "
                         f"(depthwise), got {tuple(weight.shape)}")
    kh, kw = weight.shape[2], weight.shape[3]
    if not (kh % 2 == 1 and kw % 2 == 1 and 1 <= kh <= MAX_KERNEL_SIZE
            and 1 <= kw <= MAX_KERNEL_SIZE):
        raise ValueError(f"fused_peg: weight kernel size (kh, kw) must be odd and in "
                         f"[1, {MAX_KERNEL_SIZE}], got ({kh}, {kw})")
    _check_like_x("weight", weight, x, same_dtype)
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != C:
            raise ValueError(f"fused_peg: bias must have shape (C,) with C = {C}, "
                             f"got {tuple(bias.shape)}")
        _check_like_x("bias", bias, x, same_dtype)


def _check_like_x(name: str, t: torch.Tensor, x: torch.Tensor, same_dtype: bool) -> None:
    """``t`` (the weight or the bias) has x's dtype (when ``same_dtype``) and x's device."""
    if same_dtype and t.dtype != x.dtype:
        raise TypeError(f"fused_peg: {name} dtype must match x ({x.dtype}), got {t.dtype}")
    if t.device != x.device:
        raise RuntimeError(f"fused_peg: {name} must be on the device of x ({x.device}), "
                           f"got {t.device}")


def check_backward_inputs(grad_out, x, weight, H, W, num_prefix_tokens) -> None:
    """The checks of ``check_inputs`` plus ``grad_out`` matching ``x``."""
    check_inputs(x, weight, None, H, W, num_prefix_tokens)
    if grad_out.shape != x.shape:
        raise ValueError(f"fused_peg: grad_out must have the shape of x ({tuple(x.shape)}), "
                         f"got {tuple(grad_out.shape)}")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"fused_peg: grad_out dtype must match x ({x.dtype}), got {grad_out.dtype}")
    if grad_out.device != x.device:
        raise RuntimeError(f"fused_peg: grad_out must be on the device of x ({x.device}), "
                           f"got {grad_out.device}")
