"""The truncated SVD of a 1x1 conv weight: the best rank-R approximation (Eckart-Young), exact, with no
iterations and no degeneracy.

    W[g*Cog + o, c] ~= sum_r output[g, o, r] * input[g, c, r]      (one SVD per group)

The singular values are split evenly between the two factors (``U sqrt(S)`` and ``V sqrt(S)``): both 1x1
convs of the layer then carry weights of one scale, which keeps 16-bit layers and fine-tuning well
conditioned. With ``input_covariance`` the SVD is of the input-whitened weight ``W S^(1/2)``, its input
factor taken back by ``S^(-1/2)``: for a 1x1 conv the output error on inputs of second moments ``S`` is exactly
``||(W - W_hat) S^(1/2)||``, so this is that error's optimum, not an approximation of it.

A 1x1 conv ``Cin -> Cout`` at rank R costs ``R (Cin + Cout)`` per pixel and group against ``Cin Cout`` dense:
it saves only below ``Cin Cout / (Cin + Cout)`` per group (:func:`saves`).
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from cpkernels.decompositions.whitening import check_weight, input_whitening, is_scaled_identity, whiten_input_mode
from cpkernels.factors import SVDFactors

SVDRankSpec = Union[int, float]


def _channels(weight_shape: Sequence[int], groups: int) -> tuple[int, int]:
    """``(Cout/G, Cin/G)``."""
    return weight_shape[0] // groups, weight_shape[1]


def saves(rank: int, weight_shape: Sequence[int], groups: int = 1) -> bool:
    """Whether rank ``rank`` per group holds (and costs) less than the dense 1x1 weight."""
    cout_g, cin_g = _channels(weight_shape, groups)
    return rank * (cout_g + cin_g) < cout_g * cin_g


def resolve_svd_rank(rank: SVDRankSpec, weight_shape: Sequence[int], groups: int = 1) -> int:
    """A rank policy as the per-group rank: an ``int`` from 1 to ``min(Cout/G, Cin/G)``, or a ``float`` in
    (0, 1], the largest rank whose factors hold at most that fraction of the dense weight's values (at least 1)."""
    cout_g, cin_g = _channels(weight_shape, groups)
    full = min(cout_g, cin_g)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise TypeError(f"an SVD rank must be an int >= 1 or a float in (0, 1], got {rank!r}")
    if isinstance(rank, numbers.Integral):
        if not 1 <= rank <= full:
            raise ValueError(f"an SVD rank must lie in [1, {full}] (min(Cout/G, Cin/G) of a weight of shape "
                             f"{tuple(weight_shape)} with groups={groups}), got {rank}")
        return int(rank)
    if not (0.0 < rank <= 1.0) or math.isnan(rank):
        raise ValueError(f"a fractional rank must lie in (0, 1], got {rank}")
    return max(1, min(full, int(rank * cout_g * cin_g // (cout_g + cin_g))))


def _check_pointwise(weight: Tensor, groups: int) -> None:
    check_weight(weight, groups)
    if tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"the truncated SVD factors 1x1 convs, got a weight of shape {tuple(weight.shape)} "
                         "(a kh x kw conv takes CP or Tucker-2)")


def singular_triplets(weight: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(U [G, Cout/G, K], S [G, K], V [G, Cin/G, K])`` of each group's ``Cout/G x Cin/G`` matrix, float64,
    ``K = min(Cout/G, Cin/G)``, singular values largest first."""
    w = weight.detach().to(torch.float64).reshape(groups, weight.shape[0] // groups, weight.shape[1])
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u, s, vh.transpose(1, 2)


def truncated(u: Tensor, s: Tensor, v: Tensor, rank: int) -> SVDFactors:
    """The rank-``rank`` factors of one SVD (float64), the singular values split evenly."""
    root = s[:, None, :rank].sqrt()
    return SVDFactors(u[:, :, :rank] * root, v[:, :, :rank] * root)


def tail_errors(s: Tensor) -> Tensor:
    """``e[r]``, the relative error of rank ``r`` (0 .. K): ``sqrt(sum_{k >= r} s_k^2) / ||W||`` over all groups
    at once (every group truncated at the same rank); 0 for a zero weight."""
    power = (s * s).flip(-1).cumsum(-1).flip(-1).sum(0)  # [K]: the squared tail from each rank on
    total = float(power[0]) if power.numel() else 0.0
    tails = torch.cat([power, power.new_zeros(1)])
    return (tails / total).sqrt() if total > 0 else torch.zeros_like(tails)


def decompose_svd(
    weight: Tensor,
    rank: Optional[SVDRankSpec] = None,
    *,
    groups: int = 1,
    target_error: Optional[float] = None,
    input_covariance: Optional[Tensor] = None,
) -> SVDFactors:
    """The truncated SVD of a 1x1 conv weight ``[Cout, Cin/groups, 1, 1]``, one per group.

    Args:
        weight: the dense 1x1 conv weight; never modified. Finite values; an all-zero weight has the exact
            all-zero factors.
        rank: an ``int`` per group, or a ``float`` in (0, 1] (that fraction of the dense parameters). A rank
            that saves nothing (``R >= Cin Cout / (Cin + Cout)`` per group) is refused: a dense 1x1 conv
            is then as cheap. Leave it ``None`` when giving ``target_error``.
        groups: the conv's groups.
        target_error: the smallest rank whose relative weight error (with ``input_covariance``: the
            output-weighted error) is at most this; a warning where only a rank that saves nothing meets it.
        input_covariance: ``(Cin, Cin)`` second moments of the conv's inputs: the SVD of ``W S^(1/2)``,
            un-whitened, the optimum of the conv's output error on such inputs.

    Returns:
        :class:`SVDFactors` in the weight's dtype and on its device.
    """
    _check_pointwise(weight, groups)
    shape = tuple(weight.shape)
    if target_error is not None:
        if rank is not None:
            raise ValueError("give either rank or target_error, not both")
        if not (target_error > 0.0) or math.isnan(target_error):
            raise ValueError(f"target_error must be > 0, got {target_error}")
    elif rank is None:
        raise ValueError("decompose_svd needs a rank (an int or a fraction) or a target_error")
    else:
        rank = resolve_svd_rank(rank, shape, groups)
        if not saves(rank, shape, groups):
            cout_g, cin_g = _channels(shape, groups)
            raise ValueError(f"SVD rank {rank} saves nothing on a 1x1 conv of shape {shape} with groups={groups}: "
                             f"a rank saves only below Cin*Cout/(Cin+Cout) = {cin_g * cout_g / (cin_g + cout_g):.2f} "
                             "per group")
    inverse = None
    target = weight
    if input_covariance is not None:
        root, inverse = input_whitening(input_covariance, shape[1] * groups, groups)
        if is_scaled_identity(input_covariance):  # weighs every channel alike: the plain SVD
            inverse = None
        else:
            target = whiten_input_mode(weight, root)
    u, s, v = singular_triplets(target, groups)
    if target_error is not None:
        errors = tail_errors(s)
        rank = max(1, next(r for r in range(len(errors)) if float(errors[r]) <= target_error))
        if not saves(rank, shape, groups):
            warnings.warn(f"no SVD rank that saves parameters reaches a relative error of {target_error} for a "
                          f"weight of shape {shape}; using rank {rank} (error {float(errors[rank]):.3g})",
                          stacklevel=2)
    factors = truncated(u, s, v, rank)
    if inverse is not None:
        factors = factors.unwhitened(inverse)
    return factors.to(device=weight.device, dtype=weight.dtype)
