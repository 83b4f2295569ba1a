"""The CPU path: the same four stages, arranged for the CPU's libraries.

What profiling the four-stage reference on a 2-core x86 CPU showed (``python -m cpkernels.profile``):
- In NCHW, oneDNN's 1x1 convs are slow at large images (a 128-channel 112x112 batch-8 layer: 32 ms for
  the Cin->R conv against 8 ms for the same product as a batched matmul over ``(N, C, H*W)``), so
  NCHW runs the two pointwise stages as matmuls. In channels_last the 1x1 convs are GEMMs already.
- The two depthwise stages run as one kh x kw depthwise conv with the filter ``V[i,r] H[j,r]``: one
  pass over the rank-R intermediate instead of two (equal in exact arithmetic: both stages are linear
  and stage 1 has no bias, so the padding commutes).
- Layers with a handful of channels (a 3->2 5x5 conv at rank 1, say) are memory-bound either way, and
  the CP form moves more bytes than the dense conv (it writes and re-reads two rank-R intermediates).
  There a rough CPU cost model (:func:`dense_is_cheaper`) picks the dense conv with the reconstructed
  weight, which computes the same function.
It computes exactly what :func:`cpkernels.ops.reference.cp_conv2d_reference` computes, up to rounding,
and takes the same normalised arguments.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .conv_args import is_channels_last, output_size


def merged_depthwise_weight(vertical_factor: Tensor, horizontal_factor: Tensor) -> Tensor:
    """``[G*R, 1, kh, kw]`` with tap ``(i, j)`` of channel ``g*R + r`` equal to ``V[g,i,r] H[g,j,r]``."""
    g, kh, r = vertical_factor.shape
    kw = horizontal_factor.shape[1]
    w = vertical_factor[:, :, None, :] * horizontal_factor[:, None, :, :]  # [G, kh, kw, R]
    return w.permute(0, 3, 1, 2).reshape(g * r, 1, kh, kw)


def _pointwise_matmul(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """Grouped 1x1 conv of an NCHW ``x`` as one batched matmul: ``weight [G, Cout/G, Cin/G]``.

    ``out``: a contiguous ``[N, Cout, H, W]`` to write into (no autograd through it)."""
    n, c, h, w = x.shape
    g, cout_g, cin_g = weight.shape
    if g == 1 and bias is not None:
        # The bias rides in the GEMM (beta * bias + A @ B): no second pass over the output.
        args = (bias.reshape(1, -1, 1), weight.expand(n, cout_g, cin_g), x.reshape(n, cin_g, h * w))
        if out is None:
            return torch.baddbmm(*args).reshape(n, cout_g, h, w)
        torch.baddbmm(*args, out=out.view(n, cout_g, h * w))
        return out
    x4 = x.reshape(n, g, cin_g, h * w)
    if out is None:
        y = torch.matmul(weight, x4).reshape(n, g * cout_g, h, w)  # [G, Co, Ci] @ [N, G, Ci, HW] -> [N, G, Co, HW]
    else:
        y = out
        torch.matmul(weight, x4, out=out.view(n, g, cout_g, h * w))
    if bias is not None:
        y.add_(bias.reshape(1, -1, 1, 1))  # in place: y is ours, freshly allocated
    return y


# Inference in NCHW runs the batch in chunks whose rank-R intermediate stays near this size, so the
# intermediates stay in cache and their memory is reused instead of page-faulted in fresh each call
# (a 128-channel 112x112 batch-8 layer: 50 ms whole, 33 ms in chunks of 4, on a 2-core x86 CPU).
CHUNK_BYTES = 8 << 20


# The model's one constant: MACs per byte moved at which the CPU is as busy computing as moving data.
# On the 2-core x86 machine the project was tuned on, a square fp32 matmul ran at ~90 GMAC/s and a
# freshly allocated 51 MB activation cost ~9 ms of first-touch page faults (~6 GB/s) before any copy;
# 5 sits between those rates. Among the benchmark layers it picks the dense conv only for the 3->2
# 5x5 example; it also does for the demo's 3-input-channel layers at rank 2 and 16.
MACS_PER_BYTE = 5.0


def dense_is_cheaper(x: Tensor, rank: int, groups: int, cout: int, kernel_size, out_size) -> bool:
    """Whether the dense conv beats the CP stages under a max(MACs, bytes) model of the CPU."""
    n, cin, h, w = x.shape
    (kh, kw), (oh, ow) = kernel_size, out_size
    es = x.element_size()
    x_px, y_px = n * h * w, n * oh * ow
    dense = max(y_px * cout * (cin // groups) * kh * kw, MACS_PER_BYTE * es * (x_px * cin + y_px * cout))
    gr = groups * rank
    cp_macs = x_px * cin * rank + y_px * gr * kh * kw + y_px * rank * cout
    cp_bytes = es * (x_px * cin + 2 * x_px * gr + 2 * y_px * gr + y_px * cout)
    return dense < max(cp_macs, MACS_PER_BYTE * cp_bytes)


def cp_conv2d_cpu(
    x: Tensor,
    input_factor: Tensor,
    vertical_factor: Tensor,
    horizontal_factor: Tensor,
    output_factor: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """CP conv of a 4-D ``x`` on the CPU; ``padding`` is ``(top, bottom, left, right)`` zero padding."""
    groups, _, rank = input_factor.shape
    pt, pb, pl, pr = padding
    kernel_size = (vertical_factor.shape[1], horizontal_factor.shape[1])
    cout = output_factor.shape[0] * output_factor.shape[1]
    symmetric = pt == pb and pl == pr
    out_size = output_size(x.shape[2:], kernel_size, stride, padding, dilation)
    if dense_is_cheaper(x, rank, groups, cout, kernel_size, out_size):
        weight = torch.einsum("gor,gcr,gir,gjr->gocij", output_factor, input_factor, vertical_factor, horizontal_factor)
        weight = weight.reshape(cout, -1, *kernel_size)
        if not symmetric:
            return F.conv2d(F.pad(x, (pl, pr, pt, pb)), weight, bias, stride, 0, dilation, groups)
        return F.conv2d(x, weight, bias, stride, (pt, pl), dilation, groups)

    w_dw = merged_depthwise_weight(vertical_factor, horizontal_factor)
    channels_last = is_channels_last(x)

    def depthwise(t: Tensor) -> Tensor:
        if symmetric:
            return F.conv2d(t, w_dw, None, stride, (pt, pl), dilation, groups * rank)
        return F.conv2d(F.pad(t, (pl, pr, pt, pb)), w_dw, None, stride, 0, dilation, groups * rank)

    if channels_last:
        w_in = input_factor.transpose(1, 2).reshape(groups * rank, -1, 1, 1)
        t = depthwise(F.conv2d(x, w_in, None, 1, 0, 1, groups))
        y = F.conv2d(t, output_factor.reshape(-1, rank, 1, 1), bias, 1, 0, 1, groups)
        return y.contiguous(memory_format=torch.channels_last)

    w_in = input_factor.transpose(1, 2)

    def stages(xs: Tensor, out: Optional[Tensor] = None) -> Tensor:
        return _pointwise_matmul(depthwise(_pointwise_matmul(xs, w_in, None)).contiguous(), output_factor, bias, out)

    n, _, h, w = x.shape
    chunk = max(1, CHUNK_BYTES // (groups * rank * h * w * x.element_size()))
    tensors = (x, input_factor, vertical_factor, horizontal_factor, output_factor, bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if chunk >= n or needs_grad:  # out= writes have no autograd: training takes the whole batch
        return stages(x)
    oh, ow = out_size
    y = torch.empty((n, cout, oh, ow), dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        stages(x[start:start + chunk], y[start:start + chunk])
    return y
