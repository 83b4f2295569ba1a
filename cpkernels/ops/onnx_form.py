"""The CP conv as the standard convs an ONNX runtime knows: what ``CPConv2d`` runs while it is exported (and
below it, the Tucker-2 and low-rank 1x1 layers' Conv forms).

    x --[one Pad, only for a non-zero padding mode or uneven zero padding]-->
      --Conv 1x1 (Cin->R, group G)--> --Conv kh x kw depthwise (group G*R)--> --Conv 1x1 (R->Cout, group G) + bias--> y

``merge_depthwise=False`` writes the depthwise stage as the kh x 1 and 1 x kw convs of the reference.
The exporter folds the factor reshapes into the conv weights' initializers (checked by
:func:`cpkernels.export.check_standard_graph`), so nothing is reshaped at run time. A non-zero padding
mode copies pixels, which commutes with the bias-free 1x1 stage, so padding the input once is exact.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from cpkernels.core import conv_args
from cpkernels.factors import CPFactors
from cpkernels.ops.banded import padded_rank
from cpkernels.ops.reference import stage_weights
from cpkernels.ops.svd_reference import svd_stage_weights
from cpkernels.ops.tucker2_reference import tucker2_stage_weights

# Two depthwise stages or one: set for the length of an export by :func:`depthwise_merged`. One merged
# kh x kw depthwise Conv ran faster in ONNX Runtime on the CPU (bench/onnx_speed.py), so it is the default.
_MERGE_DEPTHWISE = [True]
# Ranks padded with zero channels to a multiple of this while exporting: set by :func:`rank_aligned`.
_RANK_ALIGN = [1]


@contextlib.contextmanager
def _holding(box: list, value):
    """``box[0] = value`` within the block, the previous value put back after it."""
    previous = box[0]
    box[0] = value
    try:
        yield
    finally:
        box[0] = previous


def depthwise_merged(merge: bool):
    """Within the block, exported CP layers write their depthwise stage as one Conv (``True``) or two."""
    return _holding(_MERGE_DEPTHWISE, bool(merge))


def rank_aligned(multiple: int):
    """Within the block, exported factored layers without groups pad each rank with zero channels up to a
    multiple of ``multiple`` (1: as they are). The output is the same: a zero channel adds nothing."""
    return _holding(_RANK_ALIGN, int(multiple))


def _zero_padded(w: Tensor, dim: int, groups: int) -> Tensor:
    """``w`` with zeros appended along ``dim`` up to a multiple of :func:`rank_aligned`'s (grouped layers as
    they are)."""
    multiple, size = _RANK_ALIGN[0], int(w.shape[dim])  # an int, not a traced size: the pad is a constant
    extra = -size % multiple if groups == 1 and multiple > 1 else 0
    if extra == 0:
        return w
    if torch.jit.is_tracing():
        # The TorchScript exporter gives a padded weight no shape, which its Conv needs; it folds a concatenation
        # with zeros into the initializer.
        shape = [int(d) for d in w.shape]
        shape[dim] = extra
        return torch.cat([w, torch.zeros(shape, dtype=w.dtype, device=w.device)], dim)
    # The torch.export-based exporter's optimizer (onnxscript's) folds a Pad of the weight, not a concatenation.
    return padded_rank(w, size + extra, dim)


def _padded_input(x: Tensor, padding, kernel_size, dilation, padding_mode: str) -> tuple[Tensor, tuple[int, int]]:
    """``x`` with one Pad where a Conv's own symmetric pads cannot do it, and the Conv's (top, left) pads."""
    pt, pb, pl, pr = conv_args.explicit_padding(padding, kernel_size, dilation)
    if padding_mode != "zeros" and (pt, pb, pl, pr) != (0, 0, 0, 0):
        return F.pad(x, (pl, pr, pt, pb), mode=padding_mode), (0, 0)
    if (pt, pl) != (pb, pr):  # ONNX Conv takes uneven pads, F.conv2d does not: one Pad node
        return F.pad(x, (pl, pr, pt, pb)), (0, 0)
    return x, (pt, pl)


def cp_conv2d_onnx_form(
    x: Tensor,
    factors: CPFactors,
    bias: Optional[Tensor],
    stride: tuple[int, int],
    padding: conv_args.Padding,
    dilation: tuple[int, int],
    padding_mode: str = "zeros",
    merge_depthwise: Optional[bool] = None,
) -> Tensor:
    """The same function as :func:`cpkernels.cp_conv2d`, written with ``F.pad`` and ``F.conv2d`` only."""
    merge = _MERGE_DEPTHWISE[0] if merge_depthwise is None else merge_depthwise
    groups, _, rank = factors.input.shape
    x, (pt, pl) = _padded_input(x, padding, factors.kernel_size, dilation, padding_mode)
    w_in, w_vert, w_horz, w_out = stage_weights(factors.input, factors.vertical, factors.horizontal, factors.output)
    # [R', Cin, 1, 1], [R', 1, kh, 1], [R', 1, 1, kw], [Cout, R', 1, 1]: R' = R padded (rank_aligned)
    w_in, w_vert, w_horz = (_zero_padded(w, 0, groups) for w in (w_in, w_vert, w_horz))
    w_out = _zero_padded(w_out, 1, groups)
    rank = w_vert.shape[0] // groups
    (sh, sw), (dh, dw) = stride, dilation
    t = F.conv2d(x, w_in, None, 1, 0, 1, groups)  # [N, G*R, H, W]
    if merge:
        # [G*R, 1, kh, 1] * [G*R, 1, 1, kw] -> [G*R, 1, kh, kw]: the outer product of the two taps.
        t = F.conv2d(t, w_vert * w_horz, None, (sh, sw), (pt, pl), (dh, dw), groups * rank)
    else:
        t = F.conv2d(t, w_vert, None, (sh, 1), (pt, 0), (dh, 1), groups * rank)
        t = F.conv2d(t, w_horz, None, (1, sw), (0, pl), (1, dw), groups * rank)
    return F.conv2d(t, w_out, bias, 1, 0, 1, groups)


def tucker2_conv2d_onnx_form(
    x: Tensor,
    factors,
    bias: Optional[Tensor],
    stride: tuple[int, int],
    padding: conv_args.Padding,
    dilation: tuple[int, int],
    padding_mode: str = "zeros",
) -> Tensor:
    """The same function as :func:`cpkernels.tucker2_conv2d` as three standard Convs (1x1, kh x kw core, 1x1
    with the bias), plus one Pad for a non-zero padding mode or uneven zero padding."""
    groups = factors.groups
    x, (pt, pl) = _padded_input(x, padding, factors.kernel_size, dilation, padding_mode)
    w_in, w_core, w_out = tucker2_stage_weights(factors.input, factors.core, factors.output)
    # [R_in', Cin, 1, 1], [R_out', R_in', kh, kw], [Cout, R_out', 1, 1]: the ranks padded (rank_aligned)
    w_in, w_out = _zero_padded(w_in, 0, groups), _zero_padded(w_out, 1, groups)
    w_core = _zero_padded(_zero_padded(w_core, 0, groups), 1, groups)
    t = F.conv2d(x, w_in, None, 1, 0, 1, groups)  # [N, G*R_in, H, W]
    t = F.conv2d(t, w_core, None, stride, (pt, pl), dilation, groups)  # [N, G*R_out, OH, OW]
    return F.conv2d(t, w_out, bias, 1, 0, 1, groups)


def svd_conv2d_onnx_form(
    x: Tensor,
    factors,
    bias: Optional[Tensor],
    stride: tuple[int, int],
    padding: conv_args.Padding,
    dilation: tuple[int, int],
    padding_mode: str = "zeros",
) -> Tensor:
    """The same function as :func:`cpkernels.svd_conv2d` as two standard 1x1 Convs (Cin -> R with the stride,
    R -> Cout with the bias), plus one Pad for a non-zero padding mode or uneven zero padding."""
    groups = factors.groups
    x, (pt, pl) = _padded_input(x, padding, factors.kernel_size, dilation, padding_mode)
    w_in, w_out = svd_stage_weights(factors.input, factors.output)
    w_in, w_out = _zero_padded(w_in, 0, groups), _zero_padded(w_out, 1, groups)  # R padded (rank_aligned)
    t = F.conv2d(x, w_in, None, stride, (pt, pl), dilation, groups)  # [N, G*R, OH, OW]
    return F.conv2d(t, w_out, bias, 1, 0, 1, groups)
