"""Tucker-2 decomposition of conv weights: both channel modes compressed, the kernel taps kept whole.

    W[o, c, i, j] ~= sum_{a,b} U_out[o, a] core[a, b, i, j] U_in[c, b]

One Tucker-2 per group, by partial HOOI on the two channel modes (Tucker's HOSVD start, then
alternating updates of the two orthonormal factors, each the leading eigenvectors of a Gram matrix of
the weight projected on the other; the error is ``sqrt(||W||^2 - ||core||^2)`` since the factors are
orthonormal). The Gram matrices are only ``C x C``, so a 512x512x3x3 weight takes a fraction of a second.
``method="tensorly"`` runs TensorLy's ``partial_tucker`` instead (inside ``tensorly.backend_context``,
imported as ``tensorly``, never ``tl``).

Unlike CP, Tucker-2 has no degeneracy: its factors are orthonormal and its best fit exists at every
rank pair; at full ranks ``(Cout/G, Cin/G)`` it is exact.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from cpkernels.decompositions.whitening import check_weight, input_whitening, is_scaled_identity, whiten_input_mode
from cpkernels.factors import Tucker2Factors, tucker2_params

Tucker2RankSpec = Union[int, float, tuple[int, int]]
TUCKER2_METHODS = ("hooi", "tensorly")


def _rank_error(rank) -> TypeError:
    return TypeError(f"a Tucker-2 rank must be an int >= 1, a pair (r_out, r_in) of ints >= 1 or a float in (0, 1], "
                     f"got {rank!r}")


def rank_for_fraction(fraction: float, weight_shape: tuple[int, int, int, int], groups: int = 1) -> tuple[int, int]:
    """The largest per-group ranks in proportion to the channel counts (``r_out / r_in = Cout / Cin``)
    whose factors hold at most ``fraction`` of the dense weight's values (at least 1 each).

    With ``r_out = s Cout/G`` and ``r_in = s Cin/G``, a group holds ``s (Cout/G)^2 + s (Cin/G)^2 +
    s^2 (Cout/G)(Cin/G) kh kw`` values: ``s`` is the positive root for ``fraction`` of the dense count."""
    cout, cin_g, kh, kw = weight_shape
    cout_g = cout // groups
    a = cout_g * cin_g * kh * kw
    b = cout_g ** 2 + cin_g ** 2
    s = (-b + math.sqrt(b * b + 4 * a * fraction * a)) / (2 * a)
    r_out, r_in = max(1, int(s * cout_g)), max(1, int(s * cin_g))
    dense = cout * cin_g * kh * kw
    # Flooring both ranks may leave room for one more in the larger mode.
    while r_out < cout_g and tucker2_params(cout, cin_g * groups, (kh, kw), groups, (r_out + 1, r_in)) <= fraction * dense:
        r_out += 1
    while r_in < cin_g and tucker2_params(cout, cin_g * groups, (kh, kw), groups, (r_out, r_in + 1)) <= fraction * dense:
        r_in += 1
    return r_out, r_in


def resolve_tucker2_rank(
    rank: Tucker2RankSpec, weight_shape: tuple[int, int, int, int], groups: int = 1, warn: bool = True
) -> tuple[int, int]:
    """A Tucker-2 rank policy as per-group ranks ``(r_out, r_in)``.

    Args:
        rank: a pair ``(r_out, r_in)``; an ``int`` r for ``(r, r)``; or a ``float`` in (0, 1], that fraction
            of the dense parameter count, split in proportion to the channel counts
            (:func:`rank_for_fraction`). Ranks above a mode's size (``Cout/G``, ``Cin/G``) are lowered to
            it, where the decomposition is exact, with a warning.
        weight_shape: ``(Cout, Cin/G, kh, kw)``.
    """
    cout, cin_g, _, _ = weight_shape
    cout_g = cout // groups
    if isinstance(rank, bool):
        raise _rank_error(rank)
    if isinstance(rank, numbers.Integral):
        pair = (int(rank), int(rank))
    elif isinstance(rank, numbers.Real):
        if not (0.0 < rank <= 1.0) or math.isnan(rank):
            raise ValueError(f"a fractional rank must lie in (0, 1], got {rank}")
        return rank_for_fraction(float(rank), weight_shape, groups)
    elif isinstance(rank, (tuple, list)) and len(rank) == 2 and all(
            isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in rank):
        pair = (int(rank[0]), int(rank[1]))
    else:
        raise _rank_error(rank)
    if min(pair) < 1:
        raise ValueError(f"Tucker-2 ranks must be >= 1, got {rank!r}")
    clamped = (min(pair[0], cout_g), min(pair[1], cin_g))
    if clamped != pair and warn:
        warnings.warn(f"Tucker-2 rank {pair} exceeds the channel modes ({cout_g}, {cin_g}) per group; using "
                      f"{clamped}, where the decomposition is exact", stacklevel=3)
    return clamped


def _leading_eigenvectors(gram: Tensor, r: int) -> Tensor:
    """The ``r`` leading eigenvectors of a symmetric PSD matrix, as columns, largest first."""
    _, q = torch.linalg.eigh(gram)
    return q[:, -r:].flip(-1)


def hooi(w: Tensor, rank: tuple[int, int], n_iter_max: int = 100, tol: float = 1e-6,
         start: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Partial HOOI of one ``[Cout, Cin, kh, kw]`` slice on its two channel modes (float64):
    ``(U_out [Cout, r_out], core [r_out, r_in, kh, kw], U_in [Cin, r_in])``.

    Stops when the relative error changes by less than ``tol`` in an iteration (TensorLy's rule).
    ``start``: ``(U_out, U_in)`` with at least ``r_out`` and ``r_in`` orthonormal columns, leading ones first (a
    larger rank's factors), instead of the HOSVD; only the input factor is used, the output one follows."""
    co, ci, kh, kw = w.shape
    r_out, r_in = rank
    m = w.reshape(co, ci, kh * kw)
    by_out = m.reshape(co, -1)  # [Co, Ci*kh*kw]
    by_in = m.transpose(0, 1).reshape(ci, -1)  # [Ci, Co*kh*kw]
    if start is None:
        u_out = _leading_eigenvectors(by_out @ by_out.T, r_out)  # HOSVD start
        u_in = _leading_eigenvectors(by_in @ by_in.T, r_in)
    else:
        u_out, u_in = start[0][:, :r_out].to(w.dtype), start[1][:, :r_in].to(w.dtype)
    norm2 = float((w * w).sum())
    full = r_out == co and r_in == ci  # exact at once: any orthonormal bases
    previous = None
    for _ in range(0 if full else n_iter_max):
        # TensorLy's order: the output mode first, then the input mode.
        z = torch.einsum("ocx,cb->obx", m, u_in).reshape(co, -1)  # W x_in U_in^T, by Cout
        u_out = _leading_eigenvectors(z @ z.T, r_out)
        y = (u_out.T @ by_out).reshape(r_out, ci, kh * kw).transpose(0, 1).reshape(ci, -1)  # W x_out U_out^T, by Cin
        u_in = _leading_eigenvectors(y @ y.T, r_in)
        error = math.sqrt(max(0.0, 1.0 - float(((y.T @ u_in) ** 2).sum()) / norm2)) if norm2 > 0 else 0.0
        if previous is not None and abs(previous - error) <= tol:
            break
        previous = error
    core = torch.einsum("oa,ocx,cb->abx", u_out, m, u_in).reshape(r_out, r_in, kh, kw)
    return u_out, core, u_in


def _tensorly_partial_tucker(w: Tensor, rank: tuple[int, int], n_iter_max: int, tol: float,
                             random_state: int) -> tuple[Tensor, Tensor, Tensor]:
    """TensorLy's ``partial_tucker`` on the two channel modes: the reference :func:`hooi` is checked against."""
    # tensorly is imported on first use: importing cpkernels must not import it
    import tensorly
    from tensorly.decomposition import partial_tucker

    with tensorly.backend_context("pytorch"):
        (core, (u_out, u_in)), _ = partial_tucker(w, list(rank), modes=[0, 1], n_iter_max=n_iter_max, init="svd",
                                                  tol=tol, random_state=random_state)
    return u_out, core, u_in


def _decompose_at_rank(weight: Tensor, rank: tuple[int, int], groups: int, method: str = "hooi",
                       n_iter_max: int = 100, tol: float = 1e-6, random_state: int = 0,
                       start: Optional[Tucker2Factors] = None) -> Tucker2Factors:
    """One Tucker-2 per group, in float64; ``start``: a larger rank's factors to start HOOI from."""
    w = weight.detach().to(torch.float64)
    cout_g = w.shape[0] // groups
    parts = []
    for g in range(groups):
        slice_ = w[g * cout_g:(g + 1) * cout_g]
        if method == "tensorly":
            parts.append(_tensorly_partial_tucker(slice_, rank, n_iter_max, tol, random_state))
        else:
            parts.append(hooi(slice_, rank, n_iter_max, tol, None if start is None else (start.output[g], start.input[g])))
    return Tucker2Factors(*(torch.stack([p[k] for p in parts]) for k in range(3)))


def decompose_tucker2(
    weight: Tensor,
    rank: Optional[Tucker2RankSpec] = None,
    *,
    groups: int = 1,
    target_error: Optional[float] = None,
    input_covariance: Optional[Tensor] = None,
    n_iter_max: int = 100,
    tol: float = 1e-6,
    random_state: int = 0,
    method: str = "hooi",
) -> Tucker2Factors:
    """Tucker-2-decompose a conv weight ``[Cout, Cin/groups, kh, kw]``, one per group.

    Args:
        weight: the dense conv weight; never modified.
        rank: ``(r_out, r_in)`` per group, an ``int`` for both, or a ``float`` in (0, 1] (that fraction
            of the dense parameters, the ranks in proportion to the channel counts). Leave it ``None``
            when giving ``target_error``.
        groups: the conv's groups.
        target_error: the smallest ranks on the proportional split whose relative weight error (with
            ``input_covariance``: output-weighted error) is at most this.
        input_covariance: ``(Cin, Cin)`` second moments of the conv's inputs: minimise the conv's output
            error on such inputs instead of the weight's (the input mode whitened by ``S^(1/2)``,
            decomposed, and the input factor multiplied back by ``S^(-1/2)``; see
            :func:`cpkernels.decompose_conv`).
        n_iter_max, tol: HOOI's iteration budget and stopping tolerance (change of the relative error in
            one iteration; TensorLy's ``partial_tucker`` uses the same rule with 1e-4).
        random_state: passed to TensorLy (``method="tensorly"``); HOOI from the HOSVD start is deterministic.
        method: ``"hooi"`` (this package's loop) or ``"tensorly"`` (TensorLy's ``partial_tucker``).

    Returns:
        :class:`Tucker2Factors` in the weight's dtype and on its device.
    """
    check_weight(weight, groups)
    if method not in TUCKER2_METHODS:
        raise ValueError(f"method must be one of {TUCKER2_METHODS}, got {method!r}")
    shape = (weight.shape[0], weight.shape[1], weight.shape[2], weight.shape[3])
    if input_covariance is not None:
        root, inverse = input_whitening(input_covariance, shape[1] * groups, groups)
        if not is_scaled_identity(input_covariance):
            f = decompose_tucker2(whiten_input_mode(weight, root), rank, groups=groups, target_error=target_error,
                                  n_iter_max=n_iter_max, tol=tol, random_state=random_state, method=method)
            return f.unwhitened(inverse).to(weight.dtype)
    run = dict(groups=groups, method=method, n_iter_max=n_iter_max, tol=tol, random_state=random_state)
    if target_error is not None:
        if rank is not None:
            raise ValueError("give either rank or target_error, not both")
        if not (target_error > 0.0) or math.isnan(target_error):
            raise ValueError(f"target_error must be > 0, got {target_error}")
        return _search_target_error(weight, float(target_error), **run).to(weight.dtype)
    if rank is None:
        raise ValueError("decompose_tucker2 needs a rank (a pair, an int or a fraction) or a target_error")
    ranks = resolve_tucker2_rank(rank, shape, groups)
    dense = math.prod(shape)
    if tucker2_params(shape[0], shape[1] * groups, shape[2:], groups, ranks) >= dense:
        warnings.warn(f"Tucker-2 ranks {ranks} hold at least as many values as the dense weight {shape} ({dense}); "
                      "the Tucker-2 form saves nothing", stacklevel=2)
    return _decompose_at_rank(weight, ranks, **run).to(weight.dtype)


def proportional_ranks(k: int, cout_g: int, cin_g: int) -> tuple[int, int]:
    """Step ``k`` (1 .. max(Cout/G, Cin/G)) of the proportional split: the larger mode at rank ``k``."""
    big = max(cout_g, cin_g)
    return (max(1, min(cout_g, round(k * cout_g / big))), max(1, min(cin_g, round(k * cin_g / big))))


def largest_proportional_ranks(cost: Callable[[tuple[int, int]], float], budget: float, cout_g: int, cin_g: int,
                               multiple: int = 1) -> Optional[tuple[int, int]]:
    """The largest ranks on the proportional split, each rounded up to ``multiple`` (at most its mode's size),
    whose ``cost`` is within ``budget``; None when even the smallest is not. The cost never falls along the
    split, so the last step within the budget is the answer."""
    best = None
    for k in range(1, max(cout_g, cin_g) + 1):
        r_out, r_in = proportional_ranks(k, cout_g, cin_g)
        pair = (min(cout_g, -(-r_out // multiple) * multiple), min(cin_g, -(-r_in // multiple) * multiple))
        if cost(pair) > budget:
            break
        best = pair
    return best


def _search_target_error(weight: Tensor, target_error: float, *, groups: int, **run) -> Tucker2Factors:
    """Bisection on the proportional split for the smallest ranks meeting the target (every answer measured;
    the full ranks are exact, so one always does)."""
    cout_g, cin_g = weight.shape[0] // groups, weight.shape[1]
    low, high = 0, max(cout_g, cin_g)
    best = _decompose_at_rank(weight, proportional_ranks(high, cout_g, cin_g), groups=groups, **run)
    while high - low > 1:
        mid = (low + high) // 2
        f = _decompose_at_rank(weight, proportional_ranks(mid, cout_g, cin_g), groups=groups, **run)
        if f.relative_error(weight) <= target_error:
            high, best = mid, f
        else:
            low = mid
    shape = tuple(weight.shape)
    if best.num_params >= math.prod(shape):
        warnings.warn(f"no Tucker-2 ranks that save parameters reach a relative error of {target_error} for a weight of "
                      f"shape {shape}; using ranks {best.rank} (error {best.relative_error(weight):.3g})", stacklevel=3)
    return best
