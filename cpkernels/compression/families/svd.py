"""The SVD family: ``SVDConv2d`` for 1x1 convs, an int rank R per group, and ladders from one SVD per layer
(the truncated SVD is the optimum at every rank, so every rung is a truncation of the same factorisation)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

from torch import nn

from cpkernels.compression.families.base import Family, Rung, round_up
from cpkernels.compression.vbmf import evbmf_rank
from cpkernels.core.cost import ConvShape
from cpkernels.decompositions.svd import resolve_svd_rank, saves, singular_triplets, tail_errors, truncated
from cpkernels.dispatch.gpu import SVD_STRATEGIES
from cpkernels.factors import SVDFactors, svd_params
from cpkernels.modules.svd import SVDConv2d
from cpkernels.ops.svd_conv2d import svd_conv2d


def full_rank(conv: nn.Conv2d) -> int:
    return min(conv.in_channels, conv.out_channels) // conv.groups


class SVDFamily(Family):
    name = "svd"
    module = SVDConv2d
    op = staticmethod(svd_conv2d)
    op = staticmethod(svd_conv2d)
    factors = SVDFactors
    gpu_strategies = SVD_STRATEGIES
    decompose_options = ("input_covariance",)
    onnx_forms = ("merged", "dense")  # "merged": its two Convs (it has one factored form)

    def applies_to(self, conv: nn.Module) -> bool:
        return tuple(conv.kernel_size) == (1, 1)

    def owns(self, rank) -> bool:
        return isinstance(rank, int) and not isinstance(rank, bool)

    def resolve(self, policy, conv: nn.Conv2d) -> int:
        return resolve_svd_rank(policy, tuple(conv.weight.shape), conv.groups)

    def round_up(self, rank: int, conv: nn.Conv2d, multiple: int) -> int:
        return min(round_up(rank, multiple), full_rank(conv))

    def macs(self, shape: ConvShape, rank: int) -> int:
        return shape.svd_macs(rank)

    def params(self, conv: nn.Conv2d, rank: int) -> int:
        return svd_params(conv.out_channels, conv.in_channels, rank)

    def fused_macs(self, shape: ConvShape, rank: int) -> int:
        return shape.svd_macs(rank)  # no fused kernel: the two GEMMs are what runs

    def layer(self, conv: nn.Conv2d, rank, target_error, multiple: int, backend: str,
              decompose_kwargs: dict) -> nn.Module:
        """As every family's; a rank found for ``target_error`` that rounds up to one saving nothing (which
        :func:`cpkernels.decompose_svd` refuses) gets the plain truncation at that rank, which
        ``compress_model`` then leaves out as saving no MACs."""
        if target_error is not None:
            found = self.module.from_conv(conv, None, target_error=target_error, backend=backend,
                                          **self.options(decompose_kwargs))
            rounded = self.round_up(found.rank, conv, multiple)
            if rounded != found.rank and not saves(rounded, tuple(conv.weight.shape), conv.groups):
                return self.from_factors(self.at_rank(conv.weight.detach(), rounded, conv.groups, {}), conv, backend)
        return super().layer(conv, rank, target_error, multiple, backend, decompose_kwargs)

    def ladder(self, conv: nn.Conv2d, dense: float, cost: Callable, multiple: int, fractions: Sequence[float],
               max_rank: float) -> list[int]:
        """Each rank the largest within a fraction of the dense cost, rounded up to ``multiple``, at most the
        full rank, cheaper than dense (the full rank bounds it, so ``max_rank`` has nothing to cap)."""
        per_rank = cost(1)  # the cost is linear in the rank
        ranks = {self.round_up(max(1, int(f * dense // per_rank)), conv, multiple) for f in fractions}
        return sorted((r for r in ranks if cost(r) < dense), reverse=True)

    def rungs(self, weight, groups: int, ranks: list, cost: Callable, dense: float, multiple: int,
              options: dict) -> list[Rung]:
        if not ranks:
            return []
        u, s, v = singular_triplets(weight, groups)  # one SVD: every rung is a truncation of it
        errors = tail_errors(s)
        return [(cost(r), float(errors[r]), r, truncated(u, s, v, r)) for r in sorted(ranks, reverse=True)]

    def at_rank(self, weight, rank: int, groups: int, options: dict) -> SVDFactors:
        return truncated(*singular_triplets(weight, groups), rank)

    def vbmf_estimate(self, conv: nn.Conv2d) -> int:
        """EVBMF's rank of each group's ``Cout/G x Cin/G`` matrix, the largest over groups."""
        w = conv.weight.detach().flatten(1).unflatten(0, (conv.groups, -1))
        return max(evbmf_rank(w[g]) for g in range(conv.groups))

    def scaled(self, estimate: int, k: float, conv: nn.Conv2d, multiple: int) -> int:
        return self.round_up(max(1, math.ceil(k * estimate)), conv, multiple)


SVD = SVDFamily()
