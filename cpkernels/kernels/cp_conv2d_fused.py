"""The fused CP conv: all four CP stages in one Triton launch.

Two kernels behind one launcher, :func:`cp_conv2d_fused`:

- ``rows`` (kh = 3, vertical stride 1 or 2, vertical dilation 1: most CNN convs; preferred where it applies).
  A program owns one image, a strip of ``BLOCK_W`` output columns and a band of ``ROWS`` output rows,
  and walks down the band. For each input row it computes ``u = sum_{j,c} x[c, row, iw + j] B[c,r] H[j,r]``
  (stages 1 and 3: K = kw*Cin on the tensor cores), keeps the last three rows of ``u`` in registers,
  applies the vertical taps to them (stage 2) and feeds the result straight into the R -> Cout GEMM
  (stage 4). kw (not kh*kw) times the pointwise MACs.
- ``taps`` (everything else). Since stage 1 has no bias, the two depthwise stages equal one
  kh x kw depthwise conv with taps ``V[i,r] H[j,r]``, which commute into the first contraction::

      z[p, r] = sum_{i,j,c} x[c, ih(p,i), iw(p,j)] * (B[c,r] V[i,r] H[j,r])      # implicit GEMM, K = kh*kw*Cin
      y[p, o] = sum_r z[p, r] A[o, r] + bias[o]                                   # GEMM, K = R

  A program owns ``BLOCK_P`` output pixels (flattened over N, OH, OW) and accumulates ``z`` over the
  taps and input channels (``[BP, BC] @ [BC, BR]``, the tap-scaled ``B`` tile built in registers),
  then feeds it into ``[BP, BR] @ [BR, BO]``.

In both, the rank-R intermediates live only in registers, out-of-image taps are masked to zero (the
zero padding; exact because stage 1 has no bias), and every tensor is read through its strides. Read
top to bottom: configs and kernel of ``taps``, then of ``rows``, then the launcher. The op (custom op,
autograd) is :mod:`cpkernels.ops.cp_conv2d`; the design and its roofline are in ``docs/kernel.md``.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import conv_args
from ..ops.cp_conv2d import triton_interpreter_enabled

INT32_MAX = 2**31 - 1

# --------------------------------------------------------------------------------------------------
# Tile configs
# --------------------------------------------------------------------------------------------------
# (BLOCK_P, BLOCK_C, BLOCK_R, BLOCK_O, num_warps, num_stages). Every block is a power of two >= 16
# (tl.dot's minimum). Each set holds only tiles that compile without register spills for sm_80 and
# sm_90, on both rank paths (``python -m cpkernels.kernels.aot``); 4-warp tiles and BLOCK_O = 256 all
# spilled. BLOCK_R = 128 tiles let ranks up to 128 take the whole-rank path.
TILES_16BIT = (
    (128, 32, 32, 64, 8, 3),
    (64, 32, 64, 64, 8, 2),
    (64, 32, 32, 128, 8, 3),
    (64, 32, 64, 128, 8, 3),
    (64, 16, 32, 128, 8, 2),
    (128, 16, 32, 64, 8, 2),
    (64, 32, 128, 64, 8, 2),
    (64, 16, 128, 64, 8, 2),
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


class TileSet:
    """The tile tables of one kernel and the autotune configs made from them.

    A tile is the kernel's meta-parameters in ``names`` order, then ``num_warps`` and ``num_stages``.
    """

    def __init__(self, names, tiles_16bit, tiles_fp32, tiles_interpreter):
        self.names = names
        self.tiles_16bit, self.tiles_fp32, self.tiles_interpreter = tiles_16bit, tiles_fp32, tiles_interpreter

    def for_dtype(self, dtype: torch.dtype) -> tuple[tuple[int, ...], ...]:
        """The tiles autotuned for an input dtype (one large-block tile under the interpreter)."""
        if triton_interpreter_enabled():
            return self.tiles_interpreter
        return self.tiles_fp32 if dtype == torch.float32 else self.tiles_16bit

    def configs(self) -> list[triton.Config]:
        """Every config the autotuner may try; :meth:`prune` keeps the input dtype's."""
        if triton_interpreter_enabled():
            tiles = self.tiles_interpreter
        else:
            tiles = dict.fromkeys(self.tiles_16bit + self.tiles_fp32)
        return [
            triton.Config(dict(zip(self.names, t[:-2])), num_warps=t[-2], num_stages=t[-1]) for t in tiles
        ]

    def tile_of(self, config: triton.Config) -> tuple[int, ...]:
        return (*(config.kwargs[n] for n in self.names), config.num_warps, config.num_stages)

    def prune(self, configs, named_args, whole_rank: bool = False):
        """The dtype's tiles (those whose BLOCK_R covers the rank, if ``whole_rank``), minus tiles far wider
        than the problem: they only add masked work."""
        wanted = set(self.for_dtype(named_args["x_ptr"].dtype))
        rank = named_args["RANK"]
        configs = [
            c for c in configs if self.tile_of(c) in wanted and (not whole_rank or c.kwargs["BLOCK_R"] >= rank)
        ]

        def fits(c):
            k = c.kwargs
            return (
                k["BLOCK_R"] <= max(16, triton.next_power_of_2(rank))
                and k["BLOCK_O"] <= max(16, triton.next_power_of_2(named_args["C_OUT_G"]))
                and k["BLOCK_C"] <= max(16, triton.next_power_of_2(named_args["C_IN_G"]))
            )

        fitting = [c for c in configs if fits(c)]
        if not fitting and configs:
            fitting = [min(configs, key=lambda c: c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_C"])]
        return fitting if autotune_enabled() else fitting[:1]


def autotune_enabled() -> bool:
    """``CPKERNELS_AUTOTUNE=0`` takes the first fitting tile instead of timing them all: every tile
    is a compile of a few seconds, so a test suite on a GPU would spend most of its time compiling."""
    return os.environ.get("CPKERNELS_AUTOTUNE", "1") != "0"


TAPS_TILES = TileSet(("BLOCK_P", "BLOCK_C", "BLOCK_R", "BLOCK_O"), TILES_16BIT, TILES_FP32, TILES_INTERPRETER)


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _channel_contraction(
    acc, x_pix, pix_ok, C_IN_G, rr, mask_r, b_grp, tap_scale, stride_xc, stride_bc, stride_br,
    DOT_PRECISION: tl.constexpr, OFFSET_TY: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """acc[p, r] += sum_c x[p, c] * B[c, r] * tap_scale[r], over every input channel of the group.

    ``x_pix`` [BP] points at channel 0 of each pixel's (shifted) input, ``pix_ok`` [BP] masks pixels
    outside the image (the zero padding); ``tap_scale`` [BR] is the tap's depthwise weight per rank.
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
        # The tap folded into B, rounded once to the input dtype: [BC, BR]
        w_tap = (b.to(tl.float32) * tap_scale[None, :]).to(x.dtype)
        # [BP, BC] @ [BC, BR] -> [BP, BR]
        acc = tl.dot(x, w_tap, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _rank_slice(
    x_rows, pix_m, ih0, iw0, H, W, C_IN_G, RANK, r0,
    b_grp, v_grp, h_grp,
    stride_xc, stride_xh, stride_xw, stride_bc, stride_br, stride_vi, stride_vr, stride_hj, stride_hr,
    DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, DOT_PRECISION: tl.constexpr, OFFSET_TY: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """z[p, r] for ranks r0 .. r0 + BLOCK_R: stages 1-3 of BLOCK_P output pixels, in fp32 registers."""
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
        v_i = tl.load(v_grp + i * stride_vi + rr * stride_vr, mask=mask_r, other=0.0).to(tl.float32)
        h_j = tl.load(h_grp + j * stride_hj + rr * stride_hr, mask=mask_r, other=0.0).to(tl.float32)
        vh = v_i * h_j  # [BR]: tap (i, j) of the merged depthwise filter
        acc_z = _channel_contraction(acc_z, x_pix, pix_ok, C_IN_G, rr, mask_r, b_grp, vh,
                                     stride_xc, stride_bc, stride_br, DOT_PRECISION, OFFSET_TY, BLOCK_C)
    return acc_z


@triton.jit
def _output_stage(
    z, rr, mask_r, a_grp, stride_ao, stride_ar, bias_ptr, y_pix, mask_pix, stride_yc, o_first, C_OUT_G,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, OFFSET_TY: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Stage 4 for a tile of pixels, every output-channel block: y[p, o] = z[p, :] . A[o, :] + bias[o].

    ``z`` [BP, BR] in the factors' dtype; ``y_pix`` [BP] output pointers at channel 0; ``o_first`` the
    group's first output channel."""
    for o0 in range(0, C_OUT_G, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O).to(OFFSET_TY)
        mask_o = offs_o < C_OUT_G
        a = tl.load(
            a_grp + offs_o[None, :] * stride_ao + rr[:, None] * stride_ar,
            mask=mask_r[:, None] & mask_o[None, :], other=0.0,
        )  # [BR, BO]
        # [BP, BR] @ [BR, BO] -> [BP, BO]
        acc_y = tl.dot(z, a, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc_y += tl.load(bias_ptr + o_first + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_pix[:, None] + (o_first + offs_o)[None, :] * stride_yc
        tl.store(y_ptrs, acc_y.to(y_pix.dtype.element_ty), mask=mask_pix[:, None] & mask_o[None, :])


@triton.autotune(
    configs=TAPS_TILES.configs(),
    key=["C_IN_G", "RANK", "C_OUT_G", "KH", "KW", "STRIDE_H", "STRIDE_W"],
    prune_configs_by={"early_config_prune": TAPS_TILES.prune},
)
@triton.heuristics({"WHOLE_RANK": lambda args: args["BLOCK_R"] >= args["RANK"]})
@triton.jit
def cp_conv2d_fused_kernel(
    x_ptr,  # [N, G*C_IN_G, H, W], any strides
    b_ptr,  # input factor [G, C_IN_G, RANK]
    v_ptr,  # vertical factor [G, KH, RANK]
    h_ptr,  # horizontal factor [G, KW, RANK]
    a_ptr,  # output factor [G, C_OUT_G, RANK]
    bias_ptr,  # [G*C_OUT_G], read only when HAS_BIAS
    y_ptr,  # [N, G*C_OUT_G, OH, OW], any strides
    M,  # N * OH * OW: the flattened output pixels
    H, W, OH, OW,
    C_IN_G, RANK, C_OUT_G,  # input channels per group, rank, output channels per group
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    stride_bg, stride_bc, stride_br,
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
            stride_xc, stride_xh, stride_xw, stride_bc, stride_br, stride_vi, stride_vr, stride_hj, stride_hr,
            DIL_H, DIL_W, KH, KW, DOT_PRECISION, OFFSET_TY, BLOCK_P, BLOCK_C, BLOCK_R,
        ).to(a_ptr.dtype.element_ty)
        _output_stage(z, rr, mask_r, a_grp, stride_ao, stride_ar, bias_ptr, y_rows, mask_m, stride_yc,
                      group * C_OUT_G, C_OUT_G, HAS_BIAS, DOT_PRECISION, OFFSET_TY, BLOCK_O)
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
                stride_xc, stride_xh, stride_xw, stride_bc, stride_br, stride_vi, stride_vr, stride_hj, stride_hr,
                DIL_H, DIL_W, KH, KW, DOT_PRECISION, OFFSET_TY, BLOCK_P, BLOCK_C, BLOCK_R,
            )
            a = tl.load(
                a_grp + offs_o[None, :] * stride_ao + rr[:, None] * stride_ar,
                mask=mask_r[:, None] & mask_o[None, :], other=0.0,
            )  # [BR, BO]
            # [BP, BR] @ [BR, BO] -> [BP, BO]
            acc_y = tl.dot(z.to(a.dtype), a, acc_y, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc_y += tl.load(bias_ptr + group * C_OUT_G + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_rows[:, None] + (group * C_OUT_G + offs_o)[None, :] * stride_yc
        tl.store(y_ptrs, acc_y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_o[None, :])


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
    (8, 128, 32, 64, 64, 8, 2),
    (8, 64, 16, 128, 64, 8, 2),
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
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """u[q, r] = sum_{j,c} x[c, ih, iw0[q] + j*DIL_W] * B[c,r] H[j,r]: stages 1 and 3 of one input row."""
    # An input row outside the image masks every column (a vector test: the interpreter mishandles
    # a scalar mask broadcast into a load mask).
    in_row = mask_w & (iw0 * 0 + ih >= 0) & (iw0 * 0 + ih < H)  # [BW]
    acc = tl.zeros([BLOCK_W, BLOCK_R], dtype=tl.float32)
    for j in range(KW):
        iw = iw0 + j * DIL_W
        ok = in_row & (iw >= 0) & (iw < W)  # [BW]: masked taps are the zero padding
        h_j = tl.load(h_grp + j * stride_hj + rr * stride_hr, mask=mask_r, other=0.0).to(tl.float32)
        x_pix = x_col + ih * stride_xh + iw * stride_xw  # [BW] pointers
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
                      KW, DOT_PRECISION, OFFSET_TY, BLOCK_W, BLOCK_C, BLOCK_R)
    if STRIDE_H == 1:
        u_mid = _row_of_u(x_col, ih0 + 1, H, iw0, mask_w, W, C_IN_G, rr, mask_r, b_grp, h_grp,
                          stride_xc, stride_xh, stride_xw, stride_bc, stride_br, stride_hj, stride_hr, DIL_W,
                          KW, DOT_PRECISION, OFFSET_TY, BLOCK_W, BLOCK_C, BLOCK_R)
    for t in range(ROWS):
        row0 = ih0 + t * STRIDE_H
        if STRIDE_H != 1:
            u_mid = _row_of_u(x_col, row0 + 1, H, iw0, mask_w, W, C_IN_G, rr, mask_r, b_grp, h_grp,
                              stride_xc, stride_xh, stride_xw, stride_bc, stride_br, stride_hj, stride_hr, DIL_W,
                              KW, DOT_PRECISION, OFFSET_TY, BLOCK_W, BLOCK_C, BLOCK_R)
        u_bot = _row_of_u(x_col, row0 + 2, H, iw0, mask_w, W, C_IN_G, rr, mask_r, b_grp, h_grp,
                          stride_xc, stride_xh, stride_xw, stride_bc, stride_br, stride_hj, stride_hr, DIL_W,
                          KW, DOT_PRECISION, OFFSET_TY, BLOCK_W, BLOCK_C, BLOCK_R)
        # Stage 2, the vertical taps, on the three rows in registers: [BW, BR]
        z = (v0 * u_top + v1 * u_mid + v2 * u_bot).to(a_ptr.dtype.element_ty)
        p = p0 + t
        row_ok = mask_w & (ow * 0 + p < OH)  # vector test, as in _row_of_u
        y_row = y_ptr + n * stride_yn + p * stride_yh + ow * stride_yw  # [BW] pointers
        _output_stage(z, rr, mask_r, a_grp, stride_ao, stride_ar, bias_ptr, y_row, row_ok, stride_yc,
                      group * C_OUT_G, C_OUT_G, HAS_BIAS, DOT_PRECISION, OFFSET_TY, BLOCK_O)
        if STRIDE_H == 1:
            u_top = u_mid
            u_mid = u_bot
        else:
            u_top = u_bot


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------
def needs_int64(*tensors: Optional[Tensor]) -> bool:
    """Whether 32-bit offsets could overflow for any of these tensors."""
    return any(t is not None and t.numel() > INT32_MAX for t in tensors)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow PyTorch's own switch for convolutions (``torch.backends.cudnn.allow_tf32``)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_KERNEL = "auto"  # which kernel cp_conv2d_fused launches when not told (tests switch it)


def new_output(shape: tuple[int, ...], x: Tensor) -> Tensor:
    """The uninitialised output, in ``x``'s dtype, device and memory format (tests poison it with NaN)."""
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=conv_args.memory_format_of(x))


def cp_conv2d_fused(
    x: Tensor,
    input_factor: Tensor,
    vertical_factor: Tensor,
    horizontal_factor: Tensor,
    output_factor: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    *,
    out: Optional[Tensor] = None,
    force_int64: bool = False,
    kernel: Optional[str] = None,
) -> Tensor:
    """Launch the fused kernel on a 4-D ``x``; ``padding`` is ``(top, bottom, left, right)`` zeros.

    Arguments follow :func:`cpkernels.ops.reference.cp_conv2d_reference`. The output has ``x``'s dtype
    and memory format; ``x`` is read through its strides, never copied. ``out``, if given, receives the
    result (any strides). ``force_int64`` takes the 64-bit offset path even for small tensors.
    ``kernel``: ``"rows"`` (the rolling-window kernel; kh = 3, vertical stride 1 or 2, vertical dilation 1,
    rank <= 128), ``"taps"`` (the general kernel), or ``"auto"`` (rows wherever it applies); None
    means :data:`DEFAULT_KERNEL`.
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the fused kernel supports {SUPPORTED_DTYPES}, got {x.dtype}")
    n, _, h, w = x.shape
    groups, cin_g, rank = input_factor.shape
    cout_g = output_factor.shape[1]
    kh, kw = vertical_factor.shape[1], horizontal_factor.shape[1]
    oh, ow = conv_args.output_size((h, w), (kh, kw), stride, padding, dilation)
    shape = (n, groups * cout_g, oh, ow)
    if out is None:
        y = new_output(shape, x)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must be a {x.dtype} tensor of shape {shape} on {x.device}, got {out.dtype} {tuple(out.shape)} "
            f"on {out.device}"
        )
    else:
        y = out
    if y.numel() == 0:
        return y
    use_int64 = force_int64 or needs_int64(x, y)
    kernel = DEFAULT_KERNEL if kernel is None else kernel
    max_rows_rank = max(t[3] for t in ROWS_TILES.for_dtype(x.dtype))
    rows_apply = kh == 3 and stride[0] in (1, 2) and dilation[0] == 1 and rank <= max_rows_rank
    if kernel not in ("auto", "rows", "taps"):
        raise ValueError(f"kernel must be 'auto', 'rows' or 'taps', got {kernel!r}")
    if kernel == "rows" and not rows_apply:
        raise ValueError(
            f"the rows kernel needs kh = 3, vertical stride 1 or 2, vertical dilation 1 and rank <= {max_rows_rank}"
        )
    global _last_kernel, _last_autotuner
    if rows_apply and kernel != "taps":
        _last_autotuner = cp_conv2d_rows_kernel

        def rows_grid(meta):
            return (n * triton.cdiv(oh, meta["ROWS"]) * triton.cdiv(ow, meta["BLOCK_W"]), 1, groups)

        _last_kernel = cp_conv2d_rows_kernel[rows_grid](
            x, input_factor, vertical_factor, horizontal_factor, output_factor,
            bias if bias is not None else y, y,
            h, w, oh, ow, cin_g, rank, cout_g,
            *x.stride(), *y.stride(),
            *input_factor.stride(), *vertical_factor.stride(), *horizontal_factor.stride(), *output_factor.stride(),
            stride[1], padding[0], padding[2], dilation[1],
            STRIDE_H=stride[0], KW=kw, HAS_BIAS=bias is not None, USE_INT64=use_int64,
            DOT_PRECISION=dot_precision(x.dtype),
        )
        return y
    m = n * oh * ow

    def grid(meta):
        # WHOLE_RANK programs loop over the output channels themselves (see the kernel).
        o_programs = 1 if meta["BLOCK_R"] >= rank else triton.cdiv(cout_g, meta["BLOCK_O"])
        return (triton.cdiv(m, meta["BLOCK_P"]), o_programs, groups)

    _last_autotuner = cp_conv2d_fused_kernel
    _last_kernel = cp_conv2d_fused_kernel[grid](
        x, input_factor, vertical_factor, horizontal_factor, output_factor,
        bias if bias is not None else y, y,
        m, h, w, oh, ow, cin_g, rank, cout_g,
        *x.stride(), *y.stride(),
        *input_factor.stride(), *vertical_factor.stride(), *horizontal_factor.stride(), *output_factor.stride(),
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        KH=kh, KW=kw, HAS_BIAS=bias is not None, USE_INT64=use_int64, DOT_PRECISION=dot_precision(x.dtype),
    )
    return y


_last_kernel = None  # the compiled kernel of the latest launch, for the profiler
_last_autotuner = None  # and the autotuner that chose its config


def last_compiled_kernel():
    """Triton's compiled kernel of the latest launch (registers, spills, shared memory), or None."""
    return _last_kernel


def best_config() -> Optional[dict]:
    """The kernel and config of the latest launch (None before any launch)."""
    cfg = getattr(_last_autotuner, "best_config", None)
    if cfg is None:
        return None
    name = "rows" if _last_autotuner is cp_conv2d_rows_kernel else "taps"
    return {"kernel": name, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
