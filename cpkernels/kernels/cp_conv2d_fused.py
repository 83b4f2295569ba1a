"""The launcher of the fused CP conv: all four CP stages in one Triton launch, by one of three kernels.

- ``rows`` (:mod:`cpkernels.kernels.rows`; kh = 3, vertical stride 1 or 2, vertical dilation 1, rank up to 128:
  most CNN convs; preferred where it applies): a rolling window of three rank-R rows in registers.
- ``taps`` (:mod:`cpkernels.kernels.taps`; everything else up to its whole-rank tiles): an implicit GEMM over
  ``kh*kw*Cin`` into the R -> Cout GEMM. Tucker-2 runs it on pre-folded per-tap weights
  (:func:`taps_conv2d_fused`).
- ``wide`` (:mod:`cpkernels.kernels.wide`; any rank): stage 1 once per input pixel into an fp32 ring.

In all of them the rank-R intermediates never touch device memory (the wide kernel's ring aside, which stays
in L2), out-of-image taps are masked to zero (the zero padding; exact because stage 1 has no bias), and every
tensor is read through its strides. The op (custom op, autograd) is :mod:`cpkernels.ops.cp_conv2d`; the design
and its roofline are in ``docs/kernel.md``; the tiles of each kernel are beside it
(:mod:`cpkernels.kernels.tiles` says how they become autotune configs).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
from torch import Tensor

from cpkernels.core import conv_args
from cpkernels.kernels.rows import ROWS_TILES, cp_conv2d_rows_kernel
from cpkernels.kernels.taps import TAPS_TILES, cp_conv2d_taps_kernel
from cpkernels.kernels.wide import WIDE_TILES, cp_conv2d_wide_kernel, wide_geometry

INT32_MAX = 2**31 - 1

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


def cp_conv2d_fused(x: Tensor, input_factor: Tensor, vertical_factor: Tensor, horizontal_factor: Tensor,
                    output_factor: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], *, out: Optional[Tensor] = None, force_int64: bool = False,
                    kernel: Optional[str] = None) -> Tensor:
    """Launch the fused kernel on a 4-D ``x``; ``padding`` is ``(top, bottom, left, right)`` zeros.

    Arguments follow :func:`cpkernels.ops.reference.cp_conv2d_reference`. The output has ``x``'s dtype
    and memory format; ``x`` is read through its strides, never copied. ``out``, if given, receives the
    result (any strides). ``force_int64`` takes the 64-bit offset path even for small tensors.
    ``kernel``: ``"rows"`` (the rolling-window kernel; kh = 3, vertical stride 1 or 2, vertical dilation 1,
    rank <= 128), ``"taps"`` (the general kernel), ``"wide"`` (any shape and rank; stage 1 once per
    input pixel through a scratch ring), or ``"auto"`` (rows wherever it applies, else taps up to its
    whole-rank tiles, else wide); None means :data:`DEFAULT_KERNEL`. Which kernel runs a call on a
    GPU is the GPU plan's choice (:mod:`cpkernels.dispatch.gpu`); ``"auto"`` is the rule without a plan.
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

    _last_autotuner = cp_conv2d_taps_kernel
    _last_kernel = cp_conv2d_taps_kernel[grid](
        *args, m, h, w, oh, ow, cin_g, rank, cout_g, *strides,
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        KH=kh, KW=kw, USE_INT64=use_int64, FOLDED=folded, **flags,
    )


def taps_conv2d_fused(x: Tensor, tap_weights: Tensor, output_factor: Tensor, bias: Optional[Tensor],
                      kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], *, out: Optional[Tensor] = None, force_int64: bool = False) -> Tensor:
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
