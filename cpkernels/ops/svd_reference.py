"""The low-rank 1x1 conv as two PyTorch convs (the reference), the dense conv of its reconstructed weight, and
their backward.

    x --1x1 (Cin->R per group, groups G, the stride and padding)--> t --1x1 (R->Cout per group) + bias--> y

Zero padding of ``x`` before the first conv equals zero padding of ``t`` because the first conv has no bias
(padded pixels then carry only the bias, as in the dense conv). Arguments are normalised as in
:mod:`cpkernels.ops.reference`: 4-D ``x``, factors ``input (G, Cin/G, R)``, ``output (G, Cout/G, R)``, and
``padding`` as ``(top, bottom, left, right)`` zeros.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from cpkernels.factors import SVDFactors
from cpkernels.ops.reference import reused_dense_weight, stage_backward
from cpkernels.ops.tucker2_reference import _core_padding


def svd_stage_weights(input_factor: Tensor, output_factor: Tensor) -> tuple[Tensor, Tensor]:
    """The two conv weights: ``[G*R, Cin/G, 1, 1]`` and ``[Cout, R, 1, 1]``."""
    g, cin_g, r = input_factor.shape
    return input_factor.transpose(1, 2).reshape(g * r, cin_g, 1, 1), output_factor.reshape(-1, r, 1, 1)


def svd_conv2d_reference(x: Tensor, input_factor: Tensor, output_factor: Tensor, bias: Optional[Tensor],
                         stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """Two-stage low-rank 1x1 conv of a 4-D ``x``."""
    groups = input_factor.shape[0]
    w_in, w_out = svd_stage_weights(input_factor, output_factor)
    explicit, sym = _core_padding(padding)
    with record_function("svd_conv2d.stage1_pointwise_in"):
        t = F.conv2d(x if explicit is None else F.pad(x, explicit), w_in, None, stride, sym, dilation, groups)
    with record_function("svd_conv2d.stage2_pointwise_out"):
        y = F.conv2d(t, w_out, bias, 1, 0, 1, groups)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.contiguous(memory_format=torch.channels_last)
    return y.contiguous()


def svd_conv2d_dense_weight(x: Tensor, input_factor: Tensor, output_factor: Tensor, bias: Optional[Tensor],
                            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """One dense 1x1 conv of the reconstructed weight (the GPU plan's ``dense``), the weight reused without
    autograd as for CP (:func:`cpkernels.ops.reference.reused_dense_weight`)."""
    weight = reused_dense_weight(lambda: SVDFactors(output_factor, input_factor).to_dense(), output_factor,
                                 input_factor)
    explicit, sym = _core_padding(padding)
    if explicit is not None:
        x = F.pad(x, explicit)
    return F.conv2d(x, weight, bias, stride, sym, dilation, input_factor.shape[0])


def svd_conv2d_reference_backward(grad_y: Tensor, x: Tensor, input_factor: Tensor, output_factor: Tensor,
                                  has_bias: bool, stride: Sequence[int], padding: Sequence[int],
                                  dilation: Sequence[int], needs_grad: Sequence[bool]) -> tuple[Optional[Tensor], ...]:
    """Gradients of :func:`svd_conv2d_reference` for ``(x, input, output, bias)`` by ``aten.convolution_backward``
    (so that they trace as the custom op's backward); the intermediate is recomputed."""
    groups, cin_g, r = input_factor.shape
    w_in, w_out = svd_stage_weights(input_factor, output_factor)
    explicit, sym = _core_padding(padding)
    need_x, need_in, need_out, need_b = needs_grad
    xp = x if explicit is None else F.pad(x, explicit)
    t = F.conv2d(xp, w_in, None, stride, sym, dilation, groups)
    g_t, g_w_out, g_bias = stage_backward(grad_y, t, w_out, groups, [True, need_out, has_bias and need_b],
                                          bias_size=w_out.shape[0] if has_bias else None)
    g_x = g_w_in = None
    if need_x or need_in:
        g_xp, g_w_in, _ = stage_backward(g_t, xp, w_in, groups, [need_x, need_in, False], stride, sym, dilation)
        g_x = g_xp
        if explicit is not None and g_xp is not None:
            pl, _, pt, _ = explicit
            g_x = g_xp[:, :, pt:pt + x.shape[2], pl:pl + x.shape[3]]
    return (
        g_x if need_x else None,
        g_w_in.reshape(groups, r, cin_g).transpose(1, 2) if need_in and g_w_in is not None else None,
        g_w_out.reshape(output_factor.shape) if need_out and g_w_out is not None else None,
        g_bias if has_bias and need_b else None,
    )
