"""CP decomposition of conv weights: rank policies, guards, one CP per group.

The ALS itself is :mod:`cpkernels.decompositions.als` (TensorLy's initialisation and update rule, MTTKRPs as GEMMs)
or TensorLy's ``parafac``. TensorLy is imported as ``tensorly`` (never ``tl``, which names
``triton.language`` in the kernels) and always used inside ``tensorly.backend_context("pytorch")``,
so nothing global changes.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Union

import torch
from torch import Tensor

from cpkernels.decompositions.als import cp_als
from cpkernels.decompositions.whitening import check_weight, input_whitening, is_scaled_identity, whiten_input_mode
from cpkernels.factors import CPFactors, params_per_rank

RankSpec = Union[int, float]


def resolve_rank(
    rank: RankSpec,
    weight_shape: tuple[int, int, int, int],
    groups: int = 1,
) -> int:
    """Turn a rank policy into an integer rank.

    Args:
        rank: an ``int >= 1``, or a ``float`` in (0, 1]: that fraction of the dense parameter count.
        weight_shape: ``(Cout, Cin/G, kh, kw)``.
        groups: the conv's groups.
    """
    cout, cin_g, kh, kw = weight_shape
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise TypeError(f"rank must be an int >= 1 or a float in (0, 1], got {rank!r}")
    if isinstance(rank, numbers.Integral):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        return int(rank)
    if not (0.0 < rank <= 1.0) or math.isnan(rank):
        raise ValueError(f"a fractional rank must lie in (0, 1], got {rank}")
    dense = cout * cin_g * kh * kw
    per_rank = params_per_rank(cout, cin_g * groups, (kh, kw), groups)
    return max(1, int(rank * dense // per_rank))


def max_useful_rank(weight_shape: tuple[int, int, int, int], groups: int = 1) -> int:
    """The largest rank whose factors hold fewer values than the dense weight (at least 1)."""
    cout, cin_g, kh, kw = weight_shape
    dense = cout * cin_g * kh * kw
    per_rank = params_per_rank(cout, cin_g * groups, (kh, kw), groups)
    return max(1, (dense - 1) // per_rank)


def exact_rank(shape) -> int:
    """A rank at which a 4-way tensor of this shape has a known exact CP (:func:`exact_cp`): the
    product of its three smallest dimensions."""
    return math.prod(shape) // max(shape)


def exact_cp(w: Tensor, rank: int) -> list[Tensor]:
    """The exact CP of a 4-way ``w`` with one term per index of its three smaller modes: those factors
    are unit vectors and the largest mode's factor holds the matching slice of ``w`` (zero terms pad it
    to ``rank >= exact_rank(w.shape)``). No term is larger than ``w`` and none cancel, where ALS at such
    over-ranks returned terms 600x the weight's norm."""
    dims = tuple(w.shape)
    full = max(range(4), key=lambda k: dims[k])
    others = [k for k in range(4) if k != full]
    terms = exact_rank(dims)
    factors = [w.new_zeros(d, rank) for d in dims]
    index = torch.cartesian_prod(*(torch.arange(dims[k], device=w.device) for k in others)).reshape(terms, 3)
    term = torch.arange(terms, device=w.device)
    for col, k in enumerate(others):
        factors[k][index[:, col], term] = 1
    factors[full][:, :terms] = w.permute(*others, full).reshape(terms, dims[full]).T
    return factors


def _cp_one(
    w: Tensor, rank: int, *, method, init, n_iter_max, tol, random_state, l2_reg, warm_start=None
) -> list[Tensor]:
    """CP of one 4-D slice ``[Cout/G, Cin/G, kh, kw]``: four ``(dim, R)`` factors, CP weights folded in.

    ``warm_start``: four ``(dim, R)`` factors to start the fast ALS from instead of ``init``.
    """
    if not bool(w.any()):
        # ALS divides by the norm: an all-zero slice has the exact all-zero CP.
        return [w.new_zeros(dim, rank) for dim in w.shape]
    if rank >= exact_rank(w.shape):
        return exact_cp(w, rank)

    def run(init_, l2):
        if method == "als":
            factors, _ = cp_als(w, rank, init=init_, n_iter_max=n_iter_max, tol=tol,
                                random_state=random_state, l2_reg=l2,
                                init_factors=warm_start if init_ == init else None)
            return factors
        return _tensorly_parafac(w, rank, init=init_, n_iter_max=n_iter_max, tol=tol,
                                 random_state=random_state, l2_reg=l2)

    try:
        factors = run(init, l2_reg)
        if not all(bool(torch.isfinite(f).all()) for f in factors):
            raise torch.linalg.LinAlgError("non-finite factors")
    except (ValueError, RuntimeError, torch.linalg.LinAlgError):
        # Tiny or over-ranked slices (1-channel inputs, 1xk kernels) break the SVD start or make the
        # ALS normal equations singular. A random start with a whisper of ridge regularisation
        # solves those; it is only used after the requested settings failed.
        ridge = max(l2_reg, 1e-10 * float(torch.linalg.vector_norm(w)) ** 2)
        factors = run("random", ridge)
    if not all(bool(torch.isfinite(f).all()) for f in factors):
        raise RuntimeError(f"CP-ALS returned non-finite factors for a weight of shape {tuple(w.shape)}")
    return factors


def _tensorly_parafac(w: Tensor, rank: int, *, init, n_iter_max, tol, random_state, l2_reg) -> list[Tensor]:
    """TensorLy's own ``parafac``: the reference the fast ALS is checked against."""
    # tensorly is imported on first use: importing cpkernels must not import it
    import tensorly
    from tensorly.decomposition import parafac

    with tensorly.backend_context("pytorch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        weights, factors = parafac(w, rank, n_iter_max=n_iter_max, init=init, tol=tol,
                                   random_state=random_state, l2_reg=l2_reg, normalize_factors=False)
    factors = [f.to(w.dtype) for f in factors]
    factors[0] = factors[0] * weights.to(w.dtype)[None, :]
    return factors


def _decompose_at_rank(
    weight: Tensor, rank: int, groups: int, compute_dtype, options, warm_start: Optional[CPFactors] = None
) -> CPFactors:
    w = weight.detach().to(compute_dtype)
    cout_g = weight.shape[0] // groups
    per_group = [
        _cp_one(w[g * cout_g:(g + 1) * cout_g], rank, **options,
                warm_start=None if warm_start is None else [f[g].to(compute_dtype) for f in warm_start.as_tuple()])
        for g in range(groups)
    ]
    stacked = [torch.stack([pg[m] for pg in per_group]) for m in range(4)]
    return CPFactors(*stacked)


def decompose_conv(
    weight: Tensor,
    rank: Optional[RankSpec] = None,
    *,
    groups: int = 1,
    target_error: Optional[float] = None,
    input_covariance: Optional[Tensor] = None,
    init: str = "svd",
    n_iter_max: int = 100,
    tol: float = 1e-8,
    random_state: int = 0,
    l2_reg: float = 0.0,
    compute_dtype: torch.dtype = torch.float64,
    method: str = "als",
) -> CPFactors:
    """CP-decompose a conv weight ``[Cout, Cin/groups, kh, kw]``, one CP per group.

    Args:
        weight: the dense conv weight; it is never modified.
        rank: an ``int >= 1``, or a ``float`` in (0, 1] (that fraction of the dense parameter count).
            Leave it ``None`` when giving ``target_error``.
        groups: the conv's groups; each ``[Cout/G, Cin/G, kh, kw]`` slice gets its own CP.
        target_error: find the smallest rank whose relative weight error is at most this (with
            ``input_covariance``: whose relative output-weighted error is).
        input_covariance: ``(Cin, Cin)`` second moments of the conv's input channels (see
            :func:`cpkernels.compression.calibration.input_statistics`). The CP then minimises the error of the
            conv's *output* on such inputs instead of the weight's: the input mode is whitened by
            ``S^(1/2)``, decomposed, and the input factor multiplied back by ``S^(-1/2)``. A multiple of
            the identity gives the plain decomposition. Shrink a sample covariance toward the identity
            (:func:`cpkernels.compression.calibration.shrink`) unless it comes from plenty of data.
        init, n_iter_max, tol, random_state, l2_reg: as TensorLy's ``parafac`` (initialisation, iteration
            budget, stopping tolerance, seed, ridge term).
        compute_dtype: dtype of the ALS iterations (float64 by default); the factors come back in
            the weight's dtype and on its device.
        method: ``"als"``, the same ALS as ``parafac`` with its MTTKRPs done as GEMMs
            (:mod:`cpkernels.decompositions.als`, one to two orders of magnitude faster on conv weights), or
            ``"parafac"``, TensorLy's ``parafac`` itself.

    Returns:
        CPFactors with factors of shapes ``(G, Cout/G, R)``, ``(G, Cin/G, R)``, ``(G, kh, R)``, ``(G, kw, R)``.
    """
    check_weight(weight, groups)
    shape = (weight.shape[0], weight.shape[1], weight.shape[2], weight.shape[3])
    if method not in ("als", "parafac"):
        raise ValueError(f"method must be 'als' or 'parafac', got {method!r}")
    options = dict(method=method, init=init, n_iter_max=n_iter_max, tol=tol, random_state=random_state,
                   l2_reg=l2_reg)
    if input_covariance is not None:
        root, inverse = input_whitening(input_covariance, shape[1] * groups, groups)
        if not is_scaled_identity(input_covariance):
            factors = decompose_conv(whiten_input_mode(weight, root), rank, groups=groups, target_error=target_error,
                                     init=init, n_iter_max=n_iter_max, tol=tol, random_state=random_state,
                                     l2_reg=l2_reg, compute_dtype=compute_dtype, method=method)
            return factors.unwhitened(inverse).to(weight.dtype)

    if target_error is not None:
        if rank is not None:
            raise ValueError("give either rank or target_error, not both")
        factors = _search_target_error(weight, float(target_error), groups, compute_dtype, options)
        return factors.to(weight.dtype)
    if rank is None:
        raise ValueError("decompose_conv needs a rank (int or fraction) or a target_error")

    r = resolve_rank(rank, shape, groups)
    dense = shape[0] * shape[1] * shape[2] * shape[3]
    if r * params_per_rank(shape[0], shape[1] * groups, shape[2:], groups) >= dense:
        warnings.warn(
            f"rank {r} holds at least as many values as the dense weight {tuple(shape)} "
            f"({dense}); the CP form saves nothing",
            stacklevel=2,
        )
    return _decompose_at_rank(weight, r, groups, compute_dtype, options).to(weight.dtype)


def strongest_terms(factors: CPFactors, rank: int) -> CPFactors:
    """The ``rank`` rank-one terms of largest norm, per group: a warm start for a smaller rank."""
    norms = torch.ones(factors.groups, factors.rank, dtype=torch.float64, device=factors.device)
    for f in factors.as_tuple():
        norms = norms * torch.linalg.vector_norm(f.detach().to(torch.float64), dim=1)
    keep = norms.topk(rank, dim=1).indices  # [G, rank]
    return CPFactors(*(
        torch.gather(f, 2, keep[:, None, :].expand(-1, f.shape[1], -1)) for f in factors.as_tuple()
    ))


SEARCH_FP32_ABOVE = 1e-2  # target errors from here up are searched in float32


def _search_target_error(weight: Tensor, target_error: float, groups: int, compute_dtype, options) -> CPFactors:
    """Smallest rank whose relative error is <= target_error: doubling, then bisection.

    Doubling gives every trial rank the full iteration budget from the requested start. Targets of
    1 % or more are searched in float32 (errors measured in float64). Bisection
    trials start from the strongest terms of the smallest rank known to meet the target and run a
    quarter of the budget: from so close a start they land near the full-budget error, at a
    quarter of the cost; for targets under 1 %, a trial that misses is retried from the requested start
    with the full budget, since a warm start from an over-complete fit can stall above an exact rank. Every
    answer is measured, never predicted: the returned factors meet the
    target. Then the chosen rank's factors get the rest of the budget (ALS never raises the error).
    ALS error is not strictly monotone in the rank, so the answer is the smallest rank the search saw
    meet the target, which is what a search without trying every rank can promise.
    """
    if not (target_error > 0.0) or math.isnan(target_error):
        raise ValueError(f"target_error must be > 0, got {target_error}")
    if target_error >= SEARCH_FP32_ABOVE:
        # Deciding "error <= 1 %" or coarser needs no float64: float32 GEMMs halve the search's cost.
        # Every error is still measured in float64 (CPFactors.relative_error).
        compute_dtype = torch.float32
    shape = tuple(weight.shape)
    high_cap = max_useful_rank(shape, groups)
    n_iter = options["n_iter_max"]
    warm = options["method"] == "als"
    bisect_options = {**options, "n_iter_max": max(10, n_iter // 4)} if warm else options
    tried: dict[int, tuple[float, CPFactors]] = {}
    short_runs: set[int] = set()  # ranks that ran only the bisection's quarter budget

    def error_at(r: int, start: Optional[CPFactors] = None) -> float:
        if r not in tried:
            if start is None:
                f = _decompose_at_rank(weight, r, groups, compute_dtype, options)
            else:
                f = _decompose_at_rank(weight, r, groups, compute_dtype, bisect_options, strongest_terms(start, r))
                short_runs.add(r)
                if f.relative_error(weight) > target_error and target_error < SEARCH_FP32_ABOVE:
                    # Near-exact targets: a warm start from an over-complete fit can stall far above what a
                    # cold start reaches (a rank-7 weight: the warm rank-7 trial missed 1e-4 where the SVD
                    # start reached 1e-8), so a miss there gets the requested start and the full budget.
                    cold = _decompose_at_rank(weight, r, groups, compute_dtype, options)
                    if cold.relative_error(weight) < f.relative_error(weight):
                        f = cold
                        short_runs.discard(r)
            tried[r] = (f.relative_error(weight), f)
        return tried[r][0]

    low, high = 0, 1  # error_at(low) > target (rank 0 = nothing), error_at(high) to be found
    while error_at(high) > target_error:
        if high >= high_cap:
            warnings.warn(
                f"no rank up to {high_cap} (the largest that saves parameters) reaches a relative "
                f"error of {target_error}; using rank {high} with error {tried[high][0]:.3g}",
                stacklevel=3,
            )
            return tried[high][1]
        low, high = high, min(2 * high, high_cap)
    while high - low > 1:
        mid = (low + high) // 2
        if error_at(mid, tried[high][1] if warm else None) <= target_error:
            high = mid
        else:
            low = mid
    best_error, best = tried[high]
    if high in short_runs and n_iter > bisect_options["n_iter_max"]:
        polished = _decompose_at_rank(weight, high, groups, compute_dtype,
                                      {**options, "n_iter_max": n_iter - bisect_options["n_iter_max"]}, best)
        if polished.relative_error(weight) <= best_error:
            best = polished
    return best
