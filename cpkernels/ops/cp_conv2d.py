"""``cp_conv2d``: the package's one functional op, and its ``torch.library`` registration.

Chain: :func:`cp_conv2d` (Python API: argument checks, padding modes, autocast, unbatched input)
-> ``torch.ops.cpkernels.cp_conv2d`` (custom op: fake impl, autograd; what ``torch.compile`` and
``torch.export`` see; eager calls take the same forward and backward through an
``autograd.Function``, or plain torch ops for the PyTorch-only paths) -> one implementation:
``"reference"``, the four-stage path (:mod:`cpkernels.ops.reference`); ``"cpu"``, the same stages
arranged for CPU libraries (:mod:`cpkernels.ops.cpu`); ``"dense"``, one conv of the reconstructed
weight; ``"triton"`` (or ``"triton-rows"``/``"-taps"``/``"-wide"`` for one kernel), the fused kernel
(:mod:`cpkernels.kernels.cp_conv2d_fused`). On CUDA tensors ``backend="auto"`` follows the GPU plan
(:mod:`cpkernels.plans.gpu`), which picks among dense, the four stages and the fused kernels.

While ``torch.onnx.export`` runs, :func:`cp_conv2d` writes the layer as standard convs instead
(:mod:`cpkernels.ops.onnx_form`); the custom op refuses to be exported.

Autograd: the backward is the reference maths (:func:`cp_conv2d_reference_backward`) whichever backend
ran forward, so gradients for ``x``, every factor and the bias are exact up to rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..factors import CPFactors
from ..switches import triton_available, triton_interpreter_enabled
from . import conv_args
from .cpu import cp_conv2d_cpu
from .onnx_form import cp_conv2d_onnx_form
from .reference import (cp_conv2d_dense_weight, cp_conv2d_reference, cp_conv2d_reference_backward,
                        cp_conv2d_reference_fp32)

BACKENDS = ("auto", "reference", "triton")
FUSED_IMPLS = {"triton": None, "triton-rows": "rows", "triton-taps": "taps", "triton-wide": "wide"}
IMPLEMENTATIONS = ("reference", "reference-fp32", "cpu", "dense", *FUSED_IMPLS)
_IMPLS = {"reference": cp_conv2d_reference, "reference-fp32": cp_conv2d_reference_fp32, "cpu": cp_conv2d_cpu,
          "dense": cp_conv2d_dense_weight}
# The GPU plan's strategies (cpkernels.plans.gpu.STRATEGIES) and the implementation each one runs.
STRATEGY_IMPLS = {"dense": "dense", "four-stage": "reference-fp32", "fused-rows": "triton-rows",
                  "fused-taps": "triton-taps", "fused-wide": "triton-wide"}


def exporting_to_onnx() -> bool:
    """While ``torch.onnx.export`` runs (either exporter), CP layers take the standard Pad/Conv form."""
    return torch.onnx.is_in_onnx_export()


# --------------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------------
def resolve_backend(backend: str, x: Tensor) -> str:
    """The implementation that runs for ``x``: ``"triton"``, ``"cpu"``, ``"reference"``, or ``"gpu-plan"``
    (decided per call by :func:`cpkernels.plans.gpu.choose`).

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
# The custom op
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("cpkernels::cp_conv2d", mutates_args=())
def _cp_conv2d_op(
    x: Tensor,
    input_factor: Tensor,
    vertical_factor: Tensor,
    horizontal_factor: Tensor,
    output_factor: Tensor,
    bias: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    impl: str,
) -> Tensor:
    """CP conv of a 4-D ``x``; ``padding`` is ``(top, bottom, left, right)`` zero padding."""
    refuse_onnx_export()
    args = (x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride, padding, dilation)
    if impl in FUSED_IMPLS:
        from ..kernels.cp_conv2d_fused import cp_conv2d_fused

        return cp_conv2d_fused(*args, kernel=FUSED_IMPLS[impl])
    if impl in _IMPLS:
        return _IMPLS[impl](*args)
    raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")


def refuse_onnx_export(op: str = "cp_conv2d") -> None:
    """No ONNX runtime knows the custom ops: reaching one while exporting is a bug, never a silent node."""
    if torch.onnx.is_in_onnx_export():
        raise RuntimeError(f"cpkernels::{op} reached the ONNX exporter: a factored layer must export as standard "
                           f"Conv nodes ({op} switches to them while exporting), not as a custom op")


@_cp_conv2d_op.register_fake
def _(x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride, padding, dilation, impl):
    refuse_onnx_export()
    kernel_size = (vertical_factor.shape[1], horizontal_factor.shape[1])
    oh, ow = conv_args.output_size(tuple(x.shape[2:]), kernel_size, stride, padding, dilation)
    cout = output_factor.shape[0] * output_factor.shape[1]
    return x.new_empty((x.shape[0], cout, oh, ow)).contiguous(memory_format=conv_args.memory_format_of(x))


def _setup_context(ctx, inputs, output):
    x, f_in, f_v, f_h, f_out, bias, stride, padding, dilation, _ = inputs
    ctx.save_for_backward(x, f_in, f_v, f_h, f_out)
    ctx.has_bias = bias is not None
    ctx.conv = (stride, padding, dilation)


def _backward(ctx, grad_y):
    x, f_in, f_v, f_h, f_out = ctx.saved_tensors
    grads = cp_conv2d_reference_backward(
        grad_y.contiguous(memory_format=conv_args.memory_format_of(x)),
        x, f_in, f_v, f_h, f_out, ctx.has_bias, *ctx.conv, ctx.needs_input_grad[:6],
    )
    return (*grads, None, None, None, None)


_cp_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


class _FusedCPConv2d(torch.autograd.Function):
    """Eager calls of the fused kernel: the custom op's forward and backward without its dispatch cost.

    Going through the custom op cost about 30 us a call without gradients and 70 us with them
    (measured on a CPU; the kernel launch itself is a few us), enough to make small layers
    launch-bound on a GPU. ``torch.compile`` and ``torch.export`` still see the custom op.
    """

    @staticmethod
    def forward(ctx, x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride, padding,
                dilation, kernel):
        from ..kernels.cp_conv2d_fused import cp_conv2d_fused

        y = cp_conv2d_fused(x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride,
                            padding, dilation, kernel=kernel)
        _setup_context(ctx, (x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride,
                             padding, dilation, "triton"), y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _backward(ctx, grad_y)[:6] + (None, None, None, None)


# --------------------------------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------------------------------
def _check_input(x: Tensor, factors, bias: Optional[Tensor]) -> None:
    """``F.conv2d``'s checks, in its wording, before any work is done."""
    if not isinstance(x, Tensor):
        raise TypeError(f"cp_conv2d(): input must be a Tensor, not {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise RuntimeError(
            f"Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: {list(x.shape)}"
        )
    if not x.is_floating_point():
        raise RuntimeError(f"cp_conv2d expects a floating point input, got {x.dtype}")
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


def _autocast(tensors: list[Optional[Tensor]], device_type: str) -> list[Optional[Tensor]]:
    """Cast like autocast casts ``conv2d``'s arguments: fp16/bf16/fp32 to the autocast dtype, fp64 left alone."""
    dtype = torch.get_autocast_dtype(device_type)
    return [
        t.to(dtype) if t is not None and t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t
        for t in tensors
    ]


def _planned_impl(tensors, stride, pad, dilation, measure: bool) -> str:
    """The implementation the GPU plan picks for this call (cached per call signature)."""
    from ..plans import gpu

    x, f_in, f_v, f_h, f_out, _ = tensors
    groups, _, rank = f_in.shape

    def run(strategy: str) -> Tensor:
        with torch.no_grad():
            return _cp_conv2d_op(*tensors, list(stride), list(pad), list(dilation), STRATEGY_IMPLS[strategy])

    kernel_size = (f_v.shape[1], f_h.shape[1])
    chosen = gpu.choose(x, rank, groups, f_out.shape[0] * f_out.shape[1], kernel_size, stride, pad, dilation,
                        run=run if measure else None)
    return STRATEGY_IMPLS[chosen.chosen]


def check_call(x: Tensor, factors, bias: Optional[Tensor], stride, padding, dilation, padding_mode: str):
    """``F.conv2d``'s and ``nn.Conv2d``'s checks of one call, before any work; returns the normalised
    ``stride``, ``dilation`` and ``(top, bottom, left, right)`` padding. ``factors``: CP or Tucker-2."""
    # Written with plain indexing and comparisons: this runs on every forward of every layer.
    _check_input(x, factors, bias)
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


def cp_conv2d(
    x: Tensor,
    factors: CPFactors,
    bias: Optional[Tensor] = None,
    stride: conv_args.IntPair = 1,
    padding: conv_args.Padding = 0,
    dilation: conv_args.IntPair = 1,
    padding_mode: str = "zeros",
    backend: str = "auto",
) -> Tensor:
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
    stride_, dilation_, pad = check_call(x, factors, bias, stride, padding, dilation, padding_mode)
    impl = resolve_backend(backend, x)
    if exporting_to_onnx():
        return cp_conv2d_onnx_form(x, factors, bias, stride_, padding, dilation_, padding_mode)

    unbatched = x.dim() == 3
    x, pad = batched_and_padded(x, pad, padding_mode)
    tensors = [x, factors.input, factors.vertical, factors.horizontal, factors.output, bias]
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # A custom op has no autocast rule of its own (the Autocast key falls through): cast here.
        tensors = _autocast(tensors, device_type)
    # Graph capture (torch.compile, torch.export, a TorchScript trace) records the custom op, never the
    # eager path's choices for this one call.
    compiling = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if impl == "gpu-plan":
        impl = _planned_impl(tensors, stride_, pad, dilation_, measure=not compiling)
    if compiling:
        y = _cp_conv2d_op(*tensors, list(stride_), list(pad), list(dilation_), impl)
    elif impl in FUSED_IMPLS:
        y = _FusedCPConv2d.apply(*tensors, stride_, pad, dilation_, FUSED_IMPLS[impl])
    else:
        # Eager PyTorch-only paths: plain differentiable torch ops, so autograd needs no recomputation
        # and the custom op's per-call cost is saved (see _FusedCPConv2d).
        y = _IMPLS[impl](*tensors, stride_, pad, dilation_)
    return y.squeeze(0) if unbatched else y
