"""The Tucker-2 conv as three PyTorch convs (the reference), their CPU arrangement, and their backward.

    x --1x1 (Cin->R_in, groups G)--> t1 --kh x kw core (R_in->R_out per group, groups G)--> t2
      --1x1 (R_out->Cout, groups G) + bias--> y

The core conv carries the stride, padding and dilation; zero padding of ``t1`` equals zero padding of
``x`` because stage 1 has no bias. Arguments are normalised as in :mod:`cpkernels.ops.reference`:
4-D ``x``, factors ``input (G, Cin/G, R_in)``, ``core (G, R_out, R_in, kh, kw)``, ``output (G, Cout/G,
R_out)``, and ``padding`` as ``(top, bottom, left, right)`` zeros.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from ..factors import Tucker2Factors
from ..plans import cpu as cpu_plan
from .conv_args import output_size
from .cpu import _pointwise_matmul
from .reference import reused_dense_weight, upcast_16bit


def tucker2_stage_weights(input_factor: Tensor, core: Tensor, output_factor: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The three conv weights: ``[G*R_in, Cin/G, 1, 1]``, ``[G*R_out, R_in, kh, kw]``, ``[Cout, R_out, 1, 1]``."""
    g, cin_g, r_in = input_factor.shape
    r_out = core.shape[1]
    w_in = input_factor.transpose(1, 2).reshape(g * r_in, cin_g, 1, 1)
    w_core = core.reshape(g * r_out, r_in, *core.shape[3:])
    w_out = output_factor.reshape(-1, r_out, 1, 1)
    return w_in, w_core, w_out


def _core_padding(padding: Sequence[int]) -> tuple[Optional[tuple[int, int, int, int]], tuple[int, int]]:
    """(explicit F.pad of t1 for uneven padding or None, the conv's symmetric padding)."""
    pt, pb, pl, pr = padding
    if pt == pb and pl == pr:
        return None, (pt, pl)
    return (pl, pr, pt, pb), (0, 0)


def tucker2_conv2d_reference(
    x: Tensor,
    input_factor: Tensor,
    core: Tensor,
    output_factor: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """Three-stage Tucker-2 conv of a 4-D ``x``."""
    groups = input_factor.shape[0]
    w_in, w_core, w_out = tucker2_stage_weights(input_factor, core, output_factor)
    explicit, sym = _core_padding(padding)
    with record_function("tucker2_conv2d.stage1_pointwise_in"):
        t = F.conv2d(x, w_in, None, 1, 0, 1, groups)
    with record_function("tucker2_conv2d.stage2_core"):
        if explicit is not None:
            t = F.pad(t, explicit)
        t = F.conv2d(t, w_core, None, stride, sym, dilation, groups)
    with record_function("tucker2_conv2d.stage3_pointwise_out"):
        y = F.conv2d(t, w_out, bias, 1, 0, 1, groups)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.contiguous(memory_format=torch.channels_last)
    return y.contiguous()


def tucker2_conv2d_dense_weight(
    x: Tensor,
    input_factor: Tensor,
    core: Tensor,
    output_factor: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """One dense conv of the reconstructed weight, where the stages save too little (the plans decide); the
    weight is reused without autograd as for CP (:func:`cpkernels.ops.reference.reused_dense_weight`)."""
    weight = reused_dense_weight(lambda: Tucker2Factors(output_factor, core, input_factor).to_dense(),
                                 output_factor, core, input_factor)
    explicit, sym = _core_padding(padding)
    if explicit is not None:
        x = F.pad(x, explicit)
    return F.conv2d(x, weight, bias, stride, sym, dilation, input_factor.shape[0])


def tucker2_conv2d_cpu(
    x: Tensor,
    input_factor: Tensor,
    core: Tensor,
    output_factor: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """The three stages arranged for the CPU (see :mod:`cpkernels.ops.cpu` for what profiling showed):
    16-bit inputs in fp32 with one rounding of the output; the dense conv where the CPU plan finds it
    faster (:func:`cpkernels.plans.cpu.choose`); NCHW pointwise stages as batched GEMMs; channels_last as
    three convs (GEMMs already)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        up = upcast_16bit(x, input_factor, core, output_factor, bias)
        return tucker2_conv2d_cpu(*up, stride, padding, dilation).to(x.dtype)
    groups, _, r_in = input_factor.shape
    r_out, kernel_size = core.shape[1], tuple(core.shape[3:])
    cout = output_factor.shape[0] * output_factor.shape[1]
    factors = (input_factor, core, output_factor, bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *factors))
    key = cpu_plan.call_key(x, (r_out, r_in), groups, cout, kernel_size, stride, padding, dilation, needs_grad)
    how = cpu_plan.decided(key)
    if how is None:
        out_size = output_size(x.shape[2:], kernel_size, stride, padding, dilation)
        staged = cpu_plan.Plan(STAGES, x.shape[0])
        dense = cpu_plan.Plan(cpu_plan.DENSE, x.shape[0])

        def run(name: str) -> Tensor:
            if name == "reference":
                return tucker2_conv2d_reference(x, *factors, stride, padding, dilation)
            return _tucker2_arranged(staged if name == STAGES else dense, x, *factors, stride, padding, dilation)

        dense_cheaper = cpu_plan.tucker2_dense_is_cheaper(x, (r_out, r_in), groups, cout, kernel_size, out_size)
        how = cpu_plan.choose(key, dense if dense_cheaper else staged, dense, staged, run, x.dtype, needs_grad)
    return _tucker2_arranged(how, x, *factors, stride, padding, dilation)


STAGES = "stages"  # the CPU plan's one staged arrangement of a Tucker-2 call


def _tucker2_arranged(how, x: Tensor, input_factor: Tensor, core: Tensor, output_factor: Tensor,
                      bias: Optional[Tensor], stride, padding, dilation) -> Tensor:
    """The Tucker-2 conv of a 4-D fp32/fp64 ``x`` computed the way ``how`` says."""
    if how.arrangement == cpu_plan.DENSE:
        return tucker2_conv2d_dense_weight(x, input_factor, core, output_factor, bias, stride, padding, dilation)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return tucker2_conv2d_reference(x, input_factor, core, output_factor, bias, stride, padding, dilation)
    groups = input_factor.shape[0]
    _, w_core, _ = tucker2_stage_weights(input_factor, core, output_factor)
    explicit, sym = _core_padding(padding)
    t = _pointwise_matmul(x, input_factor.transpose(1, 2), None)  # [N, G*R_in, H, W]
    if explicit is not None:
        t = F.pad(t, explicit)
    t = F.conv2d(t, w_core, None, stride, sym, dilation, groups).contiguous()
    return _pointwise_matmul(t, output_factor, bias)


def tucker2_conv2d_reference_backward(
    grad_y: Tensor,
    x: Tensor,
    input_factor: Tensor,
    core: Tensor,
    output_factor: Tensor,
    has_bias: bool,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    needs_grad: Sequence[bool],
) -> tuple[Optional[Tensor], ...]:
    """Gradients of :func:`tucker2_conv2d_reference` for ``(x, input, core, output, bias)``, written with
    ``aten.convolution_backward`` so that they trace as the custom op's backward (the intermediates
    are recomputed)."""
    groups, cin_g, r_in = input_factor.shape
    w_in, w_core, w_out = tucker2_stage_weights(input_factor, core, output_factor)
    explicit, sym = _core_padding(padding)
    need_x, need_in, need_core, need_out, need_b = needs_grad
    conv_bwd = torch.ops.aten.convolution_backward.default

    t1 = F.conv2d(x, w_in, None, 1, 0, 1, groups)
    t1p = F.pad(t1, explicit) if explicit is not None else t1
    t2 = F.conv2d(t1p, w_core, None, stride, sym, dilation, groups)

    g_t2, g_w_out, g_bias = conv_bwd(
        grad_y, t2, w_out, [w_out.shape[0]] if has_bias else None, [1, 1], [0, 0], [1, 1], False, [0, 0], groups,
        [True, need_out, has_bias and need_b],
    )
    need_t1 = need_x or need_in
    g_t1p, g_w_core, _ = conv_bwd(
        g_t2, t1p, w_core, None, list(stride), list(sym), list(dilation), False, [0, 0], groups, [need_t1, need_core, False]
    )
    g_x = g_w_in = None
    if need_t1:
        g_t1 = g_t1p
        if explicit is not None:
            pl, _, pt, _ = explicit
            g_t1 = g_t1p[:, :, pt:pt + t1.shape[2], pl:pl + t1.shape[3]]
        g_x, g_w_in, _ = conv_bwd(
            g_t1, x, w_in, None, [1, 1], [0, 0], [1, 1], False, [0, 0], groups, [need_x, need_in, False]
        )
    return (
        g_x if need_x else None,
        g_w_in.reshape(groups, r_in, cin_g).transpose(1, 2) if need_in and g_w_in is not None else None,
        g_w_core.reshape(core.shape) if need_core and g_w_core is not None else None,
        g_w_out.reshape(output_factor.shape) if need_out and g_w_out is not None else None,
        g_bias if has_bias and need_b else None,
    )
