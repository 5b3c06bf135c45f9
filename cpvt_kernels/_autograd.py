"""The autograd formula of a fused PEG forward op, registered from Python: for the Triton op,
and for the C++ op of an extension built without its C++ autograd (csrc/autograd.cpp, the same
formula without the Python wrapper's cost per call). Also the ops' FLOP formulas.

The backward is another registered op (``peg_backward`` or ``peg_backward_triton``) called with
an output mask, so each gradient is computed only when required and compiled graphs contain no
opaque Python.
"""
from __future__ import annotations

import torch


def _setup_context(ctx, inputs, output):
    x, weight, bias, H, W, P = inputs
    ctx.save_for_backward(x, weight)
    ctx.size = (H, W, P)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out, backward_op):
    x, weight = ctx.saved_tensors
    H, W, P = ctx.size
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2]]
    if not any(mask):
        return None, None, None, None, None, None
    gx, gw, gb = backward_op(grad_out, x, weight, H, W, P, mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
            None, None, None)


def register(forward_op, backward_op) -> None:
    """``torch.library.register_autograd`` for ``forward_op`` with ``backward_op`` as backward.

    ``backward_op(grad_out, x, weight, H, W, P, output_mask) -> (grad_x, grad_w, grad_b)``.
    """

    def backward(ctx, grad_out):
        return _backward(ctx, grad_out, backward_op)

    torch.library.register_autograd(forward_op, backward, setup_context=_setup_context)


def register_flops(forward_op, backward_op) -> None:
    """FLOP formulas for ``torch.utils.flop_counter.FlopCounterMode``: the forward one
    convolution, the backward one per gradient of x and of the weight."""
    from torch.utils.flop_counter import register_flop_formula

    def conv(x_shape, weight_shape, H, W):  # 2 FLOPs a multiply-add, as it counts nn.Conv2d
        return 2 * x_shape[0] * x_shape[2] * weight_shape[2] * weight_shape[3] * H * W

    @register_flop_formula(forward_op)
    def _forward_flops(x_shape, weight_shape, bias_shape, H, W, P, *args, **kwargs) -> int:
        return conv(x_shape, weight_shape, H, W)

    @register_flop_formula(backward_op)
    def _backward_flops(grad_out_shape, x_shape, weight_shape, H, W, P, output_mask, *args,
                        **kwargs) -> int:
        return conv(x_shape, weight_shape, H, W) * (bool(output_mask[0]) + bool(output_mask[1]))


FORWARD_AD_ERROR = ("fused_peg: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is "
                    "not supported by the fused backends; use backend=\"reference\"")


def functorch_function(forward_op, backward_op) -> type:
    """The same formula as an ``autograd.Function`` that ``torch.func`` transforms take (grad,
    vjp, jacrev, and vmap of them): neither a C++ ``torch::autograd::Function`` (the C++ op's
    autograd) nor the function ``register_autograd`` generates (no ``setup_context``; PyTorch
    issue 170834) runs under them. The forward runs the op below autograd; the backward op has
    no derivative of its own, so a second derivative through it is an error, as with autograd.
    """

    class PegFunction(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x, weight, bias, H, W, P):
            with torch._C._AutoDispatchBelowAutograd():
                return forward_op(x, weight, bias, H, W, P)

        @staticmethod
        def setup_context(ctx, inputs, output):
            _setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, grad_out):
            return _backward(ctx, grad_out, backward_op)

        @staticmethod
        def jvp(ctx, *tangents):
            raise RuntimeError(FORWARD_AD_ERROR)

    return PegFunction
