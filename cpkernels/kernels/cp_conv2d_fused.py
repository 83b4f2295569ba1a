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

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import conv_args
from ..switches import autotune_enabled, triton_interpreter_enabled

INT32_MAX = 2**31 - 1

# --------------------------------------------------------------------------------------------------
# Tile configs
# --------------------------------------------------------------------------------------------------
# (BLOCK_P, BLOCK_C, BLOCK_R, BLOCK_O, num_warps, num_stages). Every block is a power of two >= 16
# (tl.dot's minimum). Each set holds only tiles that compile without register spills for sm_80 and
# sm_90, on both rank paths (``python -m cpkernels.kernels.aot``); 4-warp tiles and BLOCK_O = 256 all
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


class TileSet:
    """The tile tables of one kernel and the autotune configs made from them.

    A tile is the kernel's meta-parameters in ``names`` order, then ``num_warps`` and ``num_stages``.
    """

    def __init__(self, names, tiles_16bit, tiles_fp32, tiles_interpreter, tiles_16bit_sm90=()):
        self.names = names
        self.tiles_16bit, self.tiles_fp32, self.tiles_interpreter = tiles_16bit, tiles_fp32, tiles_interpreter
        # 16-bit tiles that compile without spills only where the output GEMM's B operand is read from shared
        # memory (Hopper's wgmma); sm_80's mma.sync holds it in registers and spills them.
        self.tiles_16bit_sm90 = tiles_16bit_sm90

    def tiles(self, dtype: torch.dtype, arch: int) -> tuple[tuple[int, ...], ...]:
        """The tiles for an input dtype on a GPU of compute capability ``arch`` (e.g. 80, 90)."""
        if dtype == torch.float32:
            return self.tiles_fp32
        return self.tiles_16bit + (self.tiles_16bit_sm90 if arch >= 90 else ())

    def for_dtype(self, dtype: torch.dtype, device: Optional[torch.device] = None) -> tuple[tuple[int, ...], ...]:
        """The tiles autotuned for an input dtype on ``device`` (one large-block tile under the interpreter)."""
        if triton_interpreter_enabled():
            return self.tiles_interpreter
        major, minor = torch.cuda.get_device_capability(device) if device is not None else (8, 0)
        return self.tiles(dtype, 10 * major + minor)

    def configs(self) -> list[triton.Config]:
        """Every config the autotuner may try; :meth:`prune` keeps the input dtype's and device's."""
        if triton_interpreter_enabled():
            tiles = self.tiles_interpreter
        else:
            tiles = dict.fromkeys(self.tiles_16bit + self.tiles_16bit_sm90 + self.tiles_fp32)
        return [
            triton.Config(dict(zip(self.names, t[:-2])), num_warps=t[-2], num_stages=t[-1]) for t in tiles
        ]

    def tile_of(self, config: triton.Config) -> tuple[int, ...]:
        return (*(config.kwargs[n] for n in self.names), config.num_warps, config.num_stages)

    def prune(self, configs, named_args, whole_rank: bool = False):
        """The dtype's tiles (those whose BLOCK_R covers the rank, if ``whole_rank``), minus tiles far wider
        than the problem: they only add masked work."""
        x = named_args["x_ptr"]
        wanted = set(self.for_dtype(x.dtype, x.device if x.is_cuda else None))
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


TAPS_TILES = TileSet(("BLOCK_P", "BLOCK_C", "BLOCK_R", "BLOCK_O"), TILES_16BIT, TILES_FP32, TILES_INTERPRETER)


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------
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


@triton.autotune(
    configs=TAPS_TILES.configs(),
    key=["C_IN_G", "RANK", "C_OUT_G", "KH", "KW", "STRIDE_H", "STRIDE_W", "FOLDED"],
    prune_configs_by={"early_config_prune": TAPS_TILES.prune},
)
@triton.heuristics({"WHOLE_RANK": lambda args: args["BLOCK_R"] >= args["RANK"]})
@triton.jit
def cp_conv2d_fused_kernel(
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
KERNELS = ("auto", "rows", "taps", "wide")
DEFAULT_KERNEL = "auto"  # which kernel cp_conv2d_fused launches when not told (tests switch it)


def rows_kernel_applies(kernel_size, stride, dilation, rank: int, max_rank: int = 128) -> bool:
    """The rows kernel's window holds three input rows of the whole rank in registers."""
    return kernel_size[0] == 3 and stride[0] in (1, 2) and dilation[0] == 1 and rank <= max_rank


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
    rank <= 128), ``"taps"`` (the general kernel), ``"wide"`` (any shape and rank; stage 1 once per
    input pixel through a scratch ring), or ``"auto"`` (rows wherever it applies, else taps up to its
    whole-rank tiles, else wide); None means :data:`DEFAULT_KERNEL`. Which kernel runs a call on a
    GPU is the GPU plan's choice (:mod:`cpkernels.plans.gpu`); ``"auto"`` is the rule without a plan.
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
    kernel = DEFAULT_KERNEL if kernel is None else kernel
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    max_rows_rank = max(t[3] for t in ROWS_TILES.for_dtype(x.dtype))
    rows_apply = rows_kernel_applies((kh, kw), stride, dilation, rank, max_rows_rank)
    if kernel == "rows" and not rows_apply:
        raise ValueError(
            f"the rows kernel needs kh = 3, vertical stride 1 or 2, vertical dilation 1 and rank <= {max_rows_rank}"
        )
    if kernel == "auto":
        # The GPU's tiles decide, under the interpreter too (its one tile is not what a GPU runs).
        taps_tiles = TAPS_TILES.tiles_fp32 if x.dtype == torch.float32 else TAPS_TILES.tiles_16bit
        kernel = "rows" if rows_apply else ("taps" if rank <= max(t[2] for t in taps_tiles) else "wide")
    args = (x, input_factor, vertical_factor, horizontal_factor, output_factor, bias if bias is not None else y, y)
    strides = (*x.stride(), *y.stride(), *input_factor.stride(), *vertical_factor.stride(),
               *horizontal_factor.stride(), *output_factor.stride())
    # 16-bit inputs keep the rank-R intermediate exact into the output GEMM (_dot_z).
    flags = dict(HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype), PRECISE=x.dtype != torch.float32)
    global _last_kernel, _last_autotuner
    if kernel == "wide":
        return _launch_wide(args, strides, flags, (n, h, w, oh, ow, groups, cin_g, rank, cout_g, kh, kw),
                            stride, padding, dilation, force_int64)
    use_int64 = force_int64 or needs_int64(x, y)
    if kernel == "rows":
        _last_autotuner = cp_conv2d_rows_kernel

        def rows_grid(meta):
            return (n * triton.cdiv(oh, meta["ROWS"]) * triton.cdiv(ow, meta["BLOCK_W"]), 1, groups)

        _last_kernel = cp_conv2d_rows_kernel[rows_grid](
            *args, h, w, oh, ow, cin_g, rank, cout_g, *strides, stride[1], padding[0], padding[2], dilation[1],
            STRIDE_H=stride[0], KW=kw, USE_INT64=use_int64, **flags,
        )
        return y
    _launch_taps(args, (*strides[:8], strides[8], 0, *strides[9:]), flags, (n, h, w, oh, ow, groups, cin_g, rank,
                                                                           cout_g, kh, kw),
                 stride, padding, dilation, use_int64, folded=False)
    return y


def _launch_taps(args, strides, flags, dims, stride, padding, dilation, use_int64, folded):
    """The taps kernel; ``strides`` has the tap stride of ``b`` (0 unless ``folded``) after its group stride."""
    global _last_kernel, _last_autotuner
    n, h, w, oh, ow, groups, cin_g, rank, cout_g, kh, kw = dims
    m = n * oh * ow

    def grid(meta):
        # WHOLE_RANK programs loop over the output channels themselves (see the kernel).
        o_programs = 1 if meta["BLOCK_R"] >= rank else triton.cdiv(cout_g, meta["BLOCK_O"])
        return (triton.cdiv(m, meta["BLOCK_P"]), o_programs, groups)

    _last_autotuner = cp_conv2d_fused_kernel
    _last_kernel = cp_conv2d_fused_kernel[grid](
        *args, m, h, w, oh, ow, cin_g, rank, cout_g, *strides,
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        KH=kh, KW=kw, USE_INT64=use_int64, FOLDED=folded, **flags,
    )


def taps_conv2d_fused(
    x: Tensor,
    tap_weights: Tensor,
    output_factor: Tensor,
    bias: Optional[Tensor],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    *,
    out: Optional[Tensor] = None,
    force_int64: bool = False,
) -> Tensor:
    """The taps kernel on pre-folded per-tap weights: ``z = sum_t shift_t(x) @ T_t``, ``y = z @ A^T + bias``.

    ``tap_weights`` ``[G, kh*kw, Cin/G, R]`` (tap ``i*kw + j``) in ``x``'s dtype, ``output_factor``
    ``[G, Cout/G, R]``. This is the Tucker-2 layer (``T_t[c, a] = sum_b U_in[c, b] core[a, b, i, j]``,
    :meth:`cpkernels.Tucker2Factors.tap_weights`) on the CP layer's loops, without the per-rank tap
    scaling. Other arguments as :func:`cp_conv2d_fused`.
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the fused kernel supports {SUPPORTED_DTYPES}, got {x.dtype}")
    n, _, h, w = x.shape
    groups, taps, cin_g, rank = tap_weights.shape
    cout_g = output_factor.shape[1]
    kh, kw = kernel_size
    if taps != kh * kw:
        raise ValueError(f"tap_weights holds {taps} taps, the kernel {kh}x{kw} has {kh * kw}")
    oh, ow = conv_args.output_size((h, w), (kh, kw), stride, padding, dilation)
    shape = (n, groups * cout_g, oh, ow)
    y = new_output(shape, x) if out is None else out
    if y.numel() == 0:
        return y
    # v_ptr and h_ptr are not read when FOLDED: the tap weights stand in for them.
    args = (x, tap_weights, tap_weights, tap_weights, output_factor, bias if bias is not None else y, y)
    strides = (*x.stride(), *y.stride(), *tap_weights.stride(), 0, 0, 0, 0, 0, 0, *output_factor.stride())
    flags = dict(HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype), PRECISE=x.dtype != torch.float32)
    _launch_taps(args, strides, flags, (n, h, w, oh, ow, groups, cin_g, rank, cout_g, kh, kw), stride, padding,
                 dilation, force_int64 or needs_int64(x, y), folded=True)
    return y


def wide_programs(work: int, device: torch.device) -> int:
    """Programs of the wide kernel's persistent grid: one per SM (each holds one ring), three under the
    interpreter (so the tests walk the work loop)."""
    if device.type != "cuda":
        return min(work, 3)
    return min(work, torch.cuda.get_device_properties(device).multi_processor_count)


def wide_work(n: int, oh: int, ow: int, rows: int, block_w: int) -> int:
    return n * triton.cdiv(oh, rows) * triton.cdiv(ow, block_w)


def _launch_wide(args, strides, flags, dims, stride, padding, dilation, force_int64):
    """The wide kernel with its scratch: one fp32 ring per program, sized for the largest tile it may take."""
    global _last_kernel, _last_autotuner
    x, y = args[0], args[-1]
    n, h, w, oh, ow, groups, cin_g, rank, cout_g, kh, kw = dims
    names = WIDE_TILES.names

    def ring_elements(tile) -> int:
        meta = dict(zip(names, tile))
        ring, bw_in = wide_geometry((kh, kw), stride, dilation, meta["STEP"], meta["BLOCK_W"])
        programs = wide_programs(wide_work(n, oh, ow, meta["ROWS"], meta["BLOCK_W"]), x.device)
        return programs * groups * ring * bw_in * rank

    tiles = WIDE_TILES.for_dtype(x.dtype, x.device if x.is_cuda else None)
    scratch = torch.empty(max(ring_elements(t) for t in tiles),
                          dtype=torch.float32, device=x.device)
    use_int64 = force_int64 or needs_int64(x, y, scratch)

    def grid(meta):
        return (wide_programs(wide_work(n, oh, ow, meta["ROWS"], meta["BLOCK_W"]), x.device), 1, groups)

    _last_autotuner = cp_conv2d_wide_kernel
    _last_kernel = cp_conv2d_wide_kernel[grid](
        *args, scratch, h, w, oh, ow, cin_g, rank, cout_g, *strides, padding[0], padding[2], n,
        STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1], KH=kh, KW=kw,
        USE_INT64=use_int64, **flags,
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
    name = {cp_conv2d_rows_kernel: "rows", cp_conv2d_wide_kernel: "wide"}.get(_last_autotuner, "taps")
    return {"kernel": name, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
