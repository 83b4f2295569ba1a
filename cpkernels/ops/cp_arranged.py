"""The CPU path: the same four stages, arranged for the CPU's libraries.

What profiling the four-stage reference on a 2-core x86 CPU showed (``python -m cpkernels.tools.profile``):
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
  intermediates). There the dense conv with the reconstructed weight, which computes the same
  function, is faster: the CPU plan times both on a signature's first call and keeps the faster
  (:func:`cpkernels.dispatch.cpu.choose`; or a fixed cost rule, :func:`cpkernels.dispatch.cpu.dense_is_cheaper`).
- At inference on an image whose rank-R intermediate is too large for cache (HED's 416x640 and 208x320 convs),
  the stages run over bands of output rows instead (:mod:`cpkernels.ops.banded`): 1.34-1.43x faster than the
  whole-image stages on HED's 416x640 and 208x320 convs, 0.97-1.27x at 104x160 (AVX2 EPYC).
- 16-bit inputs run in fp32 and the output is rounded once. On the 2-core AMD EPYC (no native bf16
  arithmetic) bf16 CP layers ran 10-16x slower than the same layer in fp32 (batch 8: 256->256 @28^2
  at R = 256, 765 ms against 75 ms with the casts; 128->128 @56^2 at R = 32, 396 ms against 30 ms),
  and fp32 intermediates keep the terms of trained layers, which cancel 40-80x, from losing the
  precision a 16-bit intermediate would (tests/test_precision.py).
It computes exactly what :func:`cpkernels.ops.reference.cp_conv2d_reference` computes, up to rounding,
and takes the same normalised arguments.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cpkernels.core.conv_args import output_size
from cpkernels.dispatch import cpu as cpu_dispatch
from cpkernels.ops.banded import cp_conv2d_banded
from cpkernels.ops.reference import cp_conv2d_dense_weight, cp_conv2d_reference, upcast_16bit


def merged_depthwise_weight(vertical_factor: Tensor, horizontal_factor: Tensor) -> Tensor:
    """``[G*R, 1, kh, kw]`` with tap ``(i, j)`` of channel ``g*R + r`` equal to ``V[g,i,r] H[g,j,r]``."""
    g, kh, r = vertical_factor.shape
    kw = horizontal_factor.shape[1]
    w = vertical_factor[:, :, None, :] * horizontal_factor[:, None, :, :]  # [G, kh, kw, R]
    return w.permute(0, 3, 1, 2).reshape(g * r, 1, kh, kw)


# ATen's im2col conv (``thnn_conv2d``, present in every torch release this package supports); the
# plan (:mod:`cpkernels.dispatch.cpu`) takes it only where it exists.
_THNN_CONV2D = getattr(torch._C._nn, "thnn_conv2d", None)


def im2col_depthwise(t: Tensor, depthwise_weight: Tensor, stride, padding) -> Tensor:
    """The depthwise conv of ``t [N, C, H, W]`` by ``[C, 1, kh, kw]`` as ATen's im2col conv (dilation 1,
    symmetric ``padding (ph, pw)``): an ordinary conv whose weight is block-diagonal over the channels."""
    c, _, kh, kw = depthwise_weight.shape
    weight = depthwise_weight
    if c > 1:
        eye = torch.eye(c, dtype=weight.dtype, device=weight.device)
        weight = eye[:, :, None, None] * weight  # [C, C, 1, 1] * [C, 1, kh, kw] -> [C, C, kh, kw]
    return _THNN_CONV2D(t, weight, (kh, kw), None, stride, padding)


def pointwise_matmul(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
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


def pointwise_to_pixel_major(x: Tensor, input_factor: Tensor) -> Tensor:
    """Stage 1 without groups as one GEMM over the pixels: ``x [N, Cin, H, W]`` (NCHW enters as a
    transposed operand, no copy) times ``input_factor [Cin, R]`` -> ``[N, R, H, W]`` with channels_last
    strides, the layout oneDNN's depthwise conv runs natively."""
    n, c, h, w = x.shape
    r = input_factor.shape[1]
    # bmm, not matmul: see pointwise_matmul.
    t = torch.bmm(x.permute(0, 2, 3, 1).reshape(n, h * w, c), input_factor.expand(n, c, r))  # [N, HW, Cin] @ [Cin, R]
    return t.view(n, h, w, r).permute(0, 3, 1, 2)


def cp_conv2d_cpu(x: Tensor, input_factor: Tensor, vertical_factor: Tensor, horizontal_factor: Tensor,
                  output_factor: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int]) -> Tensor:
    """CP conv of a 4-D ``x`` on the CPU; ``padding`` is ``(top, bottom, left, right)`` zero padding. The
    CPU plan picks dense or the staged arrangement (:func:`cpkernels.dispatch.cpu.choose`)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        up = upcast_16bit(x, input_factor, vertical_factor, horizontal_factor, output_factor, bias)
        return cp_conv2d_cpu(*up, stride, padding, dilation).to(x.dtype)
    how = cp_cpu_plan(x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride, padding,
                      dilation)
    return cp_conv2d_arranged(how, x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride,
                              padding, dilation)


def cp_cpu_plan(x: Tensor, input_factor: Tensor, vertical_factor: Tensor, horizontal_factor: Tensor,
                output_factor: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> Optional[cpu_dispatch.Plan]:
    """The CPU plan's arrangement of this call (timed on a signature's first call in the measured mode), or
    None for 16-bit ``x``, whose plan :func:`cp_conv2d_cpu` works out per call on the fp32 copies."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return None
    factors = (input_factor, vertical_factor, horizontal_factor, output_factor, bias)
    groups, _, rank = input_factor.shape
    kernel_size = (vertical_factor.shape[1], horizontal_factor.shape[1])
    cout = output_factor.shape[0] * output_factor.shape[1]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *factors))
    key = cpu_dispatch.call_key(x, rank, groups, cout, kernel_size, stride, padding, dilation, needs_grad)
    how = cpu_dispatch.decided(key)  # a signature the measured mode has timed: nothing more to work out
    if how is None:
        out_size = output_size(x.shape[2:], kernel_size, stride, padding, dilation)
        dims = (x, rank, groups, cout, kernel_size, out_size, dilation, needs_grad)
        dense, staged = cpu_dispatch.Plan(cpu_dispatch.DENSE, x.shape[0]), cpu_dispatch.staged_plan(*dims)

        def run(name: str) -> Tensor:
            if name == "reference":
                return cp_conv2d_reference(x, *factors, stride, padding, dilation)
            return cp_conv2d_arranged(staged if name == staged.arrangement else dense, x, *factors, stride, padding,
                                      dilation)

        modeled = dense if cpu_dispatch.dense_is_cheaper(x, rank, groups, cout, kernel_size, out_size) else staged
        how = cpu_dispatch.choose(key, modeled, dense, staged, run, x.dtype, needs_grad)
    return how


def cp_conv2d_arranged(how: cpu_dispatch.Plan, x: Tensor, input_factor: Tensor, vertical_factor: Tensor,
                       horizontal_factor: Tensor, output_factor: Tensor, bias: Optional[Tensor],
                       stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """The CP conv of a 4-D fp32/fp64 ``x`` computed the way ``how`` says."""
    if how.arrangement == cpu_dispatch.DENSE:
        return cp_conv2d_dense_weight(x, input_factor, vertical_factor, horizontal_factor, output_factor, bias,
                                      stride, padding, dilation)
    if how.arrangement == cpu_dispatch.BANDED:
        return cp_conv2d_banded(x, input_factor, vertical_factor, horizontal_factor, output_factor, bias, stride,
                                padding, dilation, how.chunk)
    groups, _, rank = input_factor.shape
    pt, pb, pl, pr = padding
    kernel_size = (vertical_factor.shape[1], horizontal_factor.shape[1])
    cout = output_factor.shape[0] * output_factor.shape[1]
    symmetric = pt == pb and pl == pr
    out_size = output_size(x.shape[2:], kernel_size, stride, padding, dilation)

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
        t = im2col_depthwise(padded(pointwise_matmul(x, w_in, None)), w_dw, stride, sym_pad)  # NCHW, <= 2 ch
        return F.linear(t.permute(0, 2, 3, 1), output_factor[0], bias).permute(0, 3, 1, 2)
    if how.arrangement == "channels-last-convs":
        t = grouped_depthwise(F.conv2d(x, w_in.reshape(groups * rank, -1, 1, 1), None, 1, 0, 1, groups))
        y = F.conv2d(t, output_factor.reshape(-1, rank, 1, 1), bias, 1, 0, 1, groups)
        return y.contiguous(memory_format=torch.channels_last)

    def stages(xs: Tensor, out: Optional[Tensor] = None) -> Tensor:
        if how.arrangement == "im2col":
            t = im2col_depthwise(padded(pointwise_matmul(xs, w_in, None)), w_dw, stride, sym_pad)
            return pointwise_matmul(t, output_factor, bias, out)
        if how.arrangement == "pixel-major":
            # oneDNN's NCHW depthwise conv reorders to a blocked layout and back; in channels_last it
            # does not (3-18 % faster per layer, 8x{128..512} channels, R 16..64). Stage 4 reads the
            # channels_last intermediate as a transposed operand.
            t = grouped_depthwise(pointwise_to_pixel_major(xs, input_factor[0]))
        else:
            t = grouped_depthwise(pointwise_matmul(xs, w_in, None)).contiguous()
        return pointwise_matmul(t, output_factor, bias, out)

    n = x.shape[0]
    if how.chunk >= n:
        return stages(x)
    y = torch.empty((n, cout, *out_size), dtype=x.dtype, device=x.device)
    for start in range(0, n, how.chunk):
        stages(x[start:start + how.chunk], y[start:start + how.chunk])
    return y
