"""The wide kernel: any shape and rank, made for the ranks trained networks need (R > 128), where the rows
kernel's register window does not fit. Read top to bottom: tiles, geometry, kernel."""
from __future__ import annotations

import triton
import triton.language as tl

from cpkernels.kernels.jit import _channel_contraction, _dot_z
from cpkernels.kernels.tiles import TileSet


# --------------------------------------------------------------------------------------------------
# Wide kernel: any rank (made for R > 128, where the rows kernel's register window does not fit)
# --------------------------------------------------------------------------------------------------
# Stage 1 (K = Cin, once per input pixel) goes to a program-private fp32 ring of input rows in global
# memory, small enough to stay in L2 and re-read from L1; stages 2-3 (kh*kw FMAs per element) read it
# shifted, and stage 4 accumulates the output over rank slices, so no contraction is ever repeated
# and the rank-R intermediate reaches the output GEMM in fp32 (split into two 16-bit halves for
# 16-bit inputs: the terms of a trained layer cancel, and rounding z to bf16 is what costs precision).
# (ROWS, STEP, BLOCK_W, BLOCK_M, BLOCK_C, BLOCK_R, BLOCK_O, num_warps, num_stages)
WIDE_TILES_16BIT = (
    (8, 4, 16, 64, 32, 64, 128, 8, 2),
    (16, 4, 16, 64, 32, 64, 128, 8, 2),
    (8, 4, 16, 64, 64, 64, 128, 8, 2),
    (8, 2, 32, 64, 32, 64, 128, 8, 2),
    # One step per band (the ring is the band), 128-pixel output GEMMs: the factors are re-read per 128
    # pixels instead of 64, and stage 1 runs in whole 128-pixel tiles (docs/kernel.md, the wide kernel).
    (8, 8, 16, 128, 32, 16, 128, 8, 2),
)
# The same with 256 output channels per block (the ring read half as often at 512 channels); its
# [128, 256] fp32 accumulator compiles without spills on sm_90 only.
WIDE_TILES_16BIT_SM90 = ((8, 8, 16, 128, 32, 16, 256, 8, 2),)
WIDE_TILES_FP32 = (
    (8, 4, 16, 64, 32, 32, 128, 8, 2),
    (16, 4, 16, 64, 32, 32, 128, 8, 2),
    (8, 4, 16, 64, 32, 32, 256, 8, 2),
    (8, 2, 32, 64, 32, 64, 128, 8, 2),
)
WIDE_TILES_INTERPRETER = ((4, 2, 8, 64, 32, 64, 64, 4, 1),)

WIDE_TILES = TileSet(
    ("ROWS", "STEP", "BLOCK_W", "BLOCK_M", "BLOCK_C", "BLOCK_R", "BLOCK_O"),
    WIDE_TILES_16BIT, WIDE_TILES_FP32, WIDE_TILES_INTERPRETER, WIDE_TILES_16BIT_SM90,
)


def wide_geometry(kernel_size, stride, dilation, step: int, block_w: int) -> tuple[int, int]:
    """``(RING, BW_IN)``: input rows and input columns one program's ring holds (a step of ``step``
    output rows reads ``RING`` input rows; ``block_w`` output columns read ``BW_IN`` input columns)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    return (step - 1) * sh + (kh - 1) * dh + 1, (block_w - 1) * sw + (kw - 1) * dw + 1


@triton.autotune(
    configs=WIDE_TILES.configs(),
    key=["C_IN_G", "RANK", "C_OUT_G", "KH", "KW", "STRIDE_H", "STRIDE_W"],
    prune_configs_by={"early_config_prune": WIDE_TILES.prune},
)
@triton.heuristics({
    "RING": lambda a: (a["STEP"] - 1) * a["STRIDE_H"] + (a["KH"] - 1) * a["DIL_H"] + 1,
    "BW_IN": lambda a: (a["BLOCK_W"] - 1) * a["STRIDE_W"] + (a["KW"] - 1) * a["DIL_W"] + 1,
})
@triton.jit
def cp_conv2d_wide_kernel(
    x_ptr,  # [N, G*C_IN_G, H, W], any strides
    b_ptr,  # input factor [G, C_IN_G, RANK]
    v_ptr,  # vertical factor [G, KH, RANK]
    h_ptr,  # horizontal factor [G, KW, RANK]
    a_ptr,  # output factor [G, C_OUT_G, RANK]
    bias_ptr,  # [G*C_OUT_G], read only when HAS_BIAS
    y_ptr,  # [N, G*C_OUT_G, OH, OW], any strides
    u_ptr,  # fp32 scratch: [programs * G, RING, BW_IN, RANK], one ring per program of the grid
    H, W, OH, OW,
    C_IN_G, RANK, C_OUT_G,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    stride_bg, stride_bc, stride_br,
    stride_vg, stride_vi, stride_vr,
    stride_hg, stride_hj, stride_hr,
    stride_ag, stride_ao, stride_ar,
    PAD_T, PAD_L,
    N,  # images: the grid's programs share N * bands * strips work items
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_INT64: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PRECISE: tl.constexpr,  # 16-bit inputs: z into the output GEMM as hi + lo (see _dot_z)
    ROWS: tl.constexpr,  # output rows per work item: the band the ring walks down
    STEP: tl.constexpr,  # output rows per step (M of the output GEMM is STEP * BLOCK_W)
    BLOCK_W: tl.constexpr,  # output columns per work item
    BLOCK_M: tl.constexpr,  # input pixels per stage-1 GEMM tile
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
    RING: tl.constexpr, BW_IN: tl.constexpr,  # from wide_geometry
):
    OFFSET_TY: tl.constexpr = tl.int64 if USE_INT64 else tl.int32
    pid = tl.program_id(0).to(OFFSET_TY)
    programs = tl.num_programs(0).to(OFFSET_TY)
    group = tl.program_id(2).to(OFFSET_TY)
    strips = tl.cdiv(OW, BLOCK_W)
    bands = tl.cdiv(OH, ROWS)
    u_prog = u_ptr + (group * programs + pid) * (RING * BW_IN * RANK)  # this program's ring
    b_grp = b_ptr + group * stride_bg
    v_grp = v_ptr + group * stride_vg
    h_grp = h_ptr + group * stride_hg
    a_grp = a_ptr + group * stride_ag
    offs_m = tl.arange(0, BLOCK_M).to(OFFSET_TY)
    offs_q = tl.arange(0, STEP * BLOCK_W).to(OFFSET_TY)  # output pixels of a step: STEP rows x BLOCK_W
    t_q = offs_q // BLOCK_W
    q_q = offs_q % BLOCK_W
    offs_rs = tl.arange(0, BLOCK_R)

    for work in range(pid, N * strips * bands, programs):  # a persistent grid: few rings, kept hot
        strip = work % strips
        band = (work // strips) % bands
        n = work // (strips * bands)
        p_band = band * ROWS  # first output row of the band
        ow0 = strip * BLOCK_W
        ih_band = p_band * STRIDE_H - PAD_T  # input row of ring row 0
        iw_strip = ow0 * STRIDE_W - PAD_L  # input column of ring column 0
        x_img = x_ptr + n * stride_xn + group * C_IN_G * stride_xc
        steps = tl.cdiv(tl.minimum(OH - p_band, ROWS), STEP)
        for s in range(0, steps):
            # Ring rows this step reads: k_lo .. k_hi (relative to the band); the earlier ones are there.
            k_lo = s * STEP * STRIDE_H
            k_hi = k_lo + RING - 1
            k_first = k_lo
            if s > 0:
                k_first = tl.maximum(k_lo, k_hi - STEP * STRIDE_H + 1)
            new_pixels = (k_hi - k_first + 1) * BW_IN
            # Stage 1 of the new input rows, K = Cin: [BM, BC] @ [BC, BR] -> [BM, BR] into the ring.
            for m0 in range(0, new_pixels, BLOCK_M):
                m = m0 + offs_m
                k = k_first + m // BW_IN
                col = m % BW_IN
                ih = ih_band + k
                iw = iw_strip + col
                ok = (m < new_pixels) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # zeros: the padding
                x_pix = x_img + ih * stride_xh + iw * stride_xw
                u_row = u_prog + ((k % RING) * BW_IN + col) * RANK  # [BM] ring addresses
                for r0 in range(0, RANK, BLOCK_R):
                    rr = r0 + offs_rs
                    mask_r = rr < RANK
                    u = _channel_contraction(
                        tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32), x_pix, ok, C_IN_G, rr, mask_r, b_grp,
                        mask_r, stride_xc, stride_bc, stride_br, DOT_PRECISION, OFFSET_TY, BLOCK_C, SCALED=False,
                    )
                    tl.store(u_row[:, None] + rr[None, :], u, mask=(m < new_pixels)[:, None] & mask_r[None, :])
            tl.debug_barrier()  # the ring rows written above are read by other threads below

            # Stages 2-4 for STEP output rows: z = sum_ij V[i]H[j] u[shifted] (fp32), y = z @ A + bias.
            p = p_band + s * STEP + t_q  # [SB] output rows
            ow = ow0 + q_q  # [SB] output columns
            out_ok = (p < OH) & (p < p_band + ROWS) & (ow < OW)
            y_pix = y_ptr + n * stride_yn + p * stride_yh + ow * stride_yw
            for o0 in range(0, C_OUT_G, BLOCK_O):
                offs_o = o0 + tl.arange(0, BLOCK_O).to(OFFSET_TY)
                mask_o = offs_o < C_OUT_G
                acc_y = tl.zeros([STEP * BLOCK_W, BLOCK_O], dtype=tl.float32)
                for r0 in range(0, RANK, BLOCK_R):
                    rr = r0 + offs_rs
                    mask_r = rr < RANK
                    z = tl.zeros([STEP * BLOCK_W, BLOCK_R], dtype=tl.float32)
                    # A runtime loop over the taps: one tap's addresses live at a time (unrolled, the
                    # kh*kw gathers spilled at every tile).
                    for tap in range(KH * KW):
                        i = tap // KW
                        j = tap % KW
                        v_i = tl.load(v_grp + i * stride_vi + rr * stride_vr, mask=mask_r, other=0.0)
                        h_j = tl.load(h_grp + j * stride_hj + rr * stride_hr, mask=mask_r, other=0.0)
                        vh = v_i.to(tl.float32) * h_j.to(tl.float32)  # [BR]: tap (i, j), never rounded
                        ring_pix = ((k_lo + t_q * STRIDE_H + i * DIL_H) % RING) * BW_IN + q_q * STRIDE_W + j * DIL_W
                        u = tl.load(u_prog + ring_pix[:, None] * RANK + rr[None, :], mask=mask_r[None, :], other=0.0)
                        z += vh[None, :] * u  # [SB, BR]
                    a = tl.load(
                        a_grp + offs_o[None, :] * stride_ao + rr[:, None] * stride_ar,
                        mask=mask_r[:, None] & mask_o[None, :], other=0.0,
                    )  # [BR, BO]
                    acc_y = _dot_z(z, a, acc_y, DOT_PRECISION, PRECISE)  # [SB, BR] @ [BR, BO] -> [SB, BO]
                if HAS_BIAS:
                    acc_y += tl.load(bias_ptr + group * C_OUT_G + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
                y_ptrs = y_pix[:, None] + (group * C_OUT_G + offs_o)[None, :] * stride_yc
                tl.store(y_ptrs, acc_y.to(y_ptr.dtype.element_ty), mask=out_ok[:, None] & mask_o[None, :])
            tl.debug_barrier()  # every thread is done reading the ring before the next step overwrites it
