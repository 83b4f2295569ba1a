"""The ``@triton.jit`` helpers that several kernels share: the channel contraction (stage 1, and stage 3 folded
into it), the fp32 intermediate into a 16-bit GEMM, and the output stage."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _channel_contraction(
    acc, x_pix, pix_ok, C_IN_G, rr, mask_r, b_grp, tap_scale, stride_xc, stride_bc, stride_br,
    DOT_PRECISION: tl.constexpr, OFFSET_TY: tl.constexpr, BLOCK_C: tl.constexpr, SCALED: tl.constexpr = True,
):
    """acc[p, r] += sum_c x[p, c] * B[c, r] * tap_scale[r], over every input channel of the group.

    ``x_pix`` [BP] points at channel 0 of each pixel's (shifted) input, ``pix_ok`` [BP] masks pixels
    outside the image (the zero padding); ``tap_scale`` [BR] is the tap's depthwise weight per rank.
    ``SCALED=False``: plain ``x @ B`` (``tap_scale`` unused), every product exact in the fp32 accumulator.
    """
    offs_c = tl.arange(0, BLOCK_C).to(OFFSET_TY)
    for c0 in range(0, C_IN_G, BLOCK_C):
        cc = c0 + offs_c
        mask_c = cc < C_IN_G
        x = tl.load(
            x_pix[:, None] + cc[None, :] * stride_xc, mask=pix_ok[:, None] & mask_c[None, :], other=0.0
        )  # [BP, BC]
        b = tl.load(
            b_grp + cc[:, None] * stride_bc + rr[None, :] * stride_br,
            mask=mask_c[:, None] & mask_r[None, :], other=0.0,
        )  # [BC, BR]
        if SCALED:
            # The tap folded into B, rounded once to the input dtype: [BC, BR]
            b = (b.to(tl.float32) * tap_scale[None, :]).to(x.dtype)
        # [BP, BC] @ [BC, BR] -> [BP, BR]
        acc = tl.dot(x, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _dot_z(z, a, acc, DOT_PRECISION: tl.constexpr, PRECISE: tl.constexpr):
    """acc += z @ a for fp32 ``z`` [BP, BR] and ``a`` [BR, BO] in the factors' dtype. ``PRECISE``: z enters
    as two 16-bit halves (hi + lo, ~16 mantissa bits): the terms of trained layers cancel, and rounding z
    once to 16 bits is what costs a CP layer its precision. Otherwise z is rounded once, as the four
    stages round their stored intermediates."""
    z_hi = z.to(a.dtype)
    # [BP, BR] @ [BR, BO] -> [BP, BO]
    acc = tl.dot(z_hi, a, acc, input_precision=DOT_PRECISION)
    if PRECISE:
        acc = tl.dot((z - z_hi.to(tl.float32)).to(a.dtype), a, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _output_stage(
    z, rr, mask_r, a_grp, stride_ao, stride_ar, bias_ptr, y_pix, mask_pix, stride_yc, o_first, C_OUT_G,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, OFFSET_TY: tl.constexpr, BLOCK_O: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """Stage 4 for a tile of pixels, every output-channel block: y[p, o] = z[p, :] . A[o, :] + bias[o].

    ``z`` [BP, BR] in fp32; ``y_pix`` [BP] output pointers at channel 0; ``o_first`` the group's first
    output channel."""
    for o0 in range(0, C_OUT_G, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O).to(OFFSET_TY)
        mask_o = offs_o < C_OUT_G
        a = tl.load(
            a_grp + offs_o[None, :] * stride_ao + rr[:, None] * stride_ar,
            mask=mask_r[:, None] & mask_o[None, :], other=0.0,
        )  # [BR, BO]
        acc_y = _dot_z(z, a, tl.zeros([z.shape[0], BLOCK_O], dtype=tl.float32), DOT_PRECISION, PRECISE)
        if HAS_BIAS:
            acc_y += tl.load(bias_ptr + o_first + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_pix[:, None] + (o_first + offs_o)[None, :] * stride_yc
        tl.store(y_ptrs, acc_y.to(y_pix.dtype.element_ty), mask=mask_pix[:, None] & mask_o[None, :])
