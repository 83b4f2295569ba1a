"""``cp_conv2d``: the CP family's functional op, and its ``torch.library`` registration.

Chain: :func:`cp_conv2d` (the front end every family shares, :mod:`cpkernels.ops.frontend`: argument checks,
padding modes, autocast, unbatched input)
-> ``torch.ops.cpkernels.cp_conv2d`` (custom op: fake impl, autograd; what ``torch.compile`` and
``torch.export`` see; eager calls take the same forward and backward through an
``autograd.Function``, or plain torch ops for the PyTorch-only paths) -> one implementation:
``"reference"``, the four-stage path (:mod:`cpkernels.ops.reference`); ``"cpu"``, the same stages
arranged for CPU libraries (:mod:`cpkernels.ops.cp_arranged`); ``"dense"``, one conv of the reconstructed
weight; ``"triton"`` (or ``"triton-rows"``/``"-taps"``/``"-wide"`` for one kernel), the fused kernel
(:mod:`cpkernels.kernels.cp_conv2d_fused`). On CUDA tensors ``backend="auto"`` follows the GPU plan
(:mod:`cpkernels.dispatch.gpu`), which picks among dense, the four stages and the fused kernels.

While ``torch.onnx.export`` runs, :func:`cp_conv2d` writes the layer as standard convs instead
(:mod:`cpkernels.ops.onnx_form`); the custom op refuses to be exported.

Autograd: the backward is the reference maths (:func:`cp_conv2d_reference_backward`) whichever backend
ran forward, so gradients for ``x``, every factor and the bias are exact up to rounding.
"""
from __future__ import annotations

from operator import itemgetter
from typing import Optional

import torch
from torch import Tensor

from cpkernels.core import conv_args
from cpkernels.factors import CPFactors
from cpkernels.ops.cp_arranged import cp_conv2d_arranged, cp_conv2d_cpu, cp_cpu_plan
from cpkernels.ops.frontend import (FactoredOp, factored_conv2d, fake_output, refuse_onnx_export,
                                    register_reference_autograd)
from cpkernels.ops.onnx_form import cp_conv2d_onnx_form
from cpkernels.ops.reference import (cp_conv2d_dense_weight, cp_conv2d_reference, cp_conv2d_reference_backward,
                                     cp_conv2d_reference_fp32)

FUSED_IMPLS = {"triton": None, "triton-rows": "rows", "triton-taps": "taps", "triton-wide": "wide"}
IMPLS = {"reference": cp_conv2d_reference, "reference-fp32": cp_conv2d_reference_fp32, "cpu": cp_conv2d_cpu,
         "dense": cp_conv2d_dense_weight}
IMPLEMENTATIONS = (*IMPLS, *FUSED_IMPLS)
# The GPU plan's strategies (cpkernels.dispatch.gpu.STRATEGIES) and the implementation each one runs.
STRATEGY_IMPLS = {"dense": "dense", "four-stage": "reference-fp32", "fused-rows": "triton-rows",
                  "fused-taps": "triton-taps", "fused-wide": "triton-wide"}


def _fused(x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride, padding, dilation,
           kernel) -> Tensor:
    # the kernels import triton: loaded on first use
    from cpkernels.kernels.cp_conv2d_fused import cp_conv2d_fused

    return cp_conv2d_fused(x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride, padding,
                           dilation, kernel=kernel)


# --------------------------------------------------------------------------------------------------
# The custom op
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("cpkernels::cp_conv2d", mutates_args=())
def _cp_conv2d_op(x: Tensor, input_factor: Tensor, vertical_factor: Tensor, horizontal_factor: Tensor,
                  output_factor: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
                  dilation: list[int], impl: str) -> Tensor:
    """CP conv of a 4-D ``x``; ``padding`` is ``(top, bottom, left, right)`` zero padding."""
    refuse_onnx_export("cp_conv2d")
    args = (x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride, padding, dilation)
    if impl in FUSED_IMPLS:
        return _fused(*args, FUSED_IMPLS[impl])
    if impl in IMPLS:
        return IMPLS[impl](*args)
    raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")


@_cp_conv2d_op.register_fake
def _(x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride, padding, dilation, impl):
    refuse_onnx_export("cp_conv2d")
    return fake_output(x, (vertical_factor.shape[1], horizontal_factor.shape[1]),
                       output_factor.shape[0] * output_factor.shape[1], stride, padding, dilation)


_setup_context, _backward = register_reference_autograd(_cp_conv2d_op, cp_conv2d_reference_backward)


class _FusedCPConv2d(torch.autograd.Function):
    """Eager calls of the fused kernel: the custom op's forward and backward without its dispatch cost.
    Going through the custom op cost about 30 us a call without gradients and 70 us with them
    (measured on a CPU; the kernel launch itself is a few us), enough to make small layers
    launch-bound on a GPU. ``torch.compile`` and ``torch.export`` still see the custom op.
    """

    @staticmethod
    def forward(ctx, x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride, padding,
                dilation, kernel):
        y = _fused(x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride, padding,
                   dilation, kernel)
        _setup_context(ctx, (x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride,
                             padding, dilation, "triton"), y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _backward(ctx, grad_y)[:6] + (None, None, None, None)


def _plan_shape(tensors) -> tuple:
    _, f_in, f_v, f_h, f_out, _ = tensors
    return f_in.shape[2], f_in.shape[0], f_out.shape[0] * f_out.shape[1], (f_v.shape[1], f_h.shape[1])


CP_OP = FactoredOp(
    name="cp_conv2d",
    factor_tensors=lambda f: (f.input, f.vertical, f.horizontal, f.output),
    plan_shape=_plan_shape,
    custom_op=_cp_conv2d_op,
    fused=_FusedCPConv2d,
    fused_impls=FUSED_IMPLS,
    impls=IMPLS,
    strategy_impls=STRATEGY_IMPLS,
    onnx_form=cp_conv2d_onnx_form,
    plan_family="cp",
    layer_tensors=itemgetter("input_factor", "vertical_factor", "horizontal_factor", "output_factor", "bias"),
    cpu_plan=cp_cpu_plan,
    cpu_planned=cp_conv2d_arranged,
)


# --------------------------------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------------------------------
def cp_conv2d(x: Tensor, factors: CPFactors, bias: Optional[Tensor] = None, stride: conv_args.IntPair = 1,
              padding: conv_args.Padding = 0, dilation: conv_args.IntPair = 1, padding_mode: str = "zeros",
              backend: str = "auto") -> Tensor:
    """2-D convolution with a CP-factored weight; same semantics as ``F.conv2d`` with ``factors.to_dense()``.

    Args:
        x: ``(N, Cin, H, W)`` or unbatched ``(Cin, H, W)``, any strides (NCHW, channels_last, views).
        factors: the CP factors of the weight (their groups are the conv's groups).
        bias: ``(Cout,)`` or None.
        stride, padding, dilation: as ``nn.Conv2d`` (ints, pairs, ``"same"``, ``"valid"``).
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``, as ``nn.Conv2d``.
        backend: ``"auto"`` (the GPU plan on CUDA, the CPU path on CPU), ``"reference"`` or ``"triton"``
            (the fused kernel, forced).

    Returns:
        ``(N, Cout, OH, OW)`` (or unbatched), in ``x``'s dtype and memory format.
    """
    return factored_conv2d(CP_OP, x, factors, bias, stride, padding, dilation, padding_mode, backend)
