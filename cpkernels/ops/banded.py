"""The CPU path's banded arrangement of a factored conv, for inference on large images: its first 1x1 stage, its
middle (CP's depthwise taps, Tucker-2's core conv) and its last 1x1 stage, run over bands of output rows.

What profiling HED's conv1_2 (64->64 at 416x640, CP at R = 77, batch 1) on the 2-core AMD EPYC VM (AVX2) showed about
the whole-image stages (:mod:`cpkernels.ops.cp_arranged`, ``pixel-major``):
- Each rank-R intermediate of one image is 82 MB. Freshly allocated, it is page-faulted in on every call: the
  stage-1 GEMM took 99 ms in the network and 53 ms into a buffer already touched.
- oneDNN's depthwise conv (``brdgmm_dw:avx2``) ran at 2-3 GMAC/s over the whole image, 6-8 on a band of 8 rows.
- MKL's GEMM with an inner or outer size of 77 ran at 35 GMAC/s against 53 at 80 (K = 64, 5120 pixels).

So here each band of output rows runs all the stages while its intermediates stay in cache, in buffers allocated
once per call and reused by every band:
1. the first stage is one GEMM of the band's input rows (an NCHW image is its transposed operand, no copy), into
   pixel-major rows; the rows the padding adds above and below the image are zeros;
2. the family's middle maps those rows to the band's pixel-major output rows;
3. the last stage is one GEMM that writes the band's rows of the output in place, with the bias.
The ranks are padded with zero components to a multiple of :data:`cpkernels.dispatch.cpu.RANK_ALIGN`: the padded
components contribute exact zeros.

On conv1_2 (``python -m bench.hed_layers``, commit dd533d8) CP ran 180.8 ms in bands against 259.2 ms for the
whole-image stages and 294.2 ms for the dense conv, and Tucker-2 at the same MACs 139.2 ms. It writes with
``out=``, so it serves calls without autograd only.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cpkernels.core.conv_args import is_channels_last, memory_format_of, output_size
from cpkernels.dispatch.cpu import aligned_rank


def new_output(shape: tuple[int, ...], x: Tensor) -> Tensor:
    """The uninitialised output, in ``x``'s dtype, device and memory format (tests poison it with NaN)."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def padded_rank(t: Tensor, rank: int, dim: int = -1) -> Tensor:
    """``t`` with zero components appended along ``dim`` up to ``rank``."""
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, rank - t.shape[dim]]
    return F.pad(t, pad)


# middle(rows, b): the band's first-stage rows [span, W, R1] (span = (b - 1) * sh + (kh - 1) * dh + 1, the padding's
# rows zero) -> its pixel-major output rows [b, Wo, R2]
Middle = Callable[[Tensor, int], Tensor]


def conv2d_in_bands(x: Tensor, first: Tensor, middle: Middle, last: Tensor, bias: Optional[Tensor],
                    kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], band_rows: int) -> Tensor:
    """A factored conv of a 4-D fp32/fp64 ``x`` (NCHW or channels_last) without groups, ``band_rows`` output rows
    at a time: ``first [Cin, R1]``, ``middle`` (see :data:`Middle`), ``last [Cout, R2]`` and ``bias``; ``padding`` is
    ``(top, bottom, left, right)``. No autograd: it writes with ``out=``."""
    n, cin, h, w = x.shape
    kh = kernel_size[0]
    (sh, _), (dh, _), (pt, _, _, _) = stride, dilation, padding
    ho, wo = output_size((h, w), tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    cout, r1 = last.shape[0], first.shape[1]
    channels_last = is_channels_last(x)
    y = new_output((n, cout, ho, wo), x)
    band_rows = max(1, min(band_rows, ho))
    rows_buf = x.new_empty((band_rows - 1) * sh + (kh - 1) * dh + 1, w, r1)  # the first stage's rows of a band
    for i in range(n):
        if channels_last:
            pixels = x[i].permute(1, 2, 0).reshape(h * w, cin)  # a view: the image is pixel-major
            out = y[i].permute(1, 2, 0).view(ho * wo, cout)
        else:
            pixels = x[i].reshape(cin, h * w).T  # [HW, Cin], a transposed operand
            out = y[i].view(cout, ho * wo)
        for o0 in range(0, ho, band_rows):
            b = min(band_rows, ho - o0)
            top = o0 * sh - pt  # the band's first input row; rows outside the image are the zero padding
            stop = top + (b - 1) * sh + (kh - 1) * dh + 1
            lo, hi = max(top, 0), min(stop, h)
            rows = rows_buf[: stop - top]
            if hi <= lo:
                rows.zero_()
            else:
                if lo > top:
                    rows[: lo - top].zero_()
                if stop > hi:
                    rows[hi - top:].zero_()
                # [rows*W, Cin] @ [Cin, R1] -> [rows*W, R1]
                torch.mm(pixels[lo * w: hi * w], first, out=rows[lo - top: hi - top].view(-1, r1))
            flat = middle(rows, b).reshape(b * wo, -1)  # [b*Wo, R2]
            if channels_last:  # [b*Wo, R2] @ [R2, Cout] -> [b*Wo, Cout], rows of the pixel-major output
                band = out[o0 * wo: (o0 + b) * wo]
                if bias is None:
                    torch.mm(flat, last.T, out=band)
                else:
                    torch.addmm(bias, flat, last.T, out=band)
            else:  # [Cout, R2] @ [R2, b*Wo] -> [Cout, b*Wo], the band's columns of each output channel
                band = out[:, o0 * wo: (o0 + b) * wo]
                if bias is None:
                    torch.mm(last, flat.T, out=band)
                else:
                    torch.addmm(bias[:, None], last, flat.T, out=band)
    return y


def cp_conv2d_banded(x: Tensor, input_factor: Tensor, vertical_factor: Tensor, horizontal_factor: Tensor,
                     output_factor: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int], band_rows: int) -> Tensor:
    """CP in bands (:func:`conv2d_in_bands`). The middle is the separable depthwise pass as broadcast multiply-adds
    over pixel-major rows, ``kh + kw`` of them instead of ``kh * kw``: 1.2-2.5x faster than oneDNN's merged
    depthwise conv per band on the AVX2 EPYC."""
    kh, kw = vertical_factor.shape[1], horizontal_factor.shape[1]
    (sh, sw), (dh, dw), (_, _, pl, pr) = stride, dilation, padding
    w = x.shape[3]
    wo = output_size(x.shape[2:], (kh, kw), tuple(stride), tuple(padding), tuple(dilation))[1]
    rank = aligned_rank(input_factor.shape[2])
    taps_v = padded_rank(vertical_factor[0], rank)  # [kh, R]
    taps_h = padded_rank(horizontal_factor[0], rank)  # [kw, R]
    band_rows = max(1, band_rows)
    vert_buf = x.new_zeros(band_rows, pl + w + pr, rank)  # after the vertical taps; the side columns stay zero
    horiz_buf = x.new_empty(band_rows, wo, rank)  # after the horizontal taps

    def taps(rows: Tensor, b: int) -> Tensor:
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
        return horiz

    return conv2d_in_bands(x, padded_rank(input_factor[0], rank), taps, padded_rank(output_factor[0], rank), bias,
                           (kh, kw), stride, padding, dilation, band_rows)


def tucker2_conv2d_banded(x: Tensor, input_factor: Tensor, core: Tensor, output_factor: Tensor,
                          bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                          dilation: Sequence[int], band_rows: int) -> Tensor:
    """Tucker-2 in bands (:func:`conv2d_in_bands`). The middle is the core conv (oneDNN) on the band's rows, read
    as a channels_last image."""
    r_out, r_in, kh, kw = core.shape[1:]
    (_, _, pl, pr) = padding
    rank_in, rank_out = aligned_rank(r_in), aligned_rank(r_out)
    w_core = padded_rank(padded_rank(core[0], rank_in, dim=1), rank_out, dim=0)  # [R_out, R_in, kh, kw]
    w_core = w_core.contiguous(memory_format=torch.channels_last)

    def core_conv(rows: Tensor, b: int) -> Tensor:
        t = rows.unsqueeze(0).permute(0, 3, 1, 2)  # [1, R_in, span, W], channels_last
        if pl != pr:
            t = F.pad(t, (pl, pr, 0, 0))
        t = F.conv2d(t, w_core, None, (stride[0], stride[1]), (0, pl if pl == pr else 0), tuple(dilation))
        return t.permute(0, 2, 3, 1)  # [1, b, Wo, R_out]

    return conv2d_in_bands(x, padded_rank(input_factor[0], rank_in), core_conv,
                           padded_rank(output_factor[0], rank_out), bias, (kh, kw), stride, padding, dilation,
                           band_rows)
