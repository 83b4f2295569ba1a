"""Ops: the functional CP and Tucker-2 convs and their backends (reference here, fused Triton in ``cpkernels.kernels``)."""
from cpkernels.ops.cp_conv2d import cp_conv2d
from cpkernels.ops.reference import cp_conv2d_reference
from cpkernels.ops.tucker2_conv2d import tucker2_conv2d

__all__ = ["cp_conv2d", "cp_conv2d_reference", "tucker2_conv2d"]
