"""The rows kernel: kh = 3, vertical stride 1 or 2, vertical dilation 1 (most CNN convs), rank up to 128.

A program owns one image, a strip of ``BLOCK_W`` output columns and a band of ``ROWS`` output rows, and walks
down the band. For each input row it computes ``u = sum_{j,c} x[c, row, iw + j] B[c,r] H[j,r]`` (stages 1 and
3: K = kw*Cin on the tensor cores), keeps the last three rows of ``u`` in registers, applies the vertical taps
to them (stage 2) and feeds the result straight into the R -> Cout GEMM (stage 4). Read top to bottom: tiles,
helper, kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from cpkernels.kernels.jit import _channel_contraction, _output_stage
from cpkernels.kernels.tiles import TileSet


# --------------------------------------------------------------------------------------------------
# Rows kernel: kh = 3, vertical stride 1 or 2, vertical dilation 1 (most CNN convs)
# --------------------------------------------------------------------------------------------------
# Only the horizontal taps go into the first contraction (K = kw*Cin); the vertical stage is a rolling
# window of three rank-R rows kept in registers while a program walks down ROWS output rows. At
# vertical stride 1 that is kw (not kh*kw) times the pointwise MACs, plus (ROWS + 2) / ROWS for the
# band's halo rows; at stride 2, 2*kw times (two new input rows per output row).
# (ROWS, BLOCK_W, BLOCK_C, BLOCK_R, BLOCK_O, num_warps, num_stages); BLOCK_R must cover the whole rank.
ROWS_TILES_16BIT = (
    (8, 64, 32, 32, 64, 4, 2),
    (8, 64, 32, 64, 64, 8, 2),
    (16, 64, 32, 64, 64, 8, 2),
    (16, 64, 32, 64, 128, 8, 2),
    (8, 32, 32, 128, 64, 8, 2),
)
ROWS_TILES_FP32 = (
    (8, 64, 16, 32, 64, 4, 2),
    (8, 64, 16, 64, 64, 8, 2),
    (8, 32, 16, 128, 64, 8, 1),
)
ROWS_TILES_INTERPRETER = ((8, 32, 32, 64, 32, 4, 1),)


ROWS_TILES = TileSet(
    ("ROWS", "BLOCK_W", "BLOCK_C", "BLOCK_R", "BLOCK_O"), ROWS_TILES_16BIT, ROWS_TILES_FP32, ROWS_TILES_INTERPRETER
)


@triton.jit
def _row_of_u(
    x_col, ih, H, iw0, mask_w, W, C_IN_G, rr, mask_r, b_grp, h_grp,
    stride_xc, stride_xh, stride_xw, stride_bc, stride_br, stride_hj, stride_hr, DIL_W,
    KW: tl.constexpr, DOT_PRECISION: tl.constexpr, OFFSET_TY: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PRECISE: tl.constexpr,
):
    """u[q, r] = sum_{j,c} x[c, ih, iw0[q] + j*DIL_W] * B[c,r] H[j,r]: stages 1 and 3 of one input row
    (``PRECISE``: each tap's ``x @ B`` exact in fp32, then scaled by H[j])."""
    # An input row outside the image masks every column (a vector test: the interpreter mishandles
    # a scalar mask broadcast into a load mask).
    in_row = mask_w & (iw0 * 0 + ih >= 0) & (iw0 * 0 + ih < H)  # [BW]
    acc = tl.zeros([BLOCK_W, BLOCK_R], dtype=tl.float32)
    for j in range(KW):
        iw = iw0 + j * DIL_W
        ok = in_row & (iw >= 0) & (iw < W)  # [BW]: masked taps are the zero padding
        h_j = tl.load(h_grp + j * stride_hj + rr * stride_hr, mask=mask_r, other=0.0).to(tl.float32)
        x_pix = x_col + ih * stride_xh + iw * stride_xw  # [BW] pointers
        if PRECISE:
            part = _channel_contraction(tl.zeros([BLOCK_W, BLOCK_R], dtype=tl.float32), x_pix, ok, C_IN_G, rr,
                                        mask_r, b_grp, h_j, stride_xc, stride_bc, stride_br, DOT_PRECISION,
                                        OFFSET_TY, BLOCK_C, SCALED=False)
            acc += h_j[None, :] * part
        else:
            acc = _channel_contraction(acc, x_pix, ok, C_IN_G, rr, mask_r, b_grp, h_j,
                                       stride_xc, stride_bc, stride_br, DOT_PRECISION, OFFSET_TY, BLOCK_C)
    return acc


@triton.autotune(
    configs=ROWS_TILES.configs(),
    key=["C_IN_G", "RANK", "C_OUT_G", "KW", "STRIDE_H", "STRIDE_W"],
    prune_configs_by={
        "early_config_prune": lambda configs, args, **_: ROWS_TILES.prune(configs, args, whole_rank=True),
    },
)
@triton.jit
def cp_conv2d_rows_kernel(
    x_ptr,  # [N, G*C_IN_G, H, W], any strides
    b_ptr,  # input factor [G, C_IN_G, RANK]
    v_ptr,  # vertical factor [G, 3, RANK]
    h_ptr,  # horizontal factor [G, KW, RANK]
    a_ptr,  # output factor [G, C_OUT_G, RANK]
    bias_ptr,  # [G*C_OUT_G], read only when HAS_BIAS
    y_ptr,  # [N, G*C_OUT_G, OH, OW], any strides
    H, W, OH, OW,
    C_IN_G, RANK, C_OUT_G,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    stride_bg, stride_bc, stride_br,
    stride_vg, stride_vi, stride_vr,
    stride_hg, stride_hj, stride_hr,
    stride_ag, stride_ao, stride_ar,
    STRIDE_W, PAD_T, PAD_L, DIL_W,
    STRIDE_H: tl.constexpr,  # vertical stride, 1 or 2 (the window keeps two rows or one)
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_INT64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PRECISE: tl.constexpr,  # 16-bit inputs: exact taps, z into the output GEMM as hi + lo (see _dot_z)
    ROWS: tl.constexpr,  # output rows per program: the band walked by the rolling window
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
):
    OFFSET_TY: tl.constexpr = tl.int64 if USE_INT64 else tl.int32
    pid = tl.program_id(0).to(OFFSET_TY)
    group = tl.program_id(2).to(OFFSET_TY)
    strips = tl.cdiv(OW, BLOCK_W)
    bands = tl.cdiv(OH, ROWS)
    strip = pid % strips
    band = (pid // strips) % bands
    n = pid // (strips * bands)

    ow = strip * BLOCK_W + tl.arange(0, BLOCK_W).to(OFFSET_TY)  # [BW] output columns
    mask_w = ow < OW
    iw0 = ow * STRIDE_W - PAD_L
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < RANK
    x_col = x_ptr + n * stride_xn + group * C_IN_G * stride_xc
    b_grp = b_ptr + group * stride_bg
    h_grp = h_ptr + group * stride_hg
    a_grp = a_ptr + group * stride_ag
    v_grp = v_ptr + group * stride_vg
    v0 = tl.load(v_grp + rr * stride_vr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    v1 = tl.load(v_grp + stride_vi + rr * stride_vr, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    v2 = tl.load(v_grp + 2 * stride_vi + rr * stride_vr, mask=mask_r, other=0.0).to(tl.float32)[None, :]

    p0 = band * ROWS
    ih0 = p0 * STRIDE_H - PAD_T  # input row of tap 0 for output row p0
    # The window of three input rows (output row p reads rows p*STRIDE_H - PAD_T + 0, 1, 2): with
    # stride 1 consecutive output rows share two rows, with stride 2 one.
    u_top = _row_of_u(x_col, ih0, H, iw0, mask_w, W, C_IN_G, rr, mask_r, b_grp, h_grp,
                      stride_xc, stride_xh, stride_xw, stride_bc, stride_br, stride_hj, stride_hr, DIL_W,
                      KW, DOT_PRECISION, OFFSET_TY, BLOCK_W, BLOCK_C, BLOCK_R, PRECISE)
    if STRIDE_H == 1:
        u_mid = _row_of_u(x_col, ih0 + 1, H, iw0, mask_w, W, C_IN_G, rr, mask_r, b_grp, h_grp,
                          stride_xc, stride_xh, stride_xw, stride_bc, stride_br, stride_hj, stride_hr, DIL_W,
                          KW, DOT_PRECISION, OFFSET_TY, BLOCK_W, BLOCK_C, BLOCK_R, PRECISE)
    for t in range(ROWS):
        row0 = ih0 + t * STRIDE_H
        if STRIDE_H != 1:
            u_mid = _row_of_u(x_col, row0 + 1, H, iw0, mask_w, W, C_IN_G, rr, mask_r, b_grp, h_grp,
                              stride_xc, stride_xh, stride_xw, stride_bc, stride_br, stride_hj, stride_hr, DIL_W,
                              KW, DOT_PRECISION, OFFSET_TY, BLOCK_W, BLOCK_C, BLOCK_R, PRECISE)
        u_bot = _row_of_u(x_col, row0 + 2, H, iw0, mask_w, W, C_IN_G, rr, mask_r, b_grp, h_grp,
                          stride_xc, stride_xh, stride_xw, stride_bc, stride_br, stride_hj, stride_hr, DIL_W,
                          KW, DOT_PRECISION, OFFSET_TY, BLOCK_W, BLOCK_C, BLOCK_R, PRECISE)
        # Stage 2, the vertical taps, on the three rows in registers: [BW, BR]
        z = v0 * u_top + v1 * u_mid + v2 * u_bot
        p = p0 + t
        row_ok = mask_w & (ow * 0 + p < OH)  # vector test, as in _row_of_u
        y_row = y_ptr + n * stride_yn + p * stride_yh + ow * stride_yw  # [BW] pointers
        _output_stage(z, rr, mask_r, a_grp, stride_ao, stride_ar, bias_ptr, y_row, row_ok, stride_yc,
                      group * C_OUT_G, C_OUT_G, HAS_BIAS, DOT_PRECISION, OFFSET_TY, BLOCK_O, PRECISE)
        if STRIDE_H == 1:
            u_top = u_mid
            u_mid = u_bot
        else:
            u_top = u_bot
