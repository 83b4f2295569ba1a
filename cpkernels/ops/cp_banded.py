"""The CPU path's banded arrangement: the four CP stages over bands of output rows, for inference on large images.

What profiling HED's conv1_2 (64->64 at 416x640, R = 77, batch 1) on the 2-core AMD EPYC VM (AVX2) showed about
the whole-image stages (:mod:`cpkernels.ops.cp_arranged`, ``pixel-major``):
- Each rank-R intermediate of one image is 82 MB. Freshly allocated, it is page-faulted in on every call: the
  stage-1 GEMM took 99 ms in the network and 53 ms into a buffer already touched.
- oneDNN's depthwise conv (``brdgmm_dw:avx2``) ran at 6-8 GMAC/s.
- MKL's GEMM with an inner or outer size of 77 ran at 35 GMAC/s against 53 at 80 (K = 64, 5120 pixels).

So here each band of output rows runs all four stages while its intermediates stay in cache, in buffers
allocated once per call and reused by every band:
1. stage 1 is one GEMM of the band's input rows (an NCHW image is its transposed operand, no copy);
2. and 3. the vertical and the horizontal taps are the separable depthwise pass as broadcast multiply-adds over
   pixel-major rows, ``kh + kw`` of them instead of ``kh * kw`` (1.2-2.5x faster than oneDNN's merged
   depthwise conv per band there);
4. stage 4 is one GEMM that writes the band's rows of the output in place, with the bias.
The rank is padded with zero components to a multiple of :data:`cpkernels.dispatch.cpu.RANK_ALIGN`: the padded
components contribute exact zeros.

On conv1_2 that took 191-197 ms against 289 ms for the whole-image stages and 306 ms for the dense conv
(medians of 11 interleaved rounds). It writes with ``out=``, so it serves calls without autograd only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cpkernels.core.conv_args import is_channels_last, memory_format_of, output_size
from cpkernels.dispatch.cpu import RANK_ALIGN


def new_output(shape: tuple[int, ...], x: Tensor) -> Tensor:
    """The uninitialised output, in ``x``'s dtype, device and memory format (tests poison it with NaN)."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def _padded_rank(t: Tensor, rank: int) -> Tensor:
    """``t [..., R]`` with zero components appended up to ``rank``."""
    return F.pad(t, (0, rank - t.shape[-1]))


def cp_conv2d_banded(x: Tensor, input_factor: Tensor, vertical_factor: Tensor, horizontal_factor: Tensor,
                     output_factor: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int], band_rows: int) -> Tensor:
    """CP conv of a 4-D fp32/fp64 ``x`` (NCHW or channels_last) without groups, ``band_rows`` output rows at a time;
    ``padding`` is ``(top, bottom, left, right)``. No autograd: it writes its buffers with ``out=``."""
    n, cin, h, w = x.shape
    kh, kw = vertical_factor.shape[1], horizontal_factor.shape[1]
    cout = output_factor.shape[1]
    (sh, sw), (dh, dw), (pt, _, pl, pr) = stride, dilation, padding
    ho, wo = output_size((h, w), (kh, kw), (sh, sw), tuple(padding), (dh, dw))
    rank = -(-input_factor.shape[2] // RANK_ALIGN) * RANK_ALIGN
    stage1 = _padded_rank(input_factor[0], rank)  # [Cin, R]
    taps_v = _padded_rank(vertical_factor[0], rank)  # [kh, R]
    taps_h = _padded_rank(horizontal_factor[0], rank)  # [kw, R]
    stage4 = _padded_rank(output_factor[0], rank)  # [Cout, R]
    channels_last = is_channels_last(x)

    y = new_output((n, cout, ho, wo), x)
    band_rows = max(1, min(band_rows, ho))
    span = (band_rows - 1) * sh + (kh - 1) * dh + 1  # input rows one band reads
    rows_buf = x.new_empty(span, w, rank)  # stage 1's output for the band's input rows
    vert_buf = x.new_zeros(band_rows, pl + w + pr, rank)  # after the vertical taps; the side columns stay zero
    horiz_buf = x.new_empty(band_rows, wo, rank)  # after the horizontal taps
    for i in range(n):
        if channels_last:
            pixels = x[i].permute(1, 2, 0).reshape(h * w, cin)  # a view: the image is pixel-major
            out = y[i].permute(1, 2, 0).view(ho * wo, cout)
        else:
            pixels = x[i].reshape(cin, h * w).T  # [HW, Cin], a transposed operand
            out = y[i].view(cout, ho * wo)
        for o0 in range(0, ho, band_rows):
            b = min(band_rows, ho - o0)
            first = o0 * sh - pt  # the band's first input row; rows outside the image are the zero padding
            stop = first + (b - 1) * sh + (kh - 1) * dh + 1
            lo, hi = max(first, 0), min(stop, h)
            rows = rows_buf[: stop - first]
            if hi <= lo:
                rows.zero_()
            else:
                if lo > first:
                    rows[: lo - first].zero_()
                if stop > hi:
                    rows[hi - first:].zero_()
                # [rows*W, Cin] @ [Cin, R] -> [rows*W, R]
                torch.mm(pixels[lo * w: hi * w], stage1, out=rows[lo - first: hi - first].view(-1, rank))
            vert = vert_buf[:b, pl: pl + w]
            for tap in range(kh):  # [b, W, R] += [b, W, R] * [R]
                src = rows[tap * dh: tap * dh + (b - 1) * sh + 1: sh]
                if tap == 0:
                    torch.mul(src, taps_v[0], out=vert)
                else:
                    vert.addcmul_(src, taps_v[tap])
            horiz = horiz_buf[:b]
            for tap in range(kw):  # [b, Wo, R] += [b, Wo, R] * [R]
                src = vert_buf[:b, tap * dw: tap * dw + (wo - 1) * sw + 1: sw]
                if tap == 0:
                    torch.mul(src, taps_h[0], out=horiz)
                else:
                    horiz.addcmul_(src, taps_h[tap])
            flat = horiz.view(b * wo, rank)
            if channels_last:  # [b*Wo, R] @ [R, Cout] -> [b*Wo, Cout], rows of the pixel-major output
                band = out[o0 * wo: (o0 + b) * wo]
                if bias is None:
                    torch.mm(flat, stage4.T, out=band)
                else:
                    torch.addmm(bias, flat, stage4.T, out=band)
            else:  # [Cout, R] @ [R, b*Wo] -> [Cout, b*Wo], the band's columns of each output channel
                band = out[:, o0 * wo: (o0 + b) * wo]
                if bias is None:
                    torch.mm(stage4, flat.T, out=band)
                else:
                    torch.addmm(bias[:, None], stage4, flat.T, out=band)
    return y
