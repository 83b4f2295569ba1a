"""Ops: the functional CP conv and its backends (reference here, fused Triton in ``cpkernels.kernels``)."""
from .cp_conv2d import cp_conv2d
from .reference import cp_conv2d_reference

__all__ = ["cp_conv2d", "cp_conv2d_reference"]
