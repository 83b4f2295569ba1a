"""``tucker2_conv2d``: the Tucker-2 layer's functional op, and its ``torch.library`` registration.

The same chain as :mod:`cpkernels.ops.cp_conv2d`: :func:`tucker2_conv2d` (argument checks in PyTorch's
wording, padding modes, autocast, unbatched input) -> ``torch.ops.cpkernels.tucker2_conv2d`` (custom op:
fake impl, autograd; what ``torch.compile`` and ``torch.export`` record) -> one implementation:
``"reference"``, the three convs (:mod:`cpkernels.ops.tucker2_reference`); ``"cpu"``, the same stages
arranged for CPU libraries; ``"dense"``, one conv of the reconstructed weight; ``"triton"``, the taps
kernel on per-tap weights folded from the input factor and the core
(:func:`cpkernels.kernels.cp_conv2d_fused.taps_conv2d_fused`). On CUDA, ``backend="auto"`` follows
the GPU plan (:data:`cpkernels.plans.gpu.TUCKER2_STRATEGIES`); on the CPU it takes the CPU path.
While ``torch.onnx.export`` runs the layer is written as three standard Convs. The backward is the
reference maths whichever implementation ran forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..factors import Tucker2Factors
from . import conv_args
from .cp_conv2d import (_autocast, batched_and_padded, check_call, exporting_to_onnx, refuse_onnx_export,
                        resolve_backend)
from .onnx_form import tucker2_conv2d_onnx_form
from .tucker2_reference import (tucker2_conv2d_cpu, tucker2_conv2d_dense_weight, tucker2_conv2d_reference,
                                tucker2_conv2d_reference_backward)

IMPLEMENTATIONS = ("reference", "cpu", "dense", "triton")
_IMPLS = {"reference": tucker2_conv2d_reference, "cpu": tucker2_conv2d_cpu, "dense": tucker2_conv2d_dense_weight}
# The GPU plan's Tucker-2 strategies (cpkernels.plans.gpu.TUCKER2_STRATEGIES) and what each one runs.
STRATEGY_IMPLS = {"dense": "dense", "three-stage": "reference", "fused-taps": "triton"}


def _fused(x, input_factor, core, output_factor, bias, stride, padding, dilation) -> Tensor:
    from ..kernels.cp_conv2d_fused import taps_conv2d_fused

    # [G, kh*kw, Cin/G, R_out] in x's dtype: the kernel's tl.dot takes both operands in one dtype.
    taps = Tucker2Factors(output_factor, core, input_factor).tap_weights().to(x.dtype)
    return taps_conv2d_fused(x, taps, output_factor.to(x.dtype), bias, tuple(core.shape[3:]), stride, padding,
                             dilation)


@torch.library.custom_op("cpkernels::tucker2_conv2d", mutates_args=())
def _tucker2_conv2d_op(
    x: Tensor,
    input_factor: Tensor,
    core: Tensor,
    output_factor: Tensor,
    bias: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    impl: str,
) -> Tensor:
    """Tucker-2 conv of a 4-D ``x``; ``padding`` is ``(top, bottom, left, right)`` zero padding."""
    refuse_onnx_export("tucker2_conv2d")
    args = (x, input_factor, core, output_factor, bias, stride, padding, dilation)
    if impl == "triton":
        return _fused(*args)
    if impl in _IMPLS:
        return _IMPLS[impl](*args)
    raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")


@_tucker2_conv2d_op.register_fake
def _(x, input_factor, core, output_factor, bias, stride, padding, dilation, impl):
    refuse_onnx_export("tucker2_conv2d")
    oh, ow = conv_args.output_size(tuple(x.shape[2:]), tuple(core.shape[3:]), stride, padding, dilation)
    cout = output_factor.shape[0] * output_factor.shape[1]
    return x.new_empty((x.shape[0], cout, oh, ow)).contiguous(memory_format=conv_args.memory_format_of(x))


def _setup_context(ctx, inputs, output):
    x, f_in, core, f_out, bias, stride, padding, dilation, _ = inputs
    ctx.save_for_backward(x, f_in, core, f_out)
    ctx.has_bias = bias is not None
    ctx.conv = (stride, padding, dilation)


def _backward(ctx, grad_y):
    x, f_in, core, f_out = ctx.saved_tensors
    grads = tucker2_conv2d_reference_backward(
        grad_y.contiguous(memory_format=conv_args.memory_format_of(x)), x, f_in, core, f_out, ctx.has_bias,
        *ctx.conv, ctx.needs_input_grad[:5],
    )
    return (*grads, None, None, None, None)


_tucker2_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


class _FusedTucker2Conv2d(torch.autograd.Function):
    """Eager calls of the fused kernel without the custom op's dispatch cost (see ``_FusedCPConv2d``)."""

    @staticmethod
    def forward(ctx, x, input_factor, core, output_factor, bias, stride, padding, dilation):
        y = _fused(x, input_factor, core, output_factor, bias, stride, padding, dilation)
        _setup_context(ctx, (x, input_factor, core, output_factor, bias, stride, padding, dilation, "triton"), y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _backward(ctx, grad_y)[:5] + (None, None, None)


def _planned_impl(tensors, stride, pad, dilation, measure: bool) -> str:
    """The implementation the GPU plan picks for this call (cached per call signature)."""
    from ..plans import gpu

    x, f_in, core, f_out, _ = tensors

    def run(strategy: str) -> Tensor:
        with torch.no_grad():
            return _tucker2_conv2d_op(*tensors, list(stride), list(pad), list(dilation), STRATEGY_IMPLS[strategy])

    chosen = gpu.choose(x, (core.shape[1], core.shape[2]), core.shape[0], f_out.shape[0] * f_out.shape[1],
                        tuple(core.shape[3:]), stride, pad, dilation, run=run if measure else None)
    return STRATEGY_IMPLS[chosen.chosen]


def tucker2_conv2d(
    x: Tensor,
    factors: Tucker2Factors,
    bias: Optional[Tensor] = None,
    stride: conv_args.IntPair = 1,
    padding: conv_args.Padding = 0,
    dilation: conv_args.IntPair = 1,
    padding_mode: str = "zeros",
    backend: str = "auto",
) -> Tensor:
    """2-D convolution with a Tucker-2 weight; the same semantics as ``F.conv2d`` with ``factors.to_dense()``.

    Arguments as :func:`cpkernels.cp_conv2d`, with :class:`cpkernels.Tucker2Factors`. ``backend``:
    ``"auto"`` (the GPU plan on CUDA, the CPU path on the CPU), ``"reference"`` (the three convs) or
    ``"triton"`` (the fused taps kernel, forced).
    """
    stride_, dilation_, pad = check_call(x, factors, bias, stride, padding, dilation, padding_mode)
    impl = resolve_backend(backend, x)
    if exporting_to_onnx():
        return tucker2_conv2d_onnx_form(x, factors, bias, stride_, padding, dilation_, padding_mode)
    unbatched = x.dim() == 3
    x, pad = batched_and_padded(x, pad, padding_mode)
    tensors = [x, factors.input, factors.core, factors.output, bias]
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        tensors = _autocast(tensors, device_type)
    compiling = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if impl == "gpu-plan":
        impl = _planned_impl(tensors, stride_, pad, dilation_, measure=not compiling)
    if compiling:
        y = _tucker2_conv2d_op(*tensors, list(stride_), list(pad), list(dilation_), impl)
    elif impl == "triton":
        y = _FusedTucker2Conv2d.apply(*tensors, stride_, pad, dilation_)
    else:
        y = _IMPLS[impl](*tensors, stride_, pad, dilation_)
    return y.squeeze(0) if unbatched else y
