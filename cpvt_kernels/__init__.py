"""cpvt_kernels: fused CPVT Positional Encoding Generator (PEG) kernels for PyTorch.

    import cpvt_kernels as ck
    y = ck.fused_peg(x, weight, bias, size=(H, W), num_prefix_tokens=1)
"""
from .modules import PEG, FusedPEG
from .ops import available_backends, fused_peg
from .reference import peg_reference
from .surgery import replace_peg
from . import models

__version__ = "0.1.0"

__all__ = ["fused_peg", "FusedPEG", "PEG", "available_backends", "peg_reference", "replace_peg",
           "models", "__version__"]
