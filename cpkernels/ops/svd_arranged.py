"""The CPU path of the low-rank 1x1 conv: two GEMMs. A 1x1 conv at stride s reads every s-th pixel, so the input
is subsampled (and zero-padded, where it has padding) once and both stages are batched matmuls
(:func:`cpkernels.ops.cp_arranged.pointwise_matmul`); channels_last inputs run the two 1x1 convs, which oneDNN
already computes as GEMMs in that layout. No dense alternative is planned: a layer exists only at ranks that
cost fewer MACs than the dense 1x1 conv, and both forms are GEMMs streaming the same input and output."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cpkernels.ops.cp_arranged import pointwise_matmul
from cpkernels.ops.reference import upcast_16bit
from cpkernels.ops.svd_reference import svd_conv2d_reference


def svd_conv2d_cpu(x: Tensor, input_factor: Tensor, output_factor: Tensor, bias: Optional[Tensor],
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """What :func:`cpkernels.ops.svd_reference.svd_conv2d_reference` computes, up to rounding; 16-bit inputs in
    fp32 with one rounding of the output."""
    if x.dtype in (torch.float16, torch.bfloat16):
        up = upcast_16bit(x, input_factor, output_factor, bias)
        return svd_conv2d_cpu(*up, stride, padding, dilation).to(x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return svd_conv2d_reference(x, input_factor, output_factor, bias, stride, padding, dilation)
    pt, pb, pl, pr = padding
    if (pt, pb, pl, pr) != (0, 0, 0, 0):
        x = F.pad(x, (pl, pr, pt, pb))
    sh, sw = stride
    if (sh, sw) != (1, 1):
        x = x[:, :, ::sh, ::sw]
    t = pointwise_matmul(x, input_factor.transpose(1, 2), None)  # [N, G*R, OH, OW]
    return pointwise_matmul(t, output_factor, bias)
