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

from cpkernels.factors import Tucker2Factors
from cpkernels.ops.reference import reused_dense_weight, stage_backward


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


def tucker2_conv2d_reference(x: Tensor, input_factor: Tensor, core: Tensor, output_factor: Tensor,
                             bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                             dilation: Sequence[int]) -> Tensor:
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


def tucker2_conv2d_dense_weight(x: Tensor, input_factor: Tensor, core: Tensor, output_factor: Tensor,
                                bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                                dilation: Sequence[int]) -> Tensor:
    """One dense conv of the reconstructed weight, where the stages save too little (the plans decide); the
    weight is reused without autograd as for CP (:func:`cpkernels.ops.reference.reused_dense_weight`)."""
    weight = reused_dense_weight(lambda: Tucker2Factors(output_factor, core, input_factor).to_dense(),
                                 output_factor, core, input_factor)
    explicit, sym = _core_padding(padding)
    if explicit is not None:
        x = F.pad(x, explicit)
    return F.conv2d(x, weight, bias, stride, sym, dilation, input_factor.shape[0])


def tucker2_conv2d_reference_backward(grad_y: Tensor, x: Tensor, input_factor: Tensor, core: Tensor,
                                      output_factor: Tensor, has_bias: bool, stride: Sequence[int],
                                      padding: Sequence[int], dilation: Sequence[int], needs_grad: Sequence[bool]
                                      ) -> tuple[Optional[Tensor], ...]:
    """Gradients of :func:`tucker2_conv2d_reference` for ``(x, input, core, output, bias)``, written with
    ``aten.convolution_backward`` so that they trace as the custom op's backward (the intermediates
    are recomputed)."""
    groups, cin_g, r_in = input_factor.shape
    w_in, w_core, w_out = tucker2_stage_weights(input_factor, core, output_factor)
    explicit, sym = _core_padding(padding)
    need_x, need_in, need_core, need_out, need_b = needs_grad

    t1 = F.conv2d(x, w_in, None, 1, 0, 1, groups)
    t1p = F.pad(t1, explicit) if explicit is not None else t1
    t2 = F.conv2d(t1p, w_core, None, stride, sym, dilation, groups)

    g_t2, g_w_out, g_bias = stage_backward(grad_y, t2, w_out, groups, [True, need_out, has_bias and need_b],
                                           bias_size=w_out.shape[0] if has_bias else None)
    need_t1 = need_x or need_in
    g_t1p, g_w_core, _ = stage_backward(g_t2, t1p, w_core, groups, [need_t1, need_core, False], stride, sym, dilation)
    g_x = g_w_in = None
    if need_t1:
        g_t1 = g_t1p
        if explicit is not None:
            pl, _, pt, _ = explicit
            g_t1 = g_t1p[:, :, pt:pt + t1.shape[2], pl:pl + t1.shape[3]]
        g_x, g_w_in, _ = stage_backward(g_t1, x, w_in, groups, [need_x, need_in, False])
    return (
        g_x if need_x else None,
        g_w_in.reshape(groups, r_in, cin_g).transpose(1, 2) if need_in and g_w_in is not None else None,
        g_w_core.reshape(core.shape) if need_core and g_w_core is not None else None,
        g_w_out.reshape(output_factor.shape) if need_out and g_w_out is not None else None,
        g_bias if has_bias and need_b else None,
    )
