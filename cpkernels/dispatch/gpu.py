"""The GPU plan: which way of computing a CP layer runs one call on a CUDA device.

The counterpart of :mod:`cpkernels.dispatch.cpu`. For each call signature (shape, rank, groups, stride,
dilation, dtype, layout, TF32 switch, device) it picks one of :data:`STRATEGIES` by a written cost
model, on the peaks of a named GPU (:class:`GPUSpec`):
    time = max(tensor-core FLOPs / peak, CUDA-core FLOPs / fp32 peak, HBM bytes / HBM bandwidth,
               L2 bytes / L2 bandwidth) / fill + launches * launch latency

``fill`` is the share of the SMs a kernel's grid occupies (a grid of 32 programs on 132 SMs runs at a
quarter of the peaks). Each fused kernel is modeled at each of its tiles and the best tile counts, as
its autotuner would pick it. Everything here is arithmetic on the shapes and on datasheet peaks;
``L2 bandwidth`` and ``launch latency`` are assumptions of the model (no datasheet states them), and
no timing of this package's kernels on a GPU has been fed back into it yet.

By default (``CPKERNELS_GPU_PLAN=measure``, or :data:`MEASURE` = True) the plan measures, like
``torch.backends.cudnn.benchmark``: the first call of each call signature runs the model's
:data:`MEASURED_TOP` fastest candidates, dense and the family's reference path
(:data:`REFERENCE_STRATEGY`), checks each against the reference, times those that agree with CUDA events
(:mod:`cpkernels.core.timing`) and keeps the fastest of them (dense unless another beats it by
:data:`cpkernels.dispatch.measured.DENSE_MARGIN`). A candidate that disagrees is never picked:
it is left out of the timing and recorded in the plan's ``refused``. Decisions are cached per signature
(:func:`call_key`); the same signature is never timed twice. ``CPKERNELS_GPU_PLAN=model`` decides from
the model alone, with no timing: the same choice on every run.

Left unset, the variable means ``model`` under ``torch.use_deterministic_algorithms(True)`` (a timed
choice can differ between runs, and the strategies round differently), as the CPU plan does; set to
``measure`` (or :data:`MEASURE` = True) it measures there too. Where timing is impossible, the plan never
times, whatever the switch says: while ``torch.compile`` or ``torch.export`` traces (dynamo), under a
TorchScript trace or an ONNX export, and during CUDA graph capture on the current stream. There a call
takes the measured choice already cached for its signature if an eager call made one, else the model's
choice, and caches no measured choice. So a compiled or captured model runs, per signature, what its
eager warm-up measured (as a CUDA graph captured after a warm-up reuses cuDNN's benchmarked algorithms),
or the model's choice where no eager call of that signature came first; the choice is fixed in the graph
when it is traced, and a later eager call of the signature still measures. Under deterministic
algorithms with the variable unset no measured choice is used, cached or not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from cpkernels.core.conv_args import is_channels_last
from cpkernels.core.cost import ConvShape
from cpkernels.core.switches import GPU_PLAN_MODES, gpu_plan_mode, gpu_plan_switch
# AGREEMENT: part of this module's surface
from cpkernels.dispatch.measured import AGREEMENT, fastest_keeping_dense, measure, plan_measures  # noqa: F401

# The strategies, in the order the plan lists them. Every one computes F.conv2d with the reconstructed
# weight, up to rounding (the tests compare each with a float64 oracle).
STRATEGIES = {
    "dense": "F.conv2d (cuDNN) with the weight reconstructed from the factors at each call",
    "four-stage": "the reference path: 1x1, kh x 1, 1 x kw, 1x1 convs; three intermediates through HBM, in "
                  "fp32 for 16-bit inputs (TF32 GEMMs for bf16, IEEE fp32 for fp16)",
    "fused-rows": "one Triton launch, rolling window of input rows in registers (kh = 3, vertical stride "
                  "1 or 2, vertical dilation 1, R <= 128)",
    "fused-taps": "one Triton launch, implicit GEMM over kh*kw*Cin (any shape; R <= 128 in one pass, "
                  "larger ranks recompute stage 1 per block of output channels)",
    "fused-wide": "one Triton launch, stage 1 once per input pixel into an fp32 scratch ring, rank walked "
                  "in slices (any shape and rank)",
}

# The strategies for a Tucker-2 layer (cpkernels.TuckerConv2d), chosen the same way.
TUCKER2_STRATEGIES = {
    "dense": "F.conv2d (cuDNN) with the weight reconstructed from the factors at each call",
    "three-stage": "the reference path: 1x1, kh x kw core conv, 1x1 (cuDNN); two intermediates through HBM "
                   "(the factors are orthonormal and nothing cancels, so they stay in the input dtype)",
    "fused-taps": "one Triton launch of the taps kernel on per-tap weights (input factor folded into the core "
                  "at each call), implicit GEMM over kh*kw*Cin into R_out, then the output GEMM from registers",
}

# The strategies for a low-rank 1x1 layer (cpkernels.SVDConv2d): two GEMMs are what cuBLAS runs best, so no
# kernel of this package joins them.
SVD_STRATEGIES = {
    "dense": "F.conv2d (cuDNN) of the 1x1 weight reconstructed from the two factors at each call",
    "two-stage": "the reference path: two 1x1 convs (GEMMs), Cin -> R with the stride, R -> Cout with the bias; "
                 "one intermediate through HBM",
}
# The reference each family's measured plan checks its candidates against.
REFERENCE_STRATEGY = {"cp": "four-stage", "tucker2": "three-stage", "svd": "two-stage"}

# Overridden by tests and users: True times the candidates, False takes the model (see the module docstring);
# None follows CPKERNELS_GPU_PLAN.
MEASURE: Optional[bool] = None
# Overridden by tests and users: the measured mode's timer, given ``partial(run, strategy)`` and returning
# seconds; None is the package's timer (CUDA events on a GPU, cpkernels.core.timing).
TIMER: Optional[Callable[[Callable[[], object]], float]] = None
# How many of the model's fastest candidates the measured mode times, besides dense and the reference (always
# timed: dense is what the nn.Conv2d ran, the reference is the check). Each fused candidate costs a Triton
# compile and autotuning of seconds on a GPU, so not every candidate is timed; but no GPU timing has checked
# the model yet (its L2 bandwidth and launch latency are assumptions), so more than its first pick is. For the
# CP family this times three to all five strategies, for Tucker-2 and SVD all of theirs.
MEASURED_TOP = 3


@dataclass(frozen=True)
class GPUSpec:
    """Datasheet peaks of one GPU (dense, no sparsity), plus the model's assumptions."""
    name: str
    hbm_bytes_per_s: float
    tensor_flops_16bit: float  # fp16/bf16 tensor cores, fp32 accumulation
    tensor_flops_tf32: float
    fp32_flops: float  # CUDA cores
    sms: int
    l2_bytes: int
    # Assumptions (no datasheet figure): L2 read bandwidth, and the GPU-side cost of one launch.
    l2_bytes_per_s: float
    launch_s: float = 3e-6
    arch: int = 90  # compute capability: which fused-kernel tiles compile for it (cp_conv2d_fused.TileSet)

    def tensor_flops(self, dtype: torch.dtype, tf32: bool) -> float:
        if dtype == torch.float32:
            return self.tensor_flops_tf32 if tf32 else self.fp32_flops
        return self.tensor_flops_16bit


GPUS = {
    "h100": GPUSpec("NVIDIA H100 SXM", 3.35e12, 989e12, 494e12, 67e12, 132, 50 << 20, 7e12),
    "h200": GPUSpec("NVIDIA H200", 4.8e12, 989e12, 494e12, 67e12, 132, 50 << 20, 7e12),
    "a100": GPUSpec("NVIDIA A100 SXM", 2.04e12, 312e12, 156e12, 19.5e12, 108, 40 << 20, 4e12, arch=80),
    "l4": GPUSpec("NVIDIA L4", 0.3e12, 121e12, 60e12, 30e12, 58, 48 << 20, 1.5e12, arch=89),
}


def gpu_spec(name: str) -> GPUSpec:
    """The spec of a known GPU by key (``"h100"``, ``"a100"``, ``"l4"``, ``"h200"``)."""
    key = name.lower().replace(" ", "").replace("-", "").replace("_", "")
    for known in GPUS:
        if key in (known, known + "sxm", known + "pcie"):
            return GPUS[known]
    raise ValueError(f"unknown GPU {name!r}; known GPUs: {', '.join(GPUS)}")


def spec_for_device(device: torch.device) -> GPUSpec:
    """The spec whose key appears in the device's name; other GPUs are modeled as an H100 with their
    own SM count (the measured mode is the remedy there)."""
    props = torch.cuda.get_device_properties(device)
    name = props.name.lower()
    for key, spec in GPUS.items():
        if key in name.replace(" ", ""):
            return spec
    base = GPUS["h100"]
    return GPUSpec(props.name, base.hbm_bytes_per_s, base.tensor_flops_16bit, base.tensor_flops_tf32,
                   base.fp32_flops, props.multi_processor_count, base.l2_bytes, base.l2_bytes_per_s,
                   arch=10 * props.major + props.minor)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """What one strategy moves and computes for one call (``flops``: tensor-core; ``simt_flops``: CUDA cores)."""
    flops: float
    hbm_bytes: float
    l2_bytes: float = 0.0
    simt_flops: float = 0.0
    launches: int = 1
    programs: Optional[int] = None  # grid size, for the fill of the SMs (None: a library kernel)
    tile: Optional[tuple] = None
    gemm_dtype: Optional[torch.dtype] = None  # the GEMMs' own dtype where it is not the input's

    def seconds(self, spec: GPUSpec, dtype: torch.dtype, tf32: bool) -> float:
        if self.gemm_dtype is not None:
            dtype = self.gemm_dtype
        busy = max(self.flops / spec.tensor_flops(dtype, tf32), self.simt_flops / spec.fp32_flops,
                   self.hbm_bytes / spec.hbm_bytes_per_s, self.l2_bytes / spec.l2_bytes_per_s)
        fill = 1.0 if self.programs is None else min(1.0, self.programs / spec.sms)
        return busy / fill + self.launches * spec.launch_s


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cost_dense(s: ConvShape, rank: int, es: int) -> Cost:
    kh, kw = s.kernel
    weight = s.cout * (s.cin // s.groups) * kh * kw
    # The reconstruction: G x [Cout/G, R] (.) [Cin/G, R] (.) [kh, R] (.) [kw, R] -> W, about R MACs per weight.
    return Cost(2 * (s.dense_macs() + weight * rank), s.minimal_bytes(es) + 2 * weight * es, launches=3)


def cost_four_stage(s: ConvShape, rank: int, dtype: torch.dtype) -> Cost:
    """16-bit inputs run with fp32 intermediates (``ops.reference.cp_conv2d_reference_fp32``): X and Y
    are cast (written and re-read in fp32), the intermediates move 4 bytes an element, and the GEMMs
    run in TF32 (bf16 inputs) or IEEE fp32 (fp16 inputs)."""
    es = torch.empty((), dtype=dtype).element_size()
    n, (h, w), (oh, ow) = s.batch, s.size, s.out_size
    gr = s.groups * rank
    t1, t2, t3 = n * h * w * gr, n * oh * w * gr, n * oh * ow * gr  # the three intermediates
    kh, kw = s.kernel
    gemm_macs = n * h * w * s.cin * rank + n * oh * ow * rank * s.cout
    sixteen = dtype in (torch.float16, torch.bfloat16)
    casts = 2 * 4 * (n * h * w * s.cin + s.out_pixels * s.cout) if sixteen else 0
    depthwise = 2 * (t2 * kh + t3 * kw)
    if dtype == torch.float16:  # IEEE fp32 GEMMs: the CUDA cores
        tensor, simt = 0.0, depthwise + 2 * gemm_macs
    else:
        tensor, simt = 2 * gemm_macs, depthwise
    return Cost(tensor, s.minimal_bytes(es) + casts + 2 * max(es, 4) * (t1 + t2 + t3), simt_flops=simt,
                launches=6 if sixteen else 4, gemm_dtype=torch.float32 if sixteen else None)


def _factor_bytes(s: ConvShape, rank: int, es: int) -> int:
    kh, kw = s.kernel
    return es * s.groups * rank * (s.cin // s.groups + kh + kw + s.cout // s.groups)


# The fused kernels with 16-bit inputs (PRECISE in cp_conv2d_fused): the output GEMM runs twice (z as hi + lo)
# and each tap's product is scaled in fp32 on the CUDA cores instead of folded into a rounded factor.


def cost_rows(s: ConvShape, rank: int, es: int, tile: tuple, precise: bool = False) -> Cost:
    rows, bw, _bc, br, _bo = tile[:5]
    oh, ow = s.out_size
    sh = s.stride2[0]
    kw = s.kernel[1]
    cin_g, cout_g = s.cin // s.groups, s.cout // s.groups
    bands, strips = _cdiv(oh, rows), _cdiv(ow, bw)
    programs = s.batch * bands * strips * s.groups
    input_rows = rows * sh + 3 - sh
    # Masked columns of the last strip and rows of the last band still run on the tensor cores.
    first = programs * input_rows * bw * kw * cin_g * br
    out = programs * rows * bw * br * cout_g * (2 if precise else 1)
    taps = programs * input_rows * bw * kw * br if precise else 0
    l2 = s.rows_kernel_factor_bytes(rank, rows, bw, es)
    return Cost(2 * (first + out), s.minimal_bytes(es) + _factor_bytes(s, rank, es), l2_bytes=l2,
                simt_flops=2 * taps, programs=programs, tile=tile)


def cost_taps(s: ConvShape, rank: int, es: int, tile: tuple, precise: bool = False, folded: bool = False) -> Cost:
    """``folded``: the kernel reads pre-folded per-tap weights (Tucker-2): no per-rank tap scaling on the CUDA
    cores, and kh*kw*Cin/G x R weights instead of the CP factors."""
    bp, _bc, br, bo = tile[:4]
    kh, kw = s.kernel
    cin_g, cout_g = s.cin // s.groups, s.cout // s.groups
    pixel_programs = _cdiv(s.out_pixels, bp) * s.groups
    r_pad = _cdiv(rank, br) * br
    o_programs = 1 if rank <= br else _cdiv(cout_g, bo)  # the sliced path recomputes stage 1 per block
    programs = pixel_programs * o_programs
    first = programs * bp * kh * kw * cin_g * r_pad
    out = pixel_programs * bp * r_pad * _cdiv(cout_g, bo) * bo * (2 if precise else 1)
    taps = programs * bp * kh * kw * r_pad if precise and not folded else 0
    l2 = es * programs * (kh * kw * cin_g * r_pad + r_pad * min(cout_g, bo) * (_cdiv(cout_g, bo) if rank <= br else 1))
    weights = es * s.groups * rank * (kh * kw * cin_g + cout_g) if folded else _factor_bytes(s, rank, es)
    return Cost(2 * (first + out), s.minimal_bytes(es) + weights, l2_bytes=l2,
                simt_flops=2 * taps, programs=programs, tile=tile)


# What one program may expect to keep in an SM's L1 between re-reads of the same tile (an assumption of the
# model: half the 256 KB an H100 or A100 SM shares between L1 and shared memory).
L1_ALLOWANCE = 128 << 10


def cost_wide(s: ConvShape, rank: int, es: int, tile: tuple, sms: int, l2_capacity: int,
              precise: bool = False) -> Cost:
    """Counted as the kernel runs: per band of ``ROWS`` output rows (the last one shorter), the first step
    computes the ring's ``RING`` input rows and each later step ``STEP * stride`` new ones, each in
    ``BLOCK_M``-pixel tiles (masked pixels still run on the tensor cores); every step computes
    ``STEP x BLOCK_W`` output pixels per output-channel block."""
    rows, step, bw, bm, _bc, br, bo = tile[:7]
    (kh, kw), (sh, sw), (dh, dw) = s.kernel, s.stride2, s.dilation2
    oh, ow = s.out_size
    cin_g, cout_g = s.cin // s.groups, s.cout // s.groups
    ring = (step - 1) * sh + (kh - 1) * dh + 1
    bw_in = (bw - 1) * sw + (kw - 1) * dw + 1
    strips = s.batch * _cdiv(ow, bw)  # (image, column strip) pairs
    work = strips * _cdiv(oh, rows)

    def tiled(pixels: int) -> int:
        return _cdiv(pixels, bm) * bm

    ring_tiles = out_steps = 0  # per (image, strip): stage-1 pixels computed, and output steps
    for band_start in range(0, oh, rows):
        steps = _cdiv(min(rows, oh - band_start), step)
        ring_tiles += tiled(ring * bw_in) + (steps - 1) * tiled(step * sh * bw_in)
        out_steps += steps
    r_pad = _cdiv(rank, br) * br
    o_blocks = _cdiv(cout_g, bo)
    ring_pixels = s.groups * strips * ring_tiles
    out_pixels = s.groups * strips * out_steps * step * bw
    first = ring_pixels * cin_g * r_pad
    out = out_pixels * r_pad * o_blocks * bo * (2 if precise else 1)
    depthwise = out_pixels * o_blocks * kh * kw * r_pad  # z is rebuilt from the ring per output block
    programs = min(work, sms) * s.groups
    ring_bytes = 4 * rank * ring * bw_in * programs  # the rings live at once
    scratch = 4 * rank * (ring_pixels + out_pixels * o_blocks * ring / step)  # written, and read from L2
    factors = es * (ring_pixels // bm * cin_g * r_pad + out_pixels // (step * bw) * o_blocks * bo * r_pad)
    # Stage 1 reads a tile's input pixels once per rank slice; past the L1 allowance the re-reads come from L2.
    x_tile = bm * cin_g * es
    x_reads = es * ring_pixels * cin_g * (_cdiv(rank, br) - 1) if x_tile > L1_ALLOWANCE else 0
    hbm = s.minimal_bytes(es) + _factor_bytes(s, rank, es)
    if ring_bytes > 0.75 * l2_capacity:  # the rings crowd L2 (x, y and factors stream through it): to HBM
        hbm += scratch
    return Cost(2 * (first + out), hbm, l2_bytes=scratch + factors + x_reads, simt_flops=2 * depthwise,
                programs=programs, tile=tile)


def _tiles(kernel: str, dtype: torch.dtype, arch: int):
    # the kernels import triton: loaded on first use
    from cpkernels.kernels import cp_conv2d_fused as fused

    return {"rows": fused.ROWS_TILES, "taps": fused.TAPS_TILES, "wide": fused.WIDE_TILES}[kernel].tiles(dtype, arch)


def candidate_costs(s: ConvShape, rank: int, dtype: torch.dtype, spec: GPUSpec, tf32: bool) -> dict[str, Cost]:
    """The cost of every strategy that can run this call (float64 runs only dense and four-stage), the
    fused kernels at their best tile."""
    es = torch.empty((), dtype=dtype).element_size()
    costs = {"dense": cost_dense(s, rank, es), "four-stage": cost_four_stage(s, rank, dtype)}
    if dtype == torch.float64:
        return costs

    def best(kernel, model, tiles=None):
        tiles = _tiles(kernel, dtype, spec.arch) if tiles is None else tiles
        return _first_least([model(t) for t in tiles], lambda c: c.seconds(spec, dtype, tf32))

    # the kernels import triton: loaded on first use
    from cpkernels.kernels.cp_conv2d_fused import rows_kernel_applies

    precise = dtype != torch.float32  # as the launcher sets PRECISE

    rows_tiles = [t for t in _tiles("rows", dtype, spec.arch) if t[3] >= rank]  # its window holds the whole rank
    if rows_tiles and rows_kernel_applies(s.kernel, s.stride2, s.dilation2, rank, rank):
        costs["fused-rows"] = best("rows", lambda t: cost_rows(s, rank, es, t, precise), rows_tiles)
    costs["fused-taps"] = best("taps", lambda t: cost_taps(s, rank, es, t, precise))
    costs["fused-wide"] = best("wide", lambda t: cost_wide(s, rank, es, t, spec.sms, spec.l2_bytes, precise))
    return costs


def tucker2_candidate_costs(s: ConvShape, rank: tuple[int, int], dtype: torch.dtype, spec: GPUSpec,
                            tf32: bool) -> dict[str, Cost]:
    """The cost of every :data:`TUCKER2_STRATEGIES` entry for per-group ranks ``(R_out, R_in)``."""
    es = torch.empty((), dtype=dtype).element_size()
    r_out, r_in = rank
    (kh, kw), g = s.kernel, s.groups
    cin_g = s.cin // g
    n, (h, w) = s.batch, s.size
    weight = s.cout * cin_g * kh * kw
    fold = g * r_out * r_in * kh * kw * cin_g  # input factor into the core: the per-tap weights
    costs = {"dense": Cost(2 * (s.dense_macs() + fold + weight * r_out), s.minimal_bytes(es) + 2 * weight * es,
                           launches=3)}
    t1, t2 = n * h * w * g * r_in, s.out_pixels * g * r_out  # the two intermediates
    costs["three-stage"] = Cost(2 * s.tucker2_macs(rank), s.minimal_bytes(es) + 2 * es * (t1 + t2), launches=3)
    if dtype == torch.float64:
        return costs
    precise = dtype != torch.float32
    best = _first_least([cost_taps(s, r_out, es, t, precise, folded=True) for t in _tiles("taps", dtype, spec.arch)],
                        lambda c: c.seconds(spec, dtype, tf32))
    costs["fused-taps"] = Cost(best.flops + 2 * fold, best.hbm_bytes, best.l2_bytes, best.simt_flops,
                               best.launches + 1, best.programs, best.tile)
    return costs


def svd_candidate_costs(s: ConvShape, rank: int, dtype: torch.dtype, spec: GPUSpec, tf32: bool) -> dict[str, Cost]:
    """The cost of every :data:`SVD_STRATEGIES` entry for per-group rank R of a 1x1 layer."""
    es = torch.empty((), dtype=dtype).element_size()
    weight = s.cout * (s.cin // s.groups)
    return {"dense": Cost(2 * (s.dense_macs() + weight * rank), s.minimal_bytes(es) + 2 * weight * es, launches=2),
            "two-stage": Cost(2 * s.svd_macs(rank), s.minimal_bytes(es) + 2 * es * s.out_pixels * s.groups * rank,
                              launches=2)}


# Each family's candidate costs; a call's family is named by its op (cpkernels.ops.frontend.FactoredOp.plan_family),
# never told by its rank's type. CP is the default of the functions below.
CANDIDATE_COSTS = {"cp": candidate_costs, "tucker2": tucker2_candidate_costs, "svd": svd_candidate_costs}


def _family(family: str) -> str:
    if family not in CANDIDATE_COSTS:
        raise ValueError(f"family must be one of {tuple(CANDIDATE_COSTS)}, got {family!r}")
    return family


@dataclass(frozen=True)
class GPUPlan:
    """The choice for one call: ``chosen`` (a key of :data:`STRATEGIES`), every candidate's modeled time,
    and, when the measured mode decided, the measured times of the candidates it timed and ``refused``:
    the candidates it ran that disagreed with the reference, by their largest difference relative to the
    reference's largest |value| (never picked, never timed)."""
    gpu: str
    chosen: str
    modeled_us: dict = field(default_factory=dict)
    measured_us: Optional[dict] = None
    refused: Optional[dict] = None

    @property
    def model_choice(self) -> Optional[str]:
        """What the model alone picks (None where no candidate was modeled)."""
        return _first_least(self.modeled_us, self.modeled_us.get)

    def as_dict(self) -> dict:
        out = {"gpu": self.gpu, "chosen": self.chosen, "modeled_us": self.modeled_us}
        if self.measured_us is not None:
            out["measured_us"] = self.measured_us
        if self.refused is not None:
            out["refused"] = self.refused
        return out


def _first_least(items, value: Callable):
    """The first of ``items`` with the least ``value(item)``. A loop, not ``min(key=)``: the model runs inside
    ``torch.compile(fullgraph=True)`` when a compiled call's signature has no plan yet, and dynamo cannot trace
    ``min`` with a key."""
    best, best_value = None, None
    for item in items:
        v = value(item)
        if best is None or v < best_value:
            best, best_value = item, v
    return best


def model_plan(s: ConvShape, rank, dtype: torch.dtype, spec: GPUSpec, tf32: bool = True,
               family: str = "cp") -> GPUPlan:
    """The model's choice: the candidate with the least modeled time. ``rank``: an int (CP, the default family,
    or the SVD family's with ``family="svd"``) or a pair ``(R_out, R_in)`` with ``family="tucker2"``."""
    costs = CANDIDATE_COSTS[_family(family)](s, rank, dtype, spec, tf32)
    modeled = {k: round(c.seconds(spec, dtype, tf32) * 1e6, 2) for k, c in costs.items()}
    return GPUPlan(spec.name, _first_least(modeled, modeled.get), modeled)


# --------------------------------------------------------------------------------------------------
# Per-call choice (what backend="auto" on a CUDA tensor follows)
# --------------------------------------------------------------------------------------------------
_CACHE: dict[tuple, GPUPlan] = {}
# Counts clear_cache() calls: a choice a layer memoised (cpkernels.ops.frontend.layer_conv2d) goes with the cache.
_generation = 0


def clear_cache() -> None:
    global _generation
    _CACHE.clear()
    _generation += 1


def plan_state() -> tuple:
    """What a settled choice (:func:`settled`) depends on besides its call signature: the switches
    :func:`measuring` reads, the TF32 switch :func:`choose` keys on, and the cache's generation. A layer keeps the
    choice of a signature while this is unchanged (the switches read raw, as :func:`cpkernels.dispatch.cpu.plan_state`
    does, to keep each call cheap)."""
    return MEASURE, _generation, torch.are_deterministic_algorithms_enabled(), gpu_plan_switch(), \
        torch.backends.cudnn.allow_tf32


def settled(plan: GPUPlan) -> bool:
    """Whether :func:`choose` gives ``plan`` again for its signature while :func:`plan_state` holds: a measured
    choice it cached, or any choice while the plan does not measure. The model's stand-in for a choice still to
    be measured (the call could not time, or no candidate agreed) is not: a later call measures."""
    return bool(plan.measured_us) or not measuring()


def measuring() -> bool:
    """Whether a new call signature is to be timed: :data:`MEASURE` if set, else ``CPKERNELS_GPU_PLAN``; left
    unset, it measures unless ``torch.use_deterministic_algorithms(True)`` asked for run-to-run identical
    results. Whether a call can time now is :func:`timing_impossible`."""
    return plan_measures(MEASURE, "CPKERNELS_GPU_PLAN", gpu_plan_mode)


def timing_impossible() -> bool:
    """Whether this call runs where nothing may be timed: traced by torch.compile or torch.export (dynamo), by
    a TorchScript trace or an ONNX export (the timing runs would be recorded, or fail on fake tensors), or
    captured into a CUDA graph (a capture may not synchronise). Checked in that order: under dynamo the first
    answer is a constant, and the CUDA query is never traced."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    # CPU-only builds of torch raise on the capture query; no capture runs without CUDA initialised.
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def call_key(x: torch.Tensor, rank, groups: int, cout: int, kernel_size, stride, padding, dilation,
             tf32: bool, family: str, mode: str) -> tuple:
    """Everything that changes the choice: the device, the input's shape, dtype and layout, the layer's
    dimensions and conv arguments, the TF32 switch, the family, and the mode that decided (``"model"`` or
    ``"measure"``: a model choice never stands in for a measured one, nor the reverse)."""
    if mode not in GPU_PLAN_MODES:
        raise ValueError(f"mode must be one of {GPU_PLAN_MODES}, got {mode!r}")
    return (x.device, tuple(x.shape), groups, rank, cout, tuple(kernel_size), tuple(stride), tuple(padding),
            tuple(dilation), x.dtype, is_channels_last(x), tf32, _family(family), mode)


def shape_of_call(x: torch.Tensor, groups: int, cout: int, kernel_size, stride, padding, dilation) -> ConvShape:
    """The cost model's shape of a call; ``padding`` is ``(top, bottom, left, right)`` (the model takes the
    mean per axis: asymmetric padding changes the output by at most one row or column)."""
    n, cin, h, w = x.shape
    pad = ((padding[0] + padding[1]) // 2, (padding[2] + padding[3]) // 2)
    return ConvShape(n, cin, cout, (h, w), tuple(kernel_size), tuple(stride), pad, groups, tuple(dilation))


def measured_candidates(modeled_us: dict, family: str, top: Optional[int] = None) -> tuple[str, ...]:
    """What the measured mode times: the model's ``top`` (default :data:`MEASURED_TOP`) fastest candidates by
    modeled time, then dense and the family's reference, each once."""
    top = MEASURED_TOP if top is None else top
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    ranked = sorted(modeled_us, key=modeled_us.get)[:top]
    return tuple(dict.fromkeys([*ranked, "dense", REFERENCE_STRATEGY[_family(family)]]))


def choose(x: torch.Tensor, rank, groups: int, cout: int, kernel_size, stride, padding, dilation,
           run: Optional[Callable[[str], torch.Tensor]] = None, spec: Optional[GPUSpec] = None,
           family: str = "cp", timer: Optional[Callable[[Callable[[], object]], float]] = None) -> GPUPlan:
    """The plan for one call, cached per :func:`call_key`. ``rank``: an int for a CP layer (the default
    family), a pair ``(R_out, R_in)`` with ``family="tucker2"`` (:data:`TUCKER2_STRATEGIES`), an int with
    ``family="svd"`` for a low-rank 1x1 layer (:data:`SVD_STRATEGIES`). ``run(strategy)`` computes the call with
    one strategy; the measured mode needs it, and without it (or where :func:`timing_impossible`) the call takes
    a measured choice already cached for its signature, else the model's (the module docstring). ``timer``
    (default :data:`TIMER`, then the package's timer) gets ``partial(run, strategy)`` and returns seconds."""
    family = _family(family)
    tf32 = torch.backends.cudnn.allow_tf32  # fp32 inputs, and the fp32 four stages of bf16 inputs, follow it
    signature = (x, rank, groups, cout, kernel_size, stride, padding, dilation, tf32, family)
    if measuring():
        key = call_key(*signature, "measure")
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        if run is not None and not timing_impossible():
            modeled = _model_choice(signature, spec)
            plan = _measured_plan(modeled, run, x.dtype, family, timer or TIMER)
            if plan.measured_us:
                _CACHE[key] = plan
            return plan
    return _model_choice(signature, spec)


def _model_choice(signature: tuple, spec: Optional[GPUSpec]) -> GPUPlan:
    """The model's plan for a call signature, cached under the ``"model"`` mode (the measured mode ranks its
    candidates by it too)."""
    key = call_key(*signature, "model")
    cached = _CACHE.get(key)
    if cached is None:
        x, rank, groups, cout, kernel_size, stride, padding, dilation, tf32, family = signature
        if spec is None:
            spec = spec_for_device(x.device) if x.device.type == "cuda" else GPUS["h100"]
        shape = shape_of_call(x, groups, cout, kernel_size, stride, padding, dilation)
        cached = _CACHE[key] = model_plan(shape, rank, x.dtype, spec, tf32, family)
    return cached


def _measured_plan(modeled: GPUPlan, run: Callable[[str], torch.Tensor], dtype: torch.dtype, family: str,
                   timer: Optional[Callable]) -> GPUPlan:
    """The fastest of :func:`measured_candidates` that agrees with the reference (dense where none beats it by
    :data:`cpkernels.dispatch.measured.DENSE_MARGIN`). Where none agrees (the
    reference itself fails the check: its output is not finite, so nothing can be compared), the model's
    choice runs, recorded with empty times so that the caller caches nothing and the next call measures."""
    refused: dict[str, float] = {}
    times = measure(run, measured_candidates(modeled.modeled_us, family), dtype, timer=timer,
                    reference=REFERENCE_STRATEGY[family], refused=refused)
    chosen = fastest_keeping_dense(times, "dense") if times else modeled.chosen
    return GPUPlan(modeled.gpu, chosen, modeled.modeled_us, times, refused)


def measured_plans() -> dict[tuple, GPUPlan]:
    """The measured mode's decisions so far, by :func:`call_key` (a copy)."""
    return {key: plan for key, plan in _CACHE.items() if key[-1] == "measure"}


def per_pixel(s: ConvShape, rank: int, dtype: torch.dtype, spec: GPUSpec, tf32: bool = True) -> dict:
    """MACs, HBM bytes and modeled nanoseconds per output pixel of each candidate (docs/kernel.md)."""
    px = s.out_pixels
    out = {}
    for k, c in candidate_costs(s, rank, dtype, spec, tf32).items():
        out[k] = {"macs": round(c.flops / 2 / px), "hbm_bytes": round(c.hbm_bytes / px, 1),
                  "ns": round(c.seconds(spec, dtype, tf32) / px * 1e9, 3), "tile": c.tile}
    return out


__all__ = ["GPUS", "GPUPlan", "GPUSpec", "STRATEGIES", "SVD_STRATEGIES", "TUCKER2_STRATEGIES", "choose", "gpu_spec",
           "measure", "measured_plans", "model_plan"]
