"""``svd_conv2d``: the low-rank 1x1 layer's functional op, and its ``torch.library`` registration.

The same chain as :mod:`cpkernels.ops.tucker2_conv2d`: :func:`svd_conv2d` (the shared front end of
:mod:`cpkernels.ops.frontend`) -> ``torch.ops.cpkernels.svd_conv2d`` (custom op: fake impl, autograd; what
``torch.compile`` and ``torch.export`` record) -> one implementation: ``"reference"``, the two 1x1 convs
(:mod:`cpkernels.ops.svd_reference`); ``"cpu"``, the same two GEMMs arranged for the CPU
(:mod:`cpkernels.ops.svd_arranged`); ``"dense"``, one 1x1 conv of the reconstructed weight. There is no fused
kernel: two GEMMs are what a GPU library runs best, so ``backend="triton"`` runs the two convs, and on CUDA
``backend="auto"`` follows the GPU plan's :data:`cpkernels.dispatch.gpu.SVD_STRATEGIES` (two GEMMs or dense).
While ``torch.onnx.export`` runs the layer is written as two standard Convs. The backward is the reference
maths whichever implementation ran forward.
"""
from __future__ import annotations

from operator import itemgetter
from typing import Optional

import torch
from torch import Tensor

from cpkernels.core import conv_args
from cpkernels.factors import SVDFactors
from cpkernels.ops.frontend import (FactoredOp, factored_conv2d, fake_output, refuse_onnx_export,
                                    register_reference_autograd)
from cpkernels.ops.onnx_form import svd_conv2d_onnx_form
from cpkernels.ops.svd_arranged import svd_conv2d_cpu
from cpkernels.ops.svd_reference import svd_conv2d_dense_weight, svd_conv2d_reference, svd_conv2d_reference_backward

# "triton" forces the GPU path, which for two GEMMs is the two convs themselves (no kernel of ours).
IMPLS = {"reference": svd_conv2d_reference, "cpu": svd_conv2d_cpu, "dense": svd_conv2d_dense_weight,
         "triton": svd_conv2d_reference}
# The GPU plan's strategies (cpkernels.dispatch.gpu.SVD_STRATEGIES) and what each one runs.
STRATEGY_IMPLS = {"dense": "dense", "two-stage": "reference"}


@torch.library.custom_op("cpkernels::svd_conv2d", mutates_args=())
def _svd_conv2d_op(x: Tensor, input_factor: Tensor, output_factor: Tensor, bias: Optional[Tensor],
                   stride: list[int], padding: list[int], dilation: list[int], impl: str) -> Tensor:
    """Low-rank 1x1 conv of a 4-D ``x``; ``padding`` is ``(top, bottom, left, right)`` zero padding."""
    refuse_onnx_export("svd_conv2d")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {tuple(IMPLS)}, got {impl!r}")
    return IMPLS[impl](x, input_factor, output_factor, bias, stride, padding, dilation)


@_svd_conv2d_op.register_fake
def _(x, input_factor, output_factor, bias, stride, padding, dilation, impl):
    refuse_onnx_export("svd_conv2d")
    return fake_output(x, (1, 1), output_factor.shape[0] * output_factor.shape[1], stride, padding, dilation)


register_reference_autograd(_svd_conv2d_op, svd_conv2d_reference_backward)


def _plan_shape(tensors) -> tuple:
    _, f_in, f_out, _ = tensors
    return f_in.shape[2], f_in.shape[0], f_out.shape[0] * f_out.shape[1], (1, 1)


SVD_OP = FactoredOp(
    name="svd_conv2d",
    factor_tensors=lambda f: (f.input, f.output),
    plan_shape=_plan_shape,
    custom_op=_svd_conv2d_op,
    fused=None,  # no fused kernel (see the module docstring)
    fused_impls={},
    impls=IMPLS,
    strategy_impls=STRATEGY_IMPLS,
    onnx_form=svd_conv2d_onnx_form,
    plan_family="svd",
    layer_tensors=itemgetter("input_factor", "output_factor", "bias"),
)


def svd_conv2d(x: Tensor, factors: SVDFactors, bias: Optional[Tensor] = None, stride: conv_args.IntPair = 1,
               padding: conv_args.Padding = 0, dilation: conv_args.IntPair = 1, padding_mode: str = "zeros",
               backend: str = "auto") -> Tensor:
    """2-D convolution with a low-rank 1x1 weight; the same semantics as ``F.conv2d`` with ``factors.to_dense()``.

    Arguments as :func:`cpkernels.cp_conv2d`, with :class:`cpkernels.SVDFactors`. ``backend``: ``"auto"`` (the
    GPU plan on CUDA, the two GEMMs of the CPU path on the CPU), ``"reference"`` or ``"triton"`` (the two convs).
    """
    return factored_conv2d(SVD_OP, x, factors, bias, stride, padding, dilation, padding_mode, backend)
