"""The CPU path: the same four stages, arranged for the CPU's libraries.

What profiling the four-stage reference on a 2-core x86 CPU showed (``python -m cpkernels.profile``):
- In NCHW, oneDNN's 1x1 convs are slow at large images (a 128-channel 112x112 batch-8 layer: 32 ms for
  the Cin->R conv against 8 ms for the same product as a batched matmul over ``(N, C, H*W)``), so
  NCHW runs the two pointwise stages as matmuls. In channels_last the 1x1 convs are GEMMs already.
  Without groups and from rank 16 up, NCHW inputs get pixel-major (channels_last) intermediates: the
  GEMMs take the NCHW tensors as transposed operands, and the depthwise conv runs in oneDNN's native
  layout instead of reordering to and from it.
- The two depthwise stages run as one kh x kw depthwise conv with the filter ``V[i,r] H[j,r]``: one
  pass over the rank-R intermediate instead of two (equal in exact arithmetic: both stages are linear
  and stage 1 has no bias, so the padding commutes).
- oneDNN's depthwise conv vectorises across channels, so at rank 1 or 2 most of each vector register
  idles: it ran 2-4x slower than ATen's im2col conv (``thnn_conv2d``) on the same work. Such NCHW
  intermediates take the im2col conv with a block-diagonal weight (:func:`depthwise_by_im2col`).
- Layers with a few input channels and CP ranks near them (a 3->64 conv at rank 16, say) save few
  MACs, and the CP form moves more bytes than the dense conv (it writes and re-reads two rank-R
  intermediates). There a rough CPU cost model (:func:`dense_is_cheaper`) picks the dense conv with
  the reconstructed weight, which computes the same function.
It computes exactly what :func:`cpkernels.ops.reference.cp_conv2d_reference` computes, up to rounding,
and takes the same normalised arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
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


# The im2col depthwise conv: for at most this many intermediate channels (it does channels times the
# depthwise MACs), and while its column buffer (kh*kw times the output) stays under this size; past
# it, first-touch page faults of the buffer cost more than the idle vector lanes (a 5x5 at rank 1 on
# 8x224x224: 14.5 ms against 2.3 ms for oneDNN).
IM2COL_MAX_CHANNELS = 2
IM2COL_MAX_BYTES = 16 << 20
# Without groups, from this rank up the intermediates are pixel-major (see ``stages`` below); under it
# the first GEMM's narrow [Cin, R] operand made MKL 2-4x slower than the NCHW arrangement.
PIXEL_MAJOR_MIN_RANK = 16


# ATen's im2col conv (``thnn_conv2d``, present in every torch release this package supports); without
# it the depthwise stage stays a grouped conv.
_THNN_CONV2D = getattr(torch._C._nn, "thnn_conv2d", None)


def depthwise_by_im2col(n: int, channels: int, kernel_size, out_size, dilation, element_size: int) -> bool:
    """Whether the depthwise stage over ``n`` images of ``channels`` intermediate channels runs as an
    im2col conv (on NCHW intermediates)."""
    column_bytes = n * channels * kernel_size[0] * kernel_size[1] * out_size[0] * out_size[1] * element_size
    return (
        _THNN_CONV2D is not None and channels <= IM2COL_MAX_CHANNELS and tuple(dilation) == (1, 1)
        and column_bytes <= IM2COL_MAX_BYTES
    )


def im2col_depthwise(t: Tensor, depthwise_weight: Tensor, stride, padding) -> Tensor:
    """The depthwise conv of ``t [N, C, H, W]`` by ``[C, 1, kh, kw]`` as ATen's im2col conv (dilation 1,
    symmetric ``padding (ph, pw)``): an ordinary conv whose weight is block-diagonal over the channels."""
    c, _, kh, kw = depthwise_weight.shape
    weight = depthwise_weight
    if c > 1:
        eye = torch.eye(c, dtype=weight.dtype, device=weight.device)
        weight = eye[:, :, None, None] * weight  # [C, C, 1, 1] * [C, 1, kh, kw] -> [C, C, kh, kw]
    return _THNN_CONV2D(t, weight, (kh, kw), None, stride, padding)


def _pointwise_matmul(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """Grouped 1x1 conv of ``x`` (NCHW, or channels_last without groups) as batched matmuls:
    ``weight [G, Cout/G, Cin/G]``; the result is NCHW.

    ``out``: a contiguous ``[N, Cout, H, W]`` to write into (no autograd through it)."""
    n, c, h, w = x.shape
    g, cout_g, cin_g = weight.shape
    if g == 1:
        # bmm, not matmul: matmul folds batches into rows, copying a transposed operand when a factor
        # requires grad. A channels_last x is a transposed operand here, read without a copy.
        y = None if out is None else out.view(n, cout_g, h * w)
        a, xs = weight.expand(n, cout_g, cin_g), x.reshape(n, cin_g, h * w)  # [N, Co, Ci] @ [N, Ci, HW]
        if bias is None:
            y = torch.bmm(a, xs, out=y)
        else:
            y = torch.baddbmm(bias.reshape(1, -1, 1), a, xs, out=y)  # the bias rides in the GEMM
        return y.view(n, cout_g, h, w)
    x4 = x.reshape(n, g, cin_g, h * w)
    if out is None:
        y = torch.matmul(weight, x4).reshape(n, g * cout_g, h, w)  # [G, Co, Ci] @ [N, G, Ci, HW] -> [N, G, Co, HW]
    else:
        y = out
        torch.matmul(weight, x4, out=out.view(n, g, cout_g, h * w))
    if bias is not None:
        y.add_(bias.reshape(1, -1, 1, 1))  # in place: y is ours, freshly allocated
    return y


def _pointwise_to_pixel_major(x: Tensor, input_factor: Tensor) -> Tensor:
    """Stage 1 without groups as one GEMM over the pixels: ``x [N, Cin, H, W]`` (NCHW enters as a
    transposed operand, no copy) times ``input_factor [Cin, R]`` -> ``[N, R, H, W]`` with channels_last
    strides, the layout oneDNN's depthwise conv runs natively."""
    n, c, h, w = x.shape
    r = input_factor.shape[1]
    # bmm, not matmul: see _pointwise_matmul.
    t = torch.bmm(x.permute(0, 2, 3, 1).reshape(n, h * w, c), input_factor.expand(n, c, r))  # [N, HW, Cin] @ [Cin, R]
    return t.view(n, h, w, r).permute(0, 3, 1, 2)


# Inference in NCHW runs the batch in chunks whose rank-R intermediate stays near this size, so the
# intermediates stay in cache and their memory is reused instead of page-faulted in fresh each call
# (a 128-channel 112x112 batch-8 layer: 50 ms whole, 33 ms in chunks of 4, on a 2-core x86 CPU).
CHUNK_BYTES = 8 << 20


# The model's constant: MACs per byte moved at which the CPU is as busy computing as moving data.
# On the 2-core x86 machine the project was tuned on, a square fp32 matmul ran at ~90 GMAC/s and a
# freshly allocated 51 MB activation cost ~9 ms of first-touch page faults (~6 GB/s) before any copy;
# 5 sits between those rates.
MACS_PER_BYTE = 5.0
# Below this many dense MACs (~0.1 ms of dense conv there) per-call costs decide, not MACs or bytes:
# oneDNN's conv set-up alone took 40-60 us a call, and the CP stages (two GEMMs and a depthwise conv)
# ran faster, e.g. the 3->2 5x5 conv at rank 1 on 8x3x32x32: 70 us against 135 us dense.
DENSE_MIN_MACS = 10_000_000


def dense_is_cheaper(x: Tensor, rank: int, groups: int, cout: int, kernel_size, out_size) -> bool:
    """Whether the dense conv beats the CP stages under a max(MACs, bytes) model of the CPU."""
    n, cin, h, w = x.shape
    (kh, kw), (oh, ow) = kernel_size, out_size
    es = x.element_size()
    x_px, y_px = n * h * w, n * oh * ow
    dense_macs = y_px * cout * (cin // groups) * kh * kw
    if dense_macs < DENSE_MIN_MACS:
        return False
    dense = max(dense_macs, MACS_PER_BYTE * es * (x_px * cin + y_px * cout))
    gr = groups * rank
    cp_macs = x_px * cin * rank + y_px * gr * kh * kw + y_px * rank * cout
    cp_bytes = es * (x_px * cin + 2 * x_px * gr + 2 * y_px * gr + y_px * cout)
    return dense < max(cp_macs, MACS_PER_BYTE * cp_bytes)


@dataclass(frozen=True)
class Plan:
    """How the CPU path computes one call.

    ``arrangement``: ``"dense-weight"`` (dense conv of the reconstructed weight), ``"im2col"`` (NCHW
    intermediates, im2col depthwise conv), ``"pixel-major"`` (channels_last intermediates between GEMMs),
    ``"nchw"`` (NCHW intermediates, grouped depthwise conv), or for channels_last inputs
    ``"channels-last-im2col"`` and ``"channels-last-convs"`` (1x1 and depthwise convs). ``chunk``: images
    per batch chunk (the whole batch when not chunked).
    """

    arrangement: str
    chunk: int


def plan(x: Tensor, rank: int, groups: int, cout: int, kernel_size, out_size, dilation, needs_grad: bool) -> Plan:
    """The CPU path's choice for ``x`` (4-D) and a layer of these dimensions; see the module docstring."""
    n, _, h, w = x.shape
    es = x.element_size()
    if dense_is_cheaper(x, rank, groups, cout, kernel_size, out_size):
        return Plan("dense-weight", n)
    if is_channels_last(x):
        if groups == 1 and depthwise_by_im2col(n, rank, kernel_size, out_size, dilation, es):
            return Plan("channels-last-im2col", n)
        return Plan("channels-last-convs", n)
    # NCHW inference runs in batch chunks; out= writes have no autograd, so training takes the whole batch.
    chunk = n if needs_grad else max(1, min(n, CHUNK_BYTES // max(1, groups * rank * h * w * es)))
    if depthwise_by_im2col(chunk, groups * rank, kernel_size, out_size, dilation, es):
        return Plan("im2col", chunk)
    if groups == 1 and rank >= PIXEL_MAJOR_MIN_RANK:
        return Plan("pixel-major", chunk)
    return Plan("nchw", chunk)


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
    tensors = (x, input_factor, vertical_factor, horizontal_factor, output_factor, bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    how = plan(x, rank, groups, cout, kernel_size, out_size, dilation, needs_grad)

    if how.arrangement == "dense-weight":
        weight = torch.einsum("gor,gcr,gir,gjr->gocij", output_factor, input_factor, vertical_factor, horizontal_factor)
        weight = weight.reshape(cout, -1, *kernel_size)
        if not symmetric:
            return F.conv2d(F.pad(x, (pl, pr, pt, pb)), weight, bias, stride, 0, dilation, groups)
        return F.conv2d(x, weight, bias, stride, (pt, pl), dilation, groups)

    w_dw = merged_depthwise_weight(vertical_factor, horizontal_factor)
    sym_pad = (pt, pl) if symmetric else (0, 0)

    def padded(t: Tensor) -> Tensor:
        return t if symmetric else F.pad(t, (pl, pr, pt, pb))

    def grouped_depthwise(t: Tensor) -> Tensor:
        return F.conv2d(padded(t), w_dw, None, stride, sym_pad, dilation, groups * rank)

    w_in = input_factor.transpose(1, 2)
    if how.arrangement == "channels-last-im2col":
        # Rank 1-2 layers are small enough for oneDNN's per-call set-up (40-60 us a conv) to decide:
        # GEMMs over the pixels and the im2col depthwise conv instead of three oneDNN convs.
        t = im2col_depthwise(padded(_pointwise_matmul(x, w_in, None)), w_dw, stride, sym_pad)  # NCHW, <= 2 ch
        return F.linear(t.permute(0, 2, 3, 1), output_factor[0], bias).permute(0, 3, 1, 2)
    if how.arrangement == "channels-last-convs":
        t = grouped_depthwise(F.conv2d(x, w_in.reshape(groups * rank, -1, 1, 1), None, 1, 0, 1, groups))
        y = F.conv2d(t, output_factor.reshape(-1, rank, 1, 1), bias, 1, 0, 1, groups)
        return y.contiguous(memory_format=torch.channels_last)

    def stages(xs: Tensor, out: Optional[Tensor] = None) -> Tensor:
        if how.arrangement == "im2col":
            t = im2col_depthwise(padded(_pointwise_matmul(xs, w_in, None)), w_dw, stride, sym_pad)
            return _pointwise_matmul(t, output_factor, bias, out)
        if how.arrangement == "pixel-major":
            # oneDNN's NCHW depthwise conv reorders to a blocked layout and back; in channels_last it
            # does not (3-18 % faster per layer, 8x{128..512} channels, R 16..64). Stage 4 reads the
            # channels_last intermediate as a transposed operand.
            t = grouped_depthwise(_pointwise_to_pixel_major(xs, input_factor[0]))
        else:
            t = grouped_depthwise(_pointwise_matmul(xs, w_in, None)).contiguous()
        return _pointwise_matmul(t, output_factor, bias, out)

    n = x.shape[0]
    if how.chunk >= n:
        return stages(x)
    y = torch.empty((n, cout, *out_size), dtype=x.dtype, device=x.device)
    for start in range(0, n, how.chunk):
        stages(x[start:start + how.chunk], y[start:start + how.chunk])
    return y
