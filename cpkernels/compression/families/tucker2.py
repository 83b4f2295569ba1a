"""The Tucker-2 family: ``TuckerConv2d``, a rank pair ``(R_out, R_in)`` per group, ladders on the split in
proportion to the channel counts, HOOI rungs each starting from the rung above."""
from __future__ import annotations

import math
from typing import Callable, Sequence

from torch import nn

from cpkernels.compression.families.base import Family, Rung, round_up
from cpkernels.compression.vbmf import conv_tucker2_ranks
from cpkernels.core.cost import ConvShape
from cpkernels.decompositions.tucker2 import _decompose_at_rank, largest_proportional_ranks, resolve_tucker2_rank
from cpkernels.dispatch.gpu import TUCKER2_STRATEGIES
from cpkernels.factors import Tucker2Factors, tucker2_params
from cpkernels.modules.tucker2 import TuckerConv2d
from cpkernels.ops.tucker2_conv2d import tucker2_conv2d


class Tucker2Family(Family):
    name = "tucker2"
    module = TuckerConv2d
    op = staticmethod(tucker2_conv2d)
    factors = Tucker2Factors
    gpu_strategies = TUCKER2_STRATEGIES
    decompose_options = ("n_iter_max", "random_state", "input_covariance")  # the others are CP's ALS settings
    onnx_forms = ("merged", "dense")  # one factored form, its three convs ("two" would be the same file)

    def owns(self, rank) -> bool:
        return isinstance(rank, (tuple, list)) and len(rank) == 2

    def normalise(self, rank) -> tuple[int, int]:
        return tuple(rank)

    def rank_text(self, rank) -> str:
        return "x".join(map(str, rank))

    def resolve(self, policy, conv: nn.Conv2d) -> tuple[int, int]:
        return resolve_tucker2_rank(policy, tuple(conv.weight.shape), conv.groups)

    def round_up(self, rank, conv: nn.Conv2d, multiple: int) -> tuple[int, int]:
        r_out, r_in = rank
        return (min(round_up(r_out, multiple), conv.out_channels // conv.groups),
                min(round_up(r_in, multiple), conv.in_channels // conv.groups))

    def macs(self, shape: ConvShape, rank) -> int:
        return shape.tucker2_macs(tuple(rank))

    def params(self, conv: nn.Conv2d, rank) -> int:
        return tucker2_params(conv.out_channels, conv.in_channels, conv.kernel_size, conv.groups, tuple(rank))

    def fused_macs(self, shape: ConvShape, rank) -> int:
        return shape.tucker2_fused_macs(tuple(rank))

    def ladder(self, conv: nn.Conv2d, dense: float, cost: Callable, multiple: int, fractions: Sequence[float],
               max_rank: float) -> list[tuple[int, int]]:
        """Per fraction, the largest pair on the proportional split within it (ranks rounded up to ``multiple``),
        cheaper than dense; the channel modes bound the ranks, so ``max_rank`` has nothing to cap."""
        cout_g, cin_g = conv.out_channels // conv.groups, conv.in_channels // conv.groups
        pairs = {largest_proportional_ranks(cost, f * dense, cout_g, cin_g, multiple) for f in fractions}
        return sorted((p for p in pairs if p is not None and cost(p) < dense), reverse=True)

    def rungs(self, weight, groups: int, ranks: list, cost: Callable, dense: float, multiple: int,
              options: dict) -> list[Rung]:
        rungs, start = [], None
        for r in sorted(ranks, reverse=True):
            f = _decompose_at_rank(weight, r, groups, n_iter_max=options["n_iter_max"],
                                   random_state=options["random_state"], start=start)
            rungs.append((cost(r), f.relative_error(weight), r, f))
            start = f
        return rungs

    def at_rank(self, weight, rank, groups: int, options: dict) -> Tucker2Factors:
        return _decompose_at_rank(weight, tuple(rank), groups, n_iter_max=options["n_iter_max"],
                                  random_state=options["random_state"])

    def vbmf_estimate(self, conv: nn.Conv2d) -> tuple[int, int]:
        return conv_tucker2_ranks(conv.weight, conv.groups)

    def scaled(self, estimate, k: float, conv: nn.Conv2d, multiple: int) -> tuple[int, int]:
        caps = (conv.out_channels // conv.groups, conv.in_channels // conv.groups)
        return tuple(min(round_up(max(1, math.ceil(k * e)), multiple), cap) for e, cap in zip(estimate, caps))


TUCKER2 = Tucker2Family()
