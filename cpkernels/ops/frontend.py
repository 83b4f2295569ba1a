"""The front end every factored conv op shares: ``F.conv2d``'s checks in its own wording, the backend, the ONNX
branch, padding modes, unbatched input, autocast, and the dispatch to the custom op (under graph capture), the
fused kernel's ``autograd.Function`` (eager) or the eager PyTorch paths. Each family's op module
(:mod:`cpkernels.ops.cp_conv2d`, :mod:`cpkernels.ops.tucker2_conv2d`) describes itself as a :class:`FactoredOp`
and calls :func:`factored_conv2d`; the backward of both custom ops is :func:`register_reference_autograd`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from cpkernels.core import conv_args
from cpkernels.core.switches import triton_available, triton_interpreter_enabled
from cpkernels.dispatch import gpu

BACKENDS = ("auto", "reference", "triton")


@dataclass(frozen=True)
class FactoredOp:
    """One family's op, as the front end runs it. Every implementation takes ``(x, *factor tensors, bias,
    stride, padding, dilation)`` with ``padding`` as ``(top, bottom, left, right)`` zeros."""

    name: str  # the custom op's name in the ``cpkernels`` namespace
    factor_tensors: Callable  # factors -> the factor tensors, in the op's argument order
    plan_shape: Callable  # the op's tensors -> (rank, groups, Cout, kernel size), as the GPU plan takes them
    custom_op: Callable  # the torch.library op: (*tensors, stride, padding, dilation, impl)
    fused: type  # the fused kernel's autograd.Function for eager calls: (*tensors, stride, padding, dilation, kernel)
    fused_impls: dict  # implementation name -> the kernel argument of ``fused``
    impls: dict  # implementation name -> eager PyTorch implementation
    strategy_impls: dict  # the GPU plan's strategy -> implementation name
    onnx_form: Callable  # (x, factors, bias, stride, padding, dilation, padding_mode): standard convs
    plan_family: Optional[str] = None  # the GPU plan's family where the rank's type does not tell it (svd)


def exporting_to_onnx() -> bool:
    """While ``torch.onnx.export`` runs (either exporter), factored layers take their standard Conv form."""
    return torch.onnx.is_in_onnx_export()


def refuse_onnx_export(op: str) -> None:
    """No ONNX runtime knows the custom ops: reaching one while exporting is a bug, never a silent node."""
    if torch.onnx.is_in_onnx_export():
        raise RuntimeError(f"cpkernels::{op} reached the ONNX exporter: a factored layer must export as standard "
                           f"Conv nodes ({op} switches to them while exporting), not as a custom op")


# --------------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------------
def resolve_backend(backend: str, x: Tensor) -> str:
    """The implementation that runs for ``x``: ``"triton"``, ``"cpu"``, ``"reference"``, or ``"gpu-plan"``
    (decided per call by :func:`cpkernels.dispatch.gpu.choose`).

    ``"auto"`` follows the GPU plan for CUDA tensors and takes the CPU path (the reference stages
    arranged for CPU libraries) for CPU tensors. float64 never runs the fused kernel: it accumulates
    in fp32, and float64 must not silently lose precision.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        if x.device.type == "cuda":
            return "gpu-plan" if triton_available() else "reference"
        return "cpu" if x.device.type == "cpu" else "reference"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if x.device.type != "cuda" and not triton_interpreter_enabled():
        raise RuntimeError(
            f"backend='triton' runs on CUDA tensors; got a {x.device.type} tensor. On the CPU the kernel "
            "runs only under the Triton interpreter: set TRITON_INTERPRET=1 before the first call"
        )
    return "reference" if x.dtype == torch.float64 else "triton"


# --------------------------------------------------------------------------------------------------
# Checks of one call
# --------------------------------------------------------------------------------------------------
def _check_input(x: Tensor, factors, bias: Optional[Tensor], op: str) -> None:
    """``F.conv2d``'s checks, in its wording, before any work is done."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}(): input must be a Tensor, not {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise RuntimeError(
            f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: {list(x.shape)}"
        )
    if not x.is_floating_point():
        raise RuntimeError(f"{op} expects a floating point input, got {x.dtype}")
    channels = x.shape[-3]
    if channels != factors.in_channels:
        shape = list(x.shape) if x.dim() == 4 else [1, *x.shape]
        raise RuntimeError(
            f"Given groups={factors.groups}, weight of size {list(factors.weight_shape)}, expected "
            f"input{shape} to have {factors.in_channels} channels, but got {channels} channels instead"
        )
    tensors = (("weight", factors.output),) if bias is None else (("weight", factors.output), ("bias", bias))
    device = x.device
    for name, t in tensors:
        if t.device != device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, "
                f"{device} and {t.device}!"
            )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != factors.out_channels):
        raise RuntimeError(
            f"Given weight of size {list(factors.weight_shape)}, expected bias to be 1-dimensional with "
            f"{factors.out_channels} elements, but got bias of size {list(bias.shape)} instead"
        )
    if not torch.is_autocast_enabled(device.type):
        for name, t in tensors:
            if t.dtype != x.dtype:
                raise RuntimeError(f"Input type ({x.dtype}) and {name} type ({t.dtype}) should be the same")


def check_call(x: Tensor, factors, bias: Optional[Tensor], stride, padding, dilation, padding_mode: str,
               op: str = "cp_conv2d"):
    """``F.conv2d``'s and ``nn.Conv2d``'s checks of one call, before any work; returns the normalised
    ``stride``, ``dilation`` and ``(top, bottom, left, right)`` padding. ``factors``: any family's."""
    # Written with plain indexing and comparisons: this runs on every forward of every layer.
    _check_input(x, factors, bias, op)
    stride_ = conv_args.pair(stride, "stride")
    dilation_ = conv_args.pair(dilation, "dilation")
    if stride_[0] < 1 or stride_[1] < 1:
        raise RuntimeError("non-positive stride is not supported")
    if dilation_[0] < 1 or dilation_[1] < 1:
        raise RuntimeError("dilation should be greater than zero")
    conv_args.check_padding_arg(padding, stride_)
    if padding_mode not in conv_args.PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {conv_args.PADDING_MODES}, got {padding_mode!r}")
    kh, kw = factors.kernel_size
    pad = conv_args.explicit_padding(padding, (kh, kw), dilation_)
    padded_h, padded_w = x.shape[-2] + pad[0] + pad[1], x.shape[-1] + pad[2] + pad[3]
    dilated_h, dilated_w = dilation_[0] * (kh - 1) + 1, dilation_[1] * (kw - 1) + 1
    if padded_h < dilated_h or padded_w < dilated_w:
        raise RuntimeError(
            f"Calculated padded input size per channel: ({padded_h} x {padded_w}). Kernel size: "
            f"({dilated_h} x {dilated_w}). Kernel size can't be greater than actual input size"
        )
    return stride_, dilation_, pad


def batched_and_padded(x: Tensor, pad: tuple[int, int, int, int], padding_mode: str):
    """``x`` as a 4-D batch, with a non-zero padding mode applied (its padding then zero)."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if padding_mode != "zeros" and pad != (0, 0, 0, 0):
        pt, pb, pl, pr = pad
        x = F.pad(x, (pl, pr, pt, pb), mode=padding_mode)
        pad = (0, 0, 0, 0)
    return x, pad


def autocast(tensors: list[Optional[Tensor]], device_type: str) -> list[Optional[Tensor]]:
    """Cast like autocast casts ``conv2d``'s arguments: fp16/bf16/fp32 to the autocast dtype, fp64 left alone."""
    dtype = torch.get_autocast_dtype(device_type)
    return [
        t.to(dtype) if t is not None and t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t
        for t in tensors
    ]


# --------------------------------------------------------------------------------------------------
# The custom ops' shared pieces
# --------------------------------------------------------------------------------------------------
def fake_output(x: Tensor, kernel_size, cout: int, stride, padding, dilation) -> Tensor:
    """The custom ops' output for tracing: its shape, and ``x``'s memory format."""
    oh, ow = conv_args.output_size(tuple(x.shape[2:]), tuple(kernel_size), stride, padding, dilation)
    return x.new_empty((x.shape[0], cout, oh, ow)).contiguous(memory_format=conv_args.memory_format_of(x))


def register_reference_autograd(custom_op, reference_backward: Callable) -> tuple[Callable, Callable]:
    """Give ``custom_op`` the reference maths as its backward (``aten.convolution_backward`` per stage,
    intermediates recomputed); ``reference_backward(grad_y, x, *factor tensors, has_bias, stride, padding,
    dilation, needs_input_grad)``. Returns ``(setup_context, backward)``, which the eager fused
    ``autograd.Function`` reuses."""

    def setup_context(ctx, inputs, output):
        *tensors, bias, stride, padding, dilation, _ = inputs
        ctx.save_for_backward(*tensors)
        ctx.has_bias = bias is not None
        ctx.conv = (stride, padding, dilation)

    def backward(ctx, grad_y):
        saved = ctx.saved_tensors
        grads = reference_backward(grad_y.contiguous(memory_format=conv_args.memory_format_of(saved[0])), *saved,
                                   ctx.has_bias, *ctx.conv, ctx.needs_input_grad[:len(saved) + 1])
        return (*grads, None, None, None, None)

    custom_op.register_autograd(backward, setup_context=setup_context)
    return setup_context, backward


def planned_impl(op: FactoredOp, tensors: list, stride, pad, dilation, measure: bool) -> str:
    """The implementation the GPU plan picks for this call (cached per call signature)."""
    rank, groups, cout, kernel_size = op.plan_shape(tensors)

    def run(strategy: str) -> Tensor:
        with torch.no_grad():
            return op.custom_op(*tensors, list(stride), list(pad), list(dilation), op.strategy_impls[strategy])

    chosen = gpu.choose(tensors[0], rank, groups, cout, kernel_size, stride, pad, dilation,
                        run=run if measure else None, family=op.plan_family)
    return op.strategy_impls[chosen.chosen]


# --------------------------------------------------------------------------------------------------
# One call
# --------------------------------------------------------------------------------------------------
def factored_conv2d(op: FactoredOp, x: Tensor, factors, bias: Optional[Tensor], stride, padding, dilation,
                    padding_mode: str, backend: str) -> Tensor:
    """One call of a family's op: the same semantics as ``F.conv2d`` with ``factors.to_dense()``."""
    stride_, dilation_, pad = check_call(x, factors, bias, stride, padding, dilation, padding_mode, op.name)
    impl = resolve_backend(backend, x)
    if exporting_to_onnx():
        return op.onnx_form(x, factors, bias, stride_, padding, dilation_, padding_mode)
    unbatched = x.dim() == 3
    x, pad = batched_and_padded(x, pad, padding_mode)
    tensors = [x, *op.factor_tensors(factors), bias]
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # A custom op has no autocast rule of its own (the Autocast key falls through): cast here.
        tensors = autocast(tensors, device_type)
    # Graph capture (torch.compile, torch.export, a TorchScript trace) records the custom op, never the
    # eager path's choices for this one call.
    compiling = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if impl == "gpu-plan":
        impl = planned_impl(op, tensors, stride_, pad, dilation_, measure=not compiling)
    if compiling:
        y = op.custom_op(*tensors, list(stride_), list(pad), list(dilation_), impl)
    elif impl in op.fused_impls:
        y = op.fused.apply(*tensors, stride_, pad, dilation_, op.fused_impls[impl])
    else:
        # Eager PyTorch-only paths: plain differentiable torch ops, so autograd needs no recomputation
        # and the custom op's per-call cost is saved (see the fused autograd.Function).
        y = op.impls[impl](*tensors, stride_, pad, dilation_)
    return y.squeeze(0) if unbatched else y
