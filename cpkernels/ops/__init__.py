"""Ops: the functional CP, Tucker-2 and low-rank 1x1 convs and their backends (reference here, fused Triton in ``cpkernels.kernels``)."""
from cpkernels.ops.cp_conv2d import cp_conv2d
from cpkernels.ops.reference import cp_conv2d_reference
from cpkernels.ops.svd_conv2d import svd_conv2d
from cpkernels.ops.tucker2_conv2d import tucker2_conv2d

__all__ = ["cp_conv2d", "cp_conv2d_reference", "svd_conv2d", "tucker2_conv2d"]
