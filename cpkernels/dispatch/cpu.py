"""The CPU path's plan: which arrangement of the CP stages (or the dense conv of the reconstructed
weight) runs one call on the CPU, and in what batch chunks. The stages themselves are in
:mod:`cpkernels.ops.cp_arranged`, whose docstring says what profiling showed for each choice.

Dense or staged is decided in one of two ways (``CPKERNELS_CPU_PLAN``, or :data:`MEASURE`):

- ``measure`` (the default): the first call of each signature (shape, dtype, layout, rank, layer
  dimensions, whether it needs gradients, torch's thread count) times the dense conv and the staged
  arrangement, after checking both against the reference stages, and keeps the faster for that
  signature (:func:`choose`). A compressed layer then runs the faster of its two forms on the machine
  it runs on, up to timing noise; against the ``nn.Conv2d`` it replaced it also pays this package's
  per-call Python work (a layer memoises its checks and this plan per call signature, see
  :func:`cpkernels.ops.frontend.layer_conv2d`: a few microseconds, ``bench/per_call.py``). The cost rule below
  missed layers on one machine (CP at R = C on 256->256 stride 2 @28^2 ran 0.84x dense in one run and
  1.66x in another; ResNet-18 at batch 1 ran 0.61-0.75x dense end to end), and no fixed constant fits
  every CPU.
- ``model``: the cost rule alone (:func:`dense_is_cheaper`), with no timing: the same choice on every
  machine and on every run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from cpkernels.core.conv_args import is_channels_last
from cpkernels.core.cost import ConvShape
from cpkernels.core.switches import cpu_plan_mode, cpu_plan_switch
from cpkernels.dispatch.measured import fastest_keeping_dense, measure, plan_measures

# The im2col depthwise conv: for at most this many intermediate channels (it does channels times the
# depthwise MACs), and while its column buffer (kh*kw times the output) stays under this size; past
# it, first-touch page faults of the buffer cost more than the idle vector lanes (a 5x5 at rank 1 on
# 8x224x224: 14.5 ms against 2.3 ms for oneDNN).
IM2COL_MAX_CHANNELS = 2
IM2COL_MAX_BYTES = 16 << 20
# Without groups, from this rank up the intermediates are pixel-major (``stages`` in ops/cp_arranged.py); under it
# the first GEMM's narrow [Cin, R] operand made MKL 2-4x slower than the NCHW arrangement.
PIXEL_MAJOR_MIN_RANK = 16


# ATen's im2col conv (``thnn_conv2d``, present in every torch release this package supports); without
# it the depthwise stage stays a grouped conv.
_HAS_THNN_CONV2D = hasattr(torch._C._nn, "thnn_conv2d")


def depthwise_by_im2col(n: int, channels: int, kernel_size, out_size, dilation, element_size: int) -> bool:
    """Whether the depthwise stage over ``n`` images of ``channels`` intermediate channels runs as an
    im2col conv (on NCHW intermediates)."""
    column_bytes = n * channels * kernel_size[0] * kernel_size[1] * out_size[0] * out_size[1] * element_size
    return (
        _HAS_THNN_CONV2D and channels <= IM2COL_MAX_CHANNELS and tuple(dilation) == (1, 1)
        and column_bytes <= IM2COL_MAX_BYTES
    )


# Inference in NCHW runs the batch in chunks whose rank-R intermediate stays near this size, so the
# intermediates stay in cache and their memory is reused instead of page-faulted in fresh each call
# (a 128-channel 112x112 batch-8 layer: 50 ms whole, 33 ms in chunks of 4, on a 2-core x86 CPU).
CHUNK_BYTES = 8 << 20
# Inference on an image whose rank-R intermediate alone exceeds CHUNK_BYTES runs in bands of output rows
# (``banded``, ops/banded.py) whose stage-1 rows take about this much: on HED's 416x640 and 208x320 convs
# (2-core AVX2 EPYC) bands of 3-8 MB ran within 4 % of each other, and 1.6 MB bands (8 rows of conv1_2) 15 %
# slower.
BAND_BYTES = 4 << 20
# The banded arrangement pads the rank to a multiple of this: MKL's fp32 GEMM ran 1.5x faster at 80 columns
# than at 77 there, and the depthwise taps then fill whole AVX2 vectors.
RANK_ALIGN = 8


def aligned_rank(rank: int) -> int:
    """``rank`` rounded up to a multiple of :data:`RANK_ALIGN` (the banded arrangement's padded rank)."""
    return -(-rank // RANK_ALIGN) * RANK_ALIGN


# The model's constant: MACs per byte moved at which the CPU is as busy computing as moving data.
# On the 2-core x86 machine the project was tuned on, a square fp32 matmul ran at ~90 GMAC/s and a
# freshly allocated 51 MB activation cost ~9 ms of first-touch page faults (~6 GB/s) before any copy;
# 5 sits between those rates.
MACS_PER_BYTE = 5.0
# Below this many dense MACs (~0.1 ms of dense conv there) per-call costs decide, not MACs or bytes:
# oneDNN's conv set-up alone took 40-60 us a call, and the CP stages (two GEMMs and a depthwise conv)
# ran faster, e.g. the 3->2 5x5 conv at rank 1 on 8x3x32x32: 70 us against 135 us dense.
DENSE_MIN_MACS = 10_000_000


def dense_is_cheaper(x: Tensor, rank: int, groups: int, cout: int, kernel_size, out_size) -> bool:
    """Whether the dense conv beats the CP stages on the CPU.

    The dense conv is one op that overlaps its compute with its memory traffic: max(MACs, bytes). The CP
    stages are separate passes, each streaming a rank-R intermediate: MACs + bytes. The sum is what
    caught a layer whose max() said CP: 128->128 stride 2 @56^2 at R = 160 (1.4x fewer MACs, and an R > C
    intermediate at the input's resolution) ran 0.84-0.90x dense in channels_last and 1.0-1.1x in NCHW
    (batch 8, 2-core x86); the same MAC ratio with smaller intermediates (256->256 stride 2 @28^2 at
    R = 320) ran 1.1-1.5x faster than dense and stays CP.
    """
    shape = _shape_of(x, groups, cout, kernel_size, out_size)
    dense_macs = shape.dense_macs()
    if dense_macs < DENSE_MIN_MACS:
        return False
    es = x.element_size()
    return _dense_wins(dense_macs, shape.minimal_bytes(es), shape.cp_macs(rank, merged_depthwise=True),
                       shape.staged_bytes(es, rank, rank))


def _shape_of(x: Tensor, groups: int, cout: int, kernel_size, out_size) -> ConvShape:
    n, cin, h, w = x.shape
    return ConvShape(n, cin, cout, (h, w), tuple(kernel_size), groups=groups, output=tuple(out_size))


def _dense_wins(dense_macs: int, dense_bytes: int, staged_macs: int, staged_bytes: int) -> bool:
    """One dense conv overlaps compute and memory (max); separate stages add them."""
    return max(dense_macs, MACS_PER_BYTE * dense_bytes) < staged_macs + MACS_PER_BYTE * staged_bytes


def tucker2_dense_is_cheaper(x: Tensor, rank: tuple[int, int], groups: int, cout: int, kernel_size, out_size) -> bool:
    """:func:`dense_is_cheaper` for the three Tucker-2 stages (per-group ranks ``(R_out, R_in)``): the same
    rule, with the core conv's MACs and the two intermediates (G R_in at the input's size, G R_out at the
    output's)."""
    shape = _shape_of(x, groups, cout, kernel_size, out_size)
    dense_macs = shape.dense_macs()
    if dense_macs < DENSE_MIN_MACS:
        return False
    es = x.element_size()
    r_out, r_in = rank
    return _dense_wins(dense_macs, shape.minimal_bytes(es), shape.tucker2_macs(rank), shape.staged_bytes(es, r_in, r_out))


@dataclass(frozen=True)
class Plan:
    """How the CPU path computes one call.

    ``arrangement``: ``"dense-weight"`` (dense conv of the reconstructed weight), ``"im2col"`` (NCHW
    intermediates, im2col depthwise conv), ``"pixel-major"`` (channels_last intermediates between GEMMs),
    ``"nchw"`` (NCHW intermediates, grouped depthwise conv), for channels_last inputs
    ``"channels-last-im2col"`` and ``"channels-last-convs"`` (1x1 and depthwise convs), or for either layout
    ``"banded"`` (the stages over bands of output rows, in cache). ``chunk``: images per batch chunk (the whole
    batch when not chunked); for ``"banded"``, output rows per band.
    """

    arrangement: str
    chunk: int


DENSE = "dense-weight"
BANDED = "banded"


def plan(x: Tensor, rank: int, groups: int, cout: int, kernel_size, out_size, dilation, needs_grad: bool) -> Plan:
    """The cost rule's choice for ``x`` (4-D) and a layer of these dimensions; see the module docstring."""
    if dense_is_cheaper(x, rank, groups, cout, kernel_size, out_size):
        return Plan(DENSE, x.shape[0])
    return staged_plan(x, rank, groups, cout, kernel_size, out_size, dilation, needs_grad)


def banded_plan(x: Tensor, rank: int, groups: int, out_size, needs_grad: bool) -> Optional[Plan]:
    """``Plan(BANDED, output rows per band)`` where one image's first rank-``rank`` intermediate exceeds
    :data:`CHUNK_BYTES` at inference without groups (CP's rank, Tucker-2's R_in), else None."""
    _, _, h, w = x.shape
    es = x.element_size()
    if needs_grad or groups != 1 or rank < PIXEL_MAJOR_MIN_RANK or rank * h * w * es <= CHUNK_BYTES:
        return None
    row_bytes = w * aligned_rank(rank) * es  # one input row's first-stage output
    rows_per_output_row = max(1, h // max(1, out_size[0]))  # about the vertical stride
    return Plan(BANDED, max(1, BAND_BYTES // (row_bytes * rows_per_output_row)))


def staged_plan(x: Tensor, rank: int, groups: int, cout: int, kernel_size, out_size, dilation,
                needs_grad: bool) -> Plan:
    """The arrangement of the CP stages for ``x`` (4-D) and a layer of these dimensions."""
    n, _, h, w = x.shape
    es = x.element_size()
    banded = banded_plan(x, rank, groups, out_size, needs_grad)
    if banded is not None:
        return banded
    if is_channels_last(x):
        if groups == 1 and depthwise_by_im2col(n, rank, kernel_size, out_size, dilation, es):
            return Plan("channels-last-im2col", n)
        return Plan("channels-last-convs", n)
    # NCHW inference runs in batch chunks; out= writes have no autograd, so training takes the whole batch.
    chunk = n if needs_grad else max(1, min(n, CHUNK_BYTES // max(1, groups * rank * h * w * es)))
    if depthwise_by_im2col(chunk, groups * rank, kernel_size, out_size, dilation, es):
        return Plan("im2col", chunk)
    if groups == 1 and rank >= PIXEL_MAJOR_MIN_RANK:
        return Plan("pixel-major", chunk)
    return Plan("nchw", chunk)




# --------------------------------------------------------------------------------------------------
# Measured mode
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeasuredPlan:
    """What the measured mode kept for one call signature, with the median microseconds of each candidate."""

    plan: Plan
    measured_us: dict[str, float] = field(default_factory=dict)


# Overridden by tests and users: True times dense against the staged arrangement, False takes the cost rule.
MEASURE: Optional[bool] = None
_CACHE: dict[tuple, MeasuredPlan] = {}
# Counts clear_cache() calls: a plan a layer memoised (cpkernels.ops.frontend.layer_conv2d) is forgotten with the cache.
_generation = 0


def measuring() -> bool:
    """:data:`MEASURE` if set, else ``CPKERNELS_CPU_PLAN``; left unset, it measures unless
    ``torch.use_deterministic_algorithms(True)`` asked for run-to-run identical results (a timed choice can
    differ between runs, and the two forms round differently)."""
    return plan_measures(MEASURE, "CPKERNELS_CPU_PLAN", cpu_plan_mode)


def clear_cache() -> None:
    global _generation
    _CACHE.clear()
    _generation += 1


def plan_state() -> tuple:
    """What a plan depends on besides its call signature: the switches :func:`measuring` reads, and the cache's
    generation. A plan memoised for a signature stays valid while this is unchanged; reading the switches raw
    (not through :func:`measuring`) keeps it cheap on every call, and a changed or invalid value then goes back
    through :func:`measuring` and its checks."""
    return MEASURE, _generation, torch.are_deterministic_algorithms_enabled(), cpu_plan_switch()


def call_key(x: Tensor, rank, groups: int, cout: int, kernel_size, stride, padding, dilation, needs_grad: bool) -> tuple:
    """Everything that changes the measured choice (the thread count changes the libraries' speed)."""
    return (tuple(x.shape), x.dtype, is_channels_last(x), rank, groups, cout, tuple(kernel_size), tuple(stride),
            tuple(padding), tuple(dilation), needs_grad, torch.get_num_threads())


def choose(key: tuple, modeled: Plan, dense: Plan, staged: Plan, run: Callable[[str], Tensor],
           dtype: torch.dtype, needs_grad: bool) -> Plan:
    """The plan a call runs: ``modeled`` (the cost rule's) unless :func:`measuring`; then the faster of
    ``dense`` and ``staged`` on this machine, timed when ``key`` is first seen and cached (``staged`` only where
    it beats dense by :data:`cpkernels.dispatch.measured.DENSE_MARGIN`).

    ``run(name)`` computes the call by ``"reference"`` (the reference stages, the check) or by one of the
    two plans' arrangements. A call that needs gradients is timed with autograd on: its dense candidate
    then rebuilds the weight each run, as it will in training (without, the weight is reused)."""
    if not measuring():
        return modeled
    cached = _CACHE.get(key)
    if cached is None:
        with torch.set_grad_enabled(needs_grad):
            times = measure(run, (dense.arrangement, staged.arrangement), dtype, reference="reference")
        fastest = dense if fastest_keeping_dense(times, dense.arrangement) == dense.arrangement else staged
        cached = _CACHE[key] = MeasuredPlan(fastest, times)
    return cached.plan


def decided(key: tuple) -> Optional[Plan]:
    """The measured mode's plan for ``key`` if it has timed it, else None (the caller works it out)."""
    if not measuring():
        return None
    cached = _CACHE.get(key)
    return None if cached is None else cached.plan


def measured_plans() -> dict[tuple, MeasuredPlan]:
    """The measured mode's decisions so far, by call signature (a copy)."""
    return dict(_CACHE)
