"""The front end every factored conv op shares: ``F.conv2d``'s checks in its own wording, the backend, the ONNX
branch, padding modes, unbatched input, autocast, and the dispatch to the custom op (under graph capture), the
fused kernel's ``autograd.Function`` (eager) or the eager PyTorch paths. A layer's call (:func:`layer_conv2d`)
memoises the checks, the backend and the CPU plan per call signature, so that its own per-call work stays a few
microseconds at batch 1 (``bench/per_call.py``). Each family's op module
(:mod:`cpkernels.ops.cp_conv2d`, :mod:`cpkernels.ops.tucker2_conv2d`) describes itself as a :class:`FactoredOp`
and calls :func:`factored_conv2d`; the backward of both custom ops is :func:`register_reference_autograd`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from cpkernels.core import conv_args
from cpkernels.core.switches import triton_available, triton_interpreter_enabled
from cpkernels.dispatch import cpu, gpu

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
    plan_family: str  # the GPU plan's family: "cp", "tucker2" or "svd"
    layer_tensors: Callable  # a layer's ``_parameters`` -> its factor tensors in the op's order, then the bias
    # The CPU plan, where the "cpu" implementation has one: (*tensors, stride, padding, dilation) -> its Plan, or
    # None where the implementation decides per call (16-bit inputs); and (plan, *tensors, stride, padding,
    # dilation) -> the call computed that way. A layer memoises the plan per call signature (layer_conv2d).
    cpu_plan: Optional[Callable] = None
    cpu_planned: Optional[Callable] = None


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


def planned_impl(op: FactoredOp, tensors: list, stride, pad, dilation, measure: bool) -> tuple[str, bool]:
    """The implementation the GPU plan picks for this call (cached per call signature), and whether the choice
    is settled (:func:`cpkernels.dispatch.gpu.settled`: a layer may keep it)."""
    rank, groups, cout, kernel_size = op.plan_shape(tensors)

    def run(strategy: str) -> Tensor:
        with torch.no_grad():
            return op.custom_op(*tensors, list(stride), list(pad), list(dilation), op.strategy_impls[strategy])

    chosen = gpu.choose(tensors[0], rank, groups, cout, kernel_size, stride, pad, dilation,
                        run=run if measure else None, family=op.plan_family)
    return op.strategy_impls[chosen.chosen], gpu.settled(chosen)


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
        impl, _ = planned_impl(op, tensors, stride_, pad, dilation_, measure=not compiling)
    if compiling:
        y = op.custom_op(*tensors, list(stride_), list(pad), list(dilation_), impl)
    else:
        y = _run_eager(op, impl, tensors, stride_, pad, dilation_)
    return y.squeeze(0) if unbatched else y


def _run_eager(op: FactoredOp, impl: str, tensors: list, stride, pad, dilation) -> Tensor:
    if impl in op.fused_impls:
        return op.fused.apply(*tensors, stride, pad, dilation, op.fused_impls[impl])
    # Eager PyTorch-only paths: plain differentiable torch ops, so autograd needs no recomputation
    # and the custom op's per-call cost is saved (see the fused autograd.Function).
    return op.impls[impl](*tensors, stride, pad, dilation)


# --------------------------------------------------------------------------------------------------
# A layer's call, memoised per call signature
# --------------------------------------------------------------------------------------------------
class _Call:
    """What the checks and choices of one layer's call signature came to: everything :func:`factored_conv2d`
    works out before the implementation runs, the CPU plan's arrangement, and the GPU plan's choice once settled.
    ``tensors`` holds the layer's
    tensors it was worked out for: their ids are in the memo's key, and the references keep the ids from being
    reused while the entry lives."""

    __slots__ = ("tensors", "stride", "dilation", "pad", "mode_pad", "padding_mode", "unbatched", "impl",
                 "cpu_plan", "plan_state", "gpu_impl", "gpu_state")


def _any_autocast_by_device() -> bool:
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


# Whether autocast is on for any device (a layer's memo then stands aside): one call where torch has it.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", _any_autocast_by_device)
# TorchScript's tracing state, read directly: torch.jit.is_tracing is this behind one more Python call.
_is_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)
# A layer keeps this many call signatures; one more clears them (a layer fed ever new shapes stays small).
MEMO_SIZE = 8
# The layer attributes its forward passes to layer_conv2d, which keeps them out of the memo's key: assigning one
# clears the memo (``backend`` is a property that assigns ``_backend``).
CALL_ARGUMENTS = frozenset({"stride", "padding", "dilation", "padding_mode", "_backend"})


def layer_conv2d(op: FactoredOp, memo: dict, x: Tensor, parameters: dict, factors: Callable[[], Any], stride,
                 padding, dilation, padding_mode: str, backend: str) -> Tensor:
    """A factored layer's call: :func:`factored_conv2d` of ``factors()`` and the layer's bias, with its checks and
    choices memoised in ``memo`` (the layer's) per call signature.

    A signature is everything the checks, the backend and the CPU plan read: ``x``'s shape, strides, dtype and
    device; whether the call needs gradients; torch's thread count; the identity of the layer's parameter tensors.
    The layer's conv arguments and backend are read too, but kept out of the key, whose hashing they would slow on
    every call: the layer clears ``memo`` when one of them is assigned (:data:`CALL_ARGUMENTS`), and a call whose
    arguments cannot be hashed (a list, which could change in place) is never memoised. What else they read is
    checked on each call: graph capture, an ONNX
    export and autocast take :func:`factored_conv2d` whole and memoise nothing; so do tensor subclasses (fake
    tensors of an export among them) and parameters moved out of ``parameters`` (a parametrization). A CPU plan
    is kept while :func:`cpkernels.dispatch.cpu.plan_state` is unchanged, a settled GPU plan's choice while
    :func:`cpkernels.dispatch.gpu.plan_state` is. A call that fails its checks memoises
    nothing, so every call of a bad signature raises. The layer clears ``memo`` where its tensors change
    without changing identity (``.to()``, ``load_state_dict``; see :class:`cpkernels.modules.factored.FactoredConv2d`).
    """
    key = None
    # No ONNX export check here: both exporters trace, by TorchScript (is_tracing) or torch.export (compiling, or
    # fake tensors, which are no plain Tensor), and the check costs more than the rest (two imports a call).
    if type(x) is Tensor and not (torch.compiler.is_compiling() or _is_tracing() or _any_autocast()):
        try:
            tensors = op.layer_tensors(parameters)
            needs_grad = False
            if torch.is_grad_enabled():
                # a loop, not any() over a generator: a third of the cost, and this runs on every call
                needs_grad = x.requires_grad
                for t in tensors:
                    if needs_grad:
                        break
                    needs_grad = t is not None and t.requires_grad
            key = (x.shape, x.stride(), x.dtype, x.device, needs_grad, torch.get_num_threads(), *map(id, tensors))
            call = memo.get(key)
            if call is None:
                hash((stride, padding, dilation, padding_mode, backend))  # an unhashable one: never memoised
        except (KeyError, TypeError, RuntimeError):
            # a parameter moved away (a parametrization); an unhashable argument; an input without strides
            # (sparse, nested): the unmemoised path says what it makes of them
            key = None
    if key is None:
        return factored_conv2d(op, x, factors(), parameters.get("bias"), stride, padding, dilation, padding_mode,
                               backend)
    if call is None or (call.cpu_plan is not None and call.plan_state != cpu.plan_state()):
        call = _memoise(op, memo, key, x, factors(), tensors, stride, padding, dilation, padding_mode, backend)
    if call.unbatched:
        x = x.unsqueeze(0)
    if call.mode_pad is not None:
        x = F.pad(x, call.mode_pad, mode=call.padding_mode)
    if call.cpu_plan is not None:
        y = op.cpu_planned(call.cpu_plan, x, *tensors, call.stride, call.pad, call.dilation)
        return y.squeeze(0) if call.unbatched else y
    # backend="triton" on a CPU tensor reads TRITON_INTERPRET, which is read at call time.
    impl = call.impl if backend != "triton" else resolve_backend(backend, x)
    args = [x, *tensors]
    if impl == "gpu-plan":
        # the GPU plan's choice, kept once settled: its key, switches and cache are not worked out again per call
        if call.gpu_state is not None and call.gpu_state == gpu.plan_state():
            impl = call.gpu_impl
        else:
            impl, settled = planned_impl(op, args, call.stride, call.pad, call.dilation, measure=True)
            if settled:
                call.gpu_impl, call.gpu_state = impl, gpu.plan_state()
    y = _run_eager(op, impl, args, call.stride, call.pad, call.dilation)
    return y.squeeze(0) if call.unbatched else y


def _memoise(op: FactoredOp, memo: dict, key: tuple, x: Tensor, factors, tensors: tuple, stride, padding, dilation,
             padding_mode: str, backend: str) -> _Call:
    """Work out a new call signature as :func:`factored_conv2d` does (raising for bad input), and keep it."""
    call = _Call()
    call.stride, call.dilation, pad = check_call(x, factors, tensors[-1], stride, padding, dilation, padding_mode,
                                                 op.name)
    call.impl = resolve_backend(backend, x)
    call.tensors, call.padding_mode, call.unbatched = tensors, padding_mode, x.dim() == 3
    call.mode_pad = None
    if padding_mode != "zeros" and pad != (0, 0, 0, 0):
        pt, pb, pl, pr = pad
        call.mode_pad, pad = (pl, pr, pt, pb), (0, 0, 0, 0)
    call.pad = pad
    call.cpu_plan = call.plan_state = call.gpu_impl = call.gpu_state = None
    if call.impl == "cpu" and op.cpu_plan is not None:
        x4 = x.unsqueeze(0) if call.unbatched else x
        if call.mode_pad is not None:
            x4 = F.pad(x4, call.mode_pad, mode=padding_mode)
        call.cpu_plan = op.cpu_plan(x4, *tensors, call.stride, pad, call.dilation)
        call.plan_state = cpu.plan_state()
    if len(memo) >= MEMO_SIZE:
        memo.clear()
    memo[key] = call
    return call
