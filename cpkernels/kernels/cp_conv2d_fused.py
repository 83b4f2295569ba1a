"""The fused CP conv: all four CP stages in one Triton launch.

Read top to bottom: tile configs -> ``@triton.jit`` kernel -> launcher. The op (custom op, autograd)
lives in :mod:`cpkernels.ops.cp_conv2d`; the design and its roofline are in ``docs/kernel.md``.

Design in one paragraph. Since stage 1 has no bias, the two depthwise stages applied to ``B^T x``
equal one kh x kw depthwise conv whose tap ``(i, j)`` of rank channel ``r`` is ``V[i,r] H[j,r]``, and
it commutes into the first contraction::

    z[p, r] = sum_{i,j,c} x[c, ih(p,i), iw(p,j)] * (B[c,r] V[i,r] H[j,r])      # implicit GEMM, K = kh*kw*Cin
    y[p, o] = sum_r z[p, r] A[o, r] + bias[o]                                   # GEMM, K = R

A program owns ``BLOCK_P`` output pixels (flattened over N, OH, OW) and ``BLOCK_O`` output channels
of one group. For each ``BLOCK_R`` slice of the rank it accumulates ``z`` over the input channels and
the kh*kw taps on the tensor cores (``[BP, BC] @ [BC, BR]``: the tap-scaled ``B`` tile is built in
registers from a ``B`` tile and two rank vectors), then feeds it straight into the second
contraction (``[BP, BR] @ [BR, BO]``). ``z`` lives only in registers; no intermediate touches memory.
Out-of-image taps are masked to zero, which is the zero padding (exact because stage 1 has no bias).
"""
from __future__ import annotations

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


def _config(tile: tuple[int, ...]) -> triton.Config:
    bp, bc, br, bo, warps, stages = tile
    return triton.Config(
        {"BLOCK_P": bp, "BLOCK_C": bc, "BLOCK_R": br, "BLOCK_O": bo}, num_warps=warps, num_stages=stages
    )


def tiles_for(dtype: torch.dtype) -> tuple[tuple[int, ...], ...]:
    """The tile set autotuned for an input dtype."""
    if triton_interpreter_enabled():
        return TILES_INTERPRETER
    return TILES_FP32 if dtype == torch.float32 else TILES_16BIT


def fused_configs() -> list[triton.Config]:
    """Every config the autotuner may try; :func:`prune_configs` keeps the input dtype's set."""
    if triton_interpreter_enabled():
        return [_config(t) for t in TILES_INTERPRETER]
    return [_config(t) for t in dict.fromkeys(TILES_16BIT + TILES_FP32)]


def _tile_of(config: triton.Config) -> tuple[int, ...]:
    k = config.kwargs
    return (k["BLOCK_P"], k["BLOCK_C"], k["BLOCK_R"], k["BLOCK_O"], config.num_warps, config.num_stages)


def prune_configs(configs, named_args, **kwargs):
    """Keep the dtype's tile set, minus tiles far wider than the problem (they only add masked work)."""
    wanted = set(tiles_for(named_args["x_ptr"].dtype))
    configs = [c for c in configs if _tile_of(c) in wanted]

    def fits(c):
        k = c.kwargs
        return (
            k["BLOCK_R"] <= max(16, triton.next_power_of_2(named_args["RANK"]))
            and k["BLOCK_O"] <= max(16, triton.next_power_of_2(named_args["C_OUT_G"]))
            and k["BLOCK_C"] <= max(16, triton.next_power_of_2(named_args["C_IN_G"]))
        )

    fitting = [c for c in configs if fits(c)]
    if fitting:
        return fitting
    return [min(configs, key=lambda c: c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_C"])]


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------
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
    offs_c = tl.arange(0, BLOCK_C).to(OFFSET_TY)
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
            w_tap = (b.to(tl.float32) * vh[None, :]).to(x.dtype)
            # [BP, BC] @ [BC, BR] -> [BP, BR]
            acc_z = tl.dot(x, w_tap, acc_z, input_precision=DOT_PRECISION)
    return acc_z


@triton.autotune(
    configs=fused_configs(),
    key=["C_IN_G", "RANK", "C_OUT_G", "KH", "KW", "STRIDE_H", "STRIDE_W"],
    prune_configs_by={"early_config_prune": prune_configs},
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
                acc_y += tl.load(bias_ptr + group * C_OUT_G + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
            y_ptrs = y_rows[:, None] + (group * C_OUT_G + offs_o)[None, :] * stride_yc
            tl.store(y_ptrs, acc_y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_o[None, :])
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
# Launcher
# --------------------------------------------------------------------------------------------------
def needs_int64(*tensors: Optional[Tensor]) -> bool:
    """Whether 32-bit offsets could overflow for any of these tensors."""
    return any(t is not None and t.numel() > INT32_MAX for t in tensors)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow PyTorch's own switch for convolutions (``torch.backends.cudnn.allow_tf32``)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
) -> Tensor:
    """Launch the fused kernel on a 4-D ``x``; ``padding`` is ``(top, bottom, left, right)`` zeros.

    Arguments follow :func:`cpkernels.ops.reference.cp_conv2d_reference`. The output has ``x``'s dtype
    and memory format; ``x`` is read through its strides, never copied. ``out``, if given, receives the
    result (any strides). ``force_int64`` takes the 64-bit offset path even for small tensors.
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
    m = n * oh * ow
    use_int64 = force_int64 or needs_int64(x, y)

    def grid(meta):
        # WHOLE_RANK programs loop over the output channels themselves (see the kernel).
        o_programs = 1 if meta["BLOCK_R"] >= rank else triton.cdiv(cout_g, meta["BLOCK_O"])
        return (triton.cdiv(m, meta["BLOCK_P"]), o_programs, groups)

    global _last_kernel
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


def last_compiled_kernel():
    """Triton's compiled kernel of the latest launch (registers, spills, shared memory), or None."""
    return _last_kernel


def best_config() -> Optional[dict]:
    """The config the autotuner settled on most recently (None before any launch)."""
    cfg = getattr(cp_conv2d_fused_kernel, "best_config", None)
    return None if cfg is None else {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
