"""``tucker2_conv2d``: the Tucker-2 layer's functional op, and its ``torch.library`` registration.

The same chain as :mod:`cpkernels.ops.cp_conv2d`: :func:`tucker2_conv2d` (the shared front end of
:mod:`cpkernels.ops.frontend`) -> ``torch.ops.cpkernels.tucker2_conv2d`` (custom op:
fake impl, autograd; what ``torch.compile`` and ``torch.export`` record) -> one implementation:
``"reference"``, the three convs (:mod:`cpkernels.ops.tucker2_reference`); ``"cpu"``, the same stages
arranged for CPU libraries; ``"dense"``, one conv of the reconstructed weight; ``"triton"``, the taps
kernel on per-tap weights folded from the input factor and the core
(:func:`cpkernels.kernels.cp_conv2d_fused.taps_conv2d_fused`). On CUDA, ``backend="auto"`` follows
the GPU plan (:data:`cpkernels.dispatch.gpu.TUCKER2_STRATEGIES`); on the CPU it takes the CPU path.
While ``torch.onnx.export`` runs the layer is written as three standard Convs. The backward is the
reference maths whichever implementation ran forward.
"""
from __future__ import annotations

from operator import itemgetter
from typing import Optional

import torch
from torch import Tensor

from cpkernels.core import conv_args
from cpkernels.factors import Tucker2Factors
from cpkernels.ops.frontend import (FactoredOp, factored_conv2d, fake_output, refuse_onnx_export,
                                    register_reference_autograd)
from cpkernels.ops.onnx_form import tucker2_conv2d_onnx_form
from cpkernels.ops.tucker2_arranged import tucker2_conv2d_arranged, tucker2_conv2d_cpu, tucker2_cpu_plan
from cpkernels.ops.tucker2_reference import (tucker2_conv2d_dense_weight, tucker2_conv2d_reference,
                                             tucker2_conv2d_reference_backward)

FUSED_IMPLS = {"triton": None}  # one kernel: the taps kernel on folded per-tap weights
IMPLS = {"reference": tucker2_conv2d_reference, "cpu": tucker2_conv2d_cpu, "dense": tucker2_conv2d_dense_weight}
IMPLEMENTATIONS = (*IMPLS, *FUSED_IMPLS)
# The GPU plan's Tucker-2 strategies (cpkernels.dispatch.gpu.TUCKER2_STRATEGIES) and what each one runs.
STRATEGY_IMPLS = {"dense": "dense", "three-stage": "reference", "fused-taps": "triton"}


def _fused(x, input_factor, core, output_factor, bias, stride, padding, dilation) -> Tensor:
    # the kernels import triton: loaded on first use
    from cpkernels.kernels.cp_conv2d_fused import taps_conv2d_fused

    # [G, kh*kw, Cin/G, R_out] in x's dtype: the kernel's tl.dot takes both operands in one dtype.
    taps = Tucker2Factors(output_factor, core, input_factor).tap_weights().to(x.dtype)
    return taps_conv2d_fused(x, taps, output_factor.to(x.dtype), bias, tuple(core.shape[3:]), stride, padding,
                             dilation)


@torch.library.custom_op("cpkernels::tucker2_conv2d", mutates_args=())
def _tucker2_conv2d_op(x: Tensor, input_factor: Tensor, core: Tensor, output_factor: Tensor,
                       bias: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                       impl: str) -> Tensor:
    """Tucker-2 conv of a 4-D ``x``; ``padding`` is ``(top, bottom, left, right)`` zero padding."""
    refuse_onnx_export("tucker2_conv2d")
    args = (x, input_factor, core, output_factor, bias, stride, padding, dilation)
    if impl in FUSED_IMPLS:
        return _fused(*args)
    if impl in IMPLS:
        return IMPLS[impl](*args)
    raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")


@_tucker2_conv2d_op.register_fake
def _(x, input_factor, core, output_factor, bias, stride, padding, dilation, impl):
    refuse_onnx_export("tucker2_conv2d")
    return fake_output(x, tuple(core.shape[3:]), output_factor.shape[0] * output_factor.shape[1], stride, padding,
                       dilation)


_setup_context, _backward = register_reference_autograd(_tucker2_conv2d_op, tucker2_conv2d_reference_backward)


class _FusedTucker2Conv2d(torch.autograd.Function):
    """Eager calls of the fused kernel without the custom op's dispatch cost (see ``_FusedCPConv2d``).
    ``kernel`` is always None: Tucker-2 has the taps kernel alone."""

    @staticmethod
    def forward(ctx, x, input_factor, core, output_factor, bias, stride, padding, dilation, kernel):
        y = _fused(x, input_factor, core, output_factor, bias, stride, padding, dilation)
        _setup_context(ctx, (x, input_factor, core, output_factor, bias, stride, padding, dilation, "triton"), y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _backward(ctx, grad_y)[:5] + (None, None, None, None)


def _plan_shape(tensors) -> tuple:
    _, _, core, f_out, _ = tensors
    return (core.shape[1], core.shape[2]), core.shape[0], f_out.shape[0] * f_out.shape[1], tuple(core.shape[3:])


TUCKER2_OP = FactoredOp(
    name="tucker2_conv2d",
    factor_tensors=lambda f: (f.input, f.core, f.output),
    plan_shape=_plan_shape,
    custom_op=_tucker2_conv2d_op,
    fused=_FusedTucker2Conv2d,
    fused_impls=FUSED_IMPLS,
    impls=IMPLS,
    strategy_impls=STRATEGY_IMPLS,
    onnx_form=tucker2_conv2d_onnx_form,
    plan_family="tucker2",
    layer_tensors=itemgetter("input_factor", "core", "output_factor", "bias"),
    cpu_plan=tucker2_cpu_plan,
    cpu_planned=tucker2_conv2d_arranged,
)


def tucker2_conv2d(x: Tensor, factors: Tucker2Factors, bias: Optional[Tensor] = None,
                   stride: conv_args.IntPair = 1, padding: conv_args.Padding = 0, dilation: conv_args.IntPair = 1,
                   padding_mode: str = "zeros", backend: str = "auto") -> Tensor:
    """2-D convolution with a Tucker-2 weight; the same semantics as ``F.conv2d`` with ``factors.to_dense()``.

    Arguments as :func:`cpkernels.cp_conv2d`, with :class:`cpkernels.Tucker2Factors`. ``backend``:
    ``"auto"`` (the GPU plan on CUDA, the CPU path on the CPU), ``"reference"`` (the three convs) or
    ``"triton"`` (the fused taps kernel, forced).
    """
    return factored_conv2d(TUCKER2_OP, x, factors, bias, stride, padding, dilation, padding_mode, backend)
