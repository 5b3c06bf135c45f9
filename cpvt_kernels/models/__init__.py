"""Full models built on the PEG: CPVT-Ti, CPVT-S and CPVT-B (DeiT configurations).

    from cpvt_kernels import models
    model = models.cpvt_tiny(num_classes=1000, global_pool="avg", peg_impl="fused")
"""
from .cpvt import CPVT, cpvt_base, cpvt_small, cpvt_tiny

__all__ = ["CPVT", "cpvt_tiny", "cpvt_small", "cpvt_base"]
