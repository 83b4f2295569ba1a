"""The taps kernel: any kernel size, stride and dilation, ranks up to its whole-rank tiles.

Since stage 1 has no bias, the two depthwise stages equal one kh x kw depthwise conv with taps
``V[i,r] H[j,r]``, which commute into the first contraction::

    z[p, r] = sum_{i,j,c} x[c, ih(p,i), iw(p,j)] * (B[c,r] V[i,r] H[j,r])      # implicit GEMM, K = kh*kw*Cin
    y[p, o] = sum_r z[p, r] A[o, r] + bias[o]                                   # GEMM, K = R

A program owns ``BLOCK_P`` output pixels (flattened over N, OH, OW) and accumulates ``z`` over the taps and
input channels (``[BP, BC] @ [BC, BR]``, the tap-scaled ``B`` tile built in registers), then feeds it into
``[BP, BR] @ [BR, BO]``. With ``FOLDED`` the per-tap weights come pre-folded (Tucker-2's
``T_ij = U_in core[:, :, i, j]^T``) and the tap scaling is skipped. Read top to bottom: tiles, helpers, kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from cpkernels.kernels.jit import _channel_contraction, _dot_z, _output_stage
from cpkernels.kernels.tiles import TileSet

# (BLOCK_P, BLOCK_C, BLOCK_R, BLOCK_O, num_warps, num_stages). Every block is a power of two >= 16
# (tl.dot's minimum). Each set holds only tiles that compile without register spills for sm_80 and
# sm_90, on both rank paths (``python -m cpkernels.tools.aot``); 4-warp tiles and BLOCK_O = 256 all
# spilled, and so did the 16-bit BLOCK_R = 128 tiles once 16-bit inputs kept z exact (PRECISE): ranks
# above 64 in 16 bits go to the wide kernel.
TILES_16BIT = (
    (64, 32, 64, 64, 8, 2),
    (64, 32, 32, 128, 8, 3),
    (64, 32, 64, 128, 8, 3),
    (64, 16, 32, 128, 8, 2),
    (128, 16, 32, 64, 8, 2),
)
TILES_FP32 = (
    (64, 32, 64, 64, 8, 2),
    (64, 32, 32, 128, 8, 3),
    (64, 16, 32, 128, 8, 2),
    (128, 16, 32, 64, 8, 2),
    (64, 16, 128, 64, 8, 2),
)
# The interpreter's cost is per program and per loop iteration, so it gets one large-block config.
TILES_INTERPRETER = ((64, 32, 32, 32, 4, 1),)

TAPS_TILES = TileSet(("BLOCK_P", "BLOCK_C", "BLOCK_R", "BLOCK_O"), TILES_16BIT, TILES_FP32, TILES_INTERPRETER)


@triton.jit
def _rank_slice(
    x_rows, pix_m, ih0, iw0, H, W, C_IN_G, RANK, r0,
    b_grp, v_grp, h_grp,
    stride_xc, stride_xh, stride_xw, stride_bt, stride_bc, stride_br, stride_vi, stride_vr, stride_hj, stride_hr,
    DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, DOT_PRECISION: tl.constexpr, OFFSET_TY: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PRECISE: tl.constexpr,
    FOLDED: tl.constexpr,
):
    """z[p, r] for ranks r0 .. r0 + BLOCK_R: stages 1-3 of BLOCK_P output pixels, in fp32 registers.
    ``PRECISE``: each tap's ``x @ B`` is exact in fp32 and scaled there, instead of folding the tap into
    a B rounded to the input dtype. ``FOLDED``: ``b_grp`` holds one pre-folded ``[C_IN_G, RANK]`` weight
    per tap (``stride_bt`` apart), read as it is; ``v_grp`` and ``h_grp`` are not read."""
    rr = r0 + tl.arange(0, BLOCK_R)
    mask_r = rr < RANK
    acc_z = tl.zeros([BLOCK_P, BLOCK_R], dtype=tl.float32)
    # Taps outside, channels inside: each tap is one pipelined K-loop with a single dot, which keeps
    # one tap's addresses live at a time (unrolling the taps inside the channel loop spilled at
    # every tile size).
    for tap in range(KH * KW):
        i = tap // KW
        j = tap % KW
        ih = ih0 + i * DIL_H
        iw = iw0 + j * DIL_W
        pix_ok = pix_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # [BP]: masked taps are the zero padding
        x_pix = x_rows + ih * stride_xh + iw * stride_xw  # [BP] pointers
        if FOLDED:
            # The tap's own weight: every product exact in the fp32 accumulator, nothing to scale.
            acc_z = _channel_contraction(acc_z, x_pix, pix_ok, C_IN_G, rr, mask_r, b_grp + tap * stride_bt, mask_r,
                                         stride_xc, stride_bc, stride_br, DOT_PRECISION, OFFSET_TY, BLOCK_C,
                                         SCALED=False)
        else:
            acc_z = _cp_tap(acc_z, x_pix, pix_ok, C_IN_G, rr, mask_r, b_grp, v_grp, h_grp, i, j, stride_xc,
                            stride_bc, stride_br, stride_vi, stride_vr, stride_hj, stride_hr, DOT_PRECISION,
                            OFFSET_TY, BLOCK_P, BLOCK_C, BLOCK_R, PRECISE)
    return acc_z


@triton.jit
def _cp_tap(
    acc_z, x_pix, pix_ok, C_IN_G, rr, mask_r, b_grp, v_grp, h_grp, i, j,
    stride_xc, stride_bc, stride_br, stride_vi, stride_vr, stride_hj, stride_hr,
    DOT_PRECISION: tl.constexpr, OFFSET_TY: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PRECISE: tl.constexpr,
):
    """acc_z += tap (i, j) of the CP form: the shifted input times B, scaled by V[i] H[j] per rank."""
    v_i = tl.load(v_grp + i * stride_vi + rr * stride_vr, mask=mask_r, other=0.0).to(tl.float32)
    h_j = tl.load(h_grp + j * stride_hj + rr * stride_hr, mask=mask_r, other=0.0).to(tl.float32)
    vh = v_i * h_j  # [BR]: tap (i, j) of the merged depthwise filter
    if PRECISE:
        part = _channel_contraction(tl.zeros([BLOCK_P, BLOCK_R], dtype=tl.float32), x_pix, pix_ok, C_IN_G,
                                    rr, mask_r, b_grp, vh, stride_xc, stride_bc, stride_br, DOT_PRECISION,
                                    OFFSET_TY, BLOCK_C, SCALED=False)
        acc_z += vh[None, :] * part
    else:
        acc_z = _channel_contraction(acc_z, x_pix, pix_ok, C_IN_G, rr, mask_r, b_grp, vh,
                                     stride_xc, stride_bc, stride_br, DOT_PRECISION, OFFSET_TY, BLOCK_C)
    return acc_z


@triton.autotune(
    configs=TAPS_TILES.configs(),
    key=["C_IN_G", "RANK", "C_OUT_G", "KH", "KW", "STRIDE_H", "STRIDE_W", "FOLDED"],
    prune_configs_by={"early_config_prune": TAPS_TILES.prune},
)
@triton.heuristics({"WHOLE_RANK": lambda args: args["BLOCK_R"] >= args["RANK"]})
@triton.jit
def cp_conv2d_taps_kernel(
    x_ptr,  # [N, G*C_IN_G, H, W], any strides
    b_ptr,  # input factor [G, C_IN_G, RANK]; FOLDED: per-tap weights [G, KH*KW, C_IN_G, RANK]
    v_ptr,  # vertical factor [G, KH, RANK] (not read when FOLDED)
    h_ptr,  # horizontal factor [G, KW, RANK] (not read when FOLDED)
    a_ptr,  # output factor [G, C_OUT_G, RANK]
    bias_ptr,  # [G*C_OUT_G], read only when HAS_BIAS
    y_ptr,  # [N, G*C_OUT_G, OH, OW], any strides
    M,  # N * OH * OW: the flattened output pixels
    H, W, OH, OW,
    C_IN_G, RANK, C_OUT_G,  # input channels per group, rank, output channels per group
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    stride_bg, stride_bt, stride_bc, stride_br,  # stride_bt: between taps, FOLDED only
    stride_vg, stride_vi, stride_vr,
    stride_hg, stride_hj, stride_hr,
    stride_ag, stride_ao, stride_ar,
    STRIDE_H, STRIDE_W,  # conv stride
    PAD_T, PAD_L,  # top/left zero padding (bottom/right only shape OH/OW)
    DIL_H, DIL_W,  # conv dilation
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_INT64: tl.constexpr,  # 64-bit offsets: some tensor has more than 2**31 - 1 elements
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee", for fp32 inputs
    WHOLE_RANK: tl.constexpr,  # BLOCK_R >= RANK: z is computed once, output channels loop inside
    PRECISE: tl.constexpr,  # 16-bit inputs: exact taps, z into the output GEMM as hi + lo (see _dot_z)
    FOLDED: tl.constexpr,  # b_ptr holds pre-folded per-tap weights (Tucker-2: input factor x core)
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):
    OFFSET_TY: tl.constexpr = tl.int64 if USE_INT64 else tl.int32
    pid_p = tl.program_id(0).to(OFFSET_TY)
    pid_o = tl.program_id(1).to(OFFSET_TY)
    group = tl.program_id(2).to(OFFSET_TY)
    offs_m = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BP] flattened output pixels
    mask_m = offs_m < M

    # Output pixel -> (n, oh, ow) and its top-left input tap.
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    n = offs_m // (OW * OH)
    ih0 = oh * STRIDE_H - PAD_T
    iw0 = ow * STRIDE_W - PAD_L

    x_rows = x_ptr + n * stride_xn + group * C_IN_G * stride_xc  # [BP] pointers
    b_grp = b_ptr + group * stride_bg
    v_grp = v_ptr + group * stride_vg
    h_grp = h_ptr + group * stride_hg
    a_grp = a_ptr + group * stride_ag
    y_rows = y_ptr + n * stride_yn + oh * stride_yh + ow * stride_yw  # [BP] pointers

    if WHOLE_RANK:
        # The whole rank fits one slice: z is computed once and every output-channel block reuses it,
        # so the first contraction is never repeated. Grid axis 1 has a single program.
        rr = tl.arange(0, BLOCK_R)
        mask_r = rr < RANK
        z = _rank_slice(
            x_rows, mask_m, ih0, iw0, H, W, C_IN_G, RANK, 0, b_grp, v_grp, h_grp,
            stride_xc, stride_xh, stride_xw, stride_bt, stride_bc, stride_br, stride_vi, stride_vr, stride_hj,
            stride_hr, DIL_H, DIL_W, KH, KW, DOT_PRECISION, OFFSET_TY, BLOCK_P, BLOCK_C, BLOCK_R, PRECISE, FOLDED,
        )
        _output_stage(z, rr, mask_r, a_grp, stride_ao, stride_ar, bias_ptr, y_rows, mask_m, stride_yc,
                      group * C_OUT_G, C_OUT_G, HAS_BIAS, DOT_PRECISION, OFFSET_TY, BLOCK_O, PRECISE)
    else:
        # Larger ranks: this program owns one output-channel block and walks the rank in slices.
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O).to(OFFSET_TY)
        mask_o = offs_o < C_OUT_G
        acc_y = tl.zeros([BLOCK_P, BLOCK_O], dtype=tl.float32)
        for r0 in range(0, RANK, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mask_r = rr < RANK
            z = _rank_slice(
                x_rows, mask_m, ih0, iw0, H, W, C_IN_G, RANK, r0, b_grp, v_grp, h_grp,
                stride_xc, stride_xh, stride_xw, stride_bt, stride_bc, stride_br, stride_vi, stride_vr, stride_hj,
                stride_hr, DIL_H, DIL_W, KH, KW, DOT_PRECISION, OFFSET_TY, BLOCK_P, BLOCK_C, BLOCK_R, PRECISE, FOLDED,
            )
            a = tl.load(
                a_grp + offs_o[None, :] * stride_ao + rr[:, None] * stride_ar,
                mask=mask_r[:, None] & mask_o[None, :], other=0.0,
            )  # [BR, BO]
            acc_y = _dot_z(z, a, acc_y, DOT_PRECISION, PRECISE)  # [BP, BR] @ [BR, BO] -> [BP, BO]
        if HAS_BIAS:
            acc_y += tl.load(bias_ptr + group * C_OUT_G + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_rows[:, None] + (group * C_OUT_G + offs_o)[None, :] * stride_yc
        tl.store(y_ptrs, acc_y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_o[None, :])
