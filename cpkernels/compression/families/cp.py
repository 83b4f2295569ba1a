"""The CP family: ``CPConv2d``, an int rank R per group, CP-ALS rungs warm-started from the strongest terms of
the rung above, and exact low ranks found where a weight has one."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from cpkernels.compression.families.base import Family, Rung, round_up
from cpkernels.compression.vbmf import conv_cp_rank
from cpkernels.core.cost import ConvShape
from cpkernels.decompositions.cp import _decompose_at_rank, resolve_rank, strongest_terms
from cpkernels.dispatch.gpu import STRATEGIES
from cpkernels.factors import CPFactors, params_per_rank
from cpkernels.modules.cp import CPConv2d
from cpkernels.ops.cp_conv2d import cp_conv2d

# The ladder's ALS runs in float32 on layers of at least this many weights (errors are measured in
# float64): it halves the time where time goes. Smaller layers cost little and keep float64, in which
# ALS far above an exact rank still finds it (float32 stalled there: 0.5 error at R = 48 on a rank-5
# whitened 32x32x3x3 weight).
LADDER_FP32_FROM = 1 << 16
EXACT = 1e-6  # a relative error this small is an exact decomposition: the plan looks for its smallest rank
EXACT_SCREEN = 1e-3  # a float32 rung (30 warm-started iterations) this close may be exact: float64 decides


def degeneracy(factors: CPFactors) -> float:
    """Spread of the rank-one terms' norms, max/min over ranks and groups (1 = all equal; large = some
    terms cancel each other or vanish, which makes fine-tuning unstable)."""
    norms = torch.ones(factors.groups, factors.rank, dtype=torch.float64, device=factors.device)
    for f in factors.as_tuple():
        norms = norms * torch.linalg.vector_norm(f.detach().to(torch.float64), dim=1)
    lo, hi = float(norms.min()), float(norms.max())
    return float("inf") if lo == 0.0 else hi / lo


class CPFamily(Family):
    name = "cp"
    module = CPConv2d
    op = staticmethod(cp_conv2d)
    factors = CPFactors
    gpu_strategies = STRATEGIES
    onnx_forms = ("merged", "two", "dense")  # the depthwise stage as one kh x kw conv, or kh x 1 then 1 x kw

    def owns(self, rank) -> bool:
        return isinstance(rank, int) and not isinstance(rank, bool)

    def resolve(self, policy, conv: nn.Conv2d) -> int:
        return resolve_rank(policy, tuple(conv.weight.shape), conv.groups)

    def round_up(self, rank: int, conv: nn.Conv2d, multiple: int) -> int:
        return round_up(rank, multiple)

    def macs(self, shape: ConvShape, rank: int) -> int:
        return shape.cp_macs(rank)

    def params(self, conv: nn.Conv2d, rank: int) -> int:
        return rank * params_per_rank(conv.out_channels, conv.in_channels, conv.kernel_size, conv.groups)

    def fused_macs(self, shape: ConvShape, rank: int) -> int:
        return shape.fused_kernel_macs(rank)

    def diagnostics(self, factors: CPFactors) -> dict:
        return {"degeneracy": degeneracy(factors), "cancellation": factors.cancellation()}

    def ladder(self, conv: nn.Conv2d, dense: float, cost: Callable, multiple: int, fractions: Sequence[float],
               max_rank: float) -> list[int]:
        """Each rank the largest within a fraction of the dense cost, rounded up to ``multiple``, at most
        ``max_rank`` times the larger channel count per group (the cap itself is a rung when a fraction
        reaches past it)."""
        cap = max(1, int(max_rank * max(conv.in_channels, conv.out_channels) // conv.groups))
        per_rank = cost(1)  # the cost is linear in the rank
        ranks = set()
        for f in fractions:
            r = round_up(min(max(1, int(f * dense // per_rank)), cap), multiple)
            if cost(r) < dense:
                ranks.add(r)
        return sorted(ranks, reverse=True)

    def rungs(self, weight, groups: int, ranks: list, cost: Callable, dense: float, multiple: int,
              options: dict) -> list[Rung]:
        dtype = torch.float32 if weight.numel() >= LADDER_FP32_FROM else torch.float64
        rungs, start = [], None
        for r in sorted(ranks, reverse=True):
            f = _decompose_at_rank(weight, r, groups, dtype, options,
                                   None if start is None else strongest_terms(start, r))
            rungs.append((cost(r), f.relative_error(weight), r, f))
            start = f
        if rungs:
            rungs += [x for x in smallest_exact_rank(weight, groups, rungs, cost, multiple, options) if x[0] < dense]
            rungs.sort(key=lambda x: -x[2])
        return rungs

    def at_rank(self, weight, rank: int, groups: int, options: dict) -> CPFactors:
        return _decompose_at_rank(weight, rank, groups, torch.float64, options)

    def vbmf_estimate(self, conv: nn.Conv2d) -> int:
        return conv_cp_rank(conv.weight, conv.groups)

    def scaled(self, estimate: int, k: float, conv: nn.Conv2d, multiple: int) -> int:
        return round_up(max(1, math.ceil(k * estimate)), multiple)


def smallest_exact_rank(weight, groups, rungs, cost, multiple, options) -> list[Rung]:
    """A weight of exact rank r below the smallest rung that reproduces it gets the rung r (up to
    ``multiple``). Trials start from the requested (SVD) start: a warm start from an over-complete
    fit can stall far from the exact answer (seen: 5e-4 where a cold start reached 6e-8), and so can
    ALS far above the exact rank, so the smaller rungs are tried upwards, then the gap below the
    first exact one is bisected."""
    exact = [x for x in rungs if x[1] <= EXACT_SCREEN]  # float32 rungs: confirmed in float64 below
    if not exact:
        return []
    top = min(x[2] for x in exact)

    # Swamps: ALS at the exact rank can sit near 9 % error for tens of iterations before it drops to
    # 1e-7 (a rank-5 32x32x3x3 weight from the SVD start: 60 iterations 0.089, 300 iterations 6e-8).
    exact_options = {**options, "n_iter_max": max(300, options["n_iter_max"]), "tol": 1e-12}

    def trial(r):
        f = _decompose_at_rank(weight, r, groups, torch.float64, exact_options)
        return (cost(r), f.relative_error(weight), r, f)

    low, found = 0, None
    for r in sorted(x[2] for x in rungs if x[2] < top):
        t = trial(r)
        if t[1] <= EXACT:
            found = t
            break
        low = r
    high = top if found is None else found[2]
    while high - low > multiple:
        mid = round_up((low + high) // 2, multiple)
        if mid >= high:
            break
        t = trial(mid)
        if t[1] <= EXACT:
            high, found = mid, t
        else:
            low = mid
    return [] if found is None else [found]


CP = CPFamily()
