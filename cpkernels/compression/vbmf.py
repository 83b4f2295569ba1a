"""Empirical variational Bayesian matrix factorisation (EVBMF): the data-free rank estimate of the
older decomposition tools (pytorch-tensor-decompositions, MUSCO), after Nakajima, Sugiyama, Babacan and
Tomioka, "Global analytic solution of fully-observed variational Bayesian matrix factorization"
(JMLR 2013).

For an ``L x M`` matrix (``L <= M``) observed with Gaussian noise of unknown variance, EVBMF keeps the
singular values above an analytic threshold that depends on the noise variance, which it estimates
itself; the count kept is the rank estimate. A conv weight's CP rank estimate is the larger of the
estimates of its output-mode and input-mode unfoldings, as those tools take it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

TAU_BAR_FACTOR = 2.5129  # tau_bar = 2.5129 sqrt(alpha): the threshold constant of the analytic solution


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _free_energy(sigma2: float, l: int, m: int, s: np.ndarray, residual: float, x_bar: float) -> float:
    """The EVBMF objective in the noise variance (JMLR 2013, eq. 32), up to constants."""
    alpha = l / m
    x = s ** 2 / (m * sigma2)
    z1, z2 = x[x > x_bar], x[x <= x_bar]
    tau_z1 = _tau(z1, alpha)
    return float(np.sum(z2 - np.log(z2)) + np.sum(z1 - tau_z1) + np.sum(np.log((tau_z1 + 1) / z1))
                 + alpha * np.sum(np.log(tau_z1 / alpha + 1)) + residual / (m * sigma2)
                 + (l - len(s)) * math.log(sigma2))


def _minimise(f, low: float, high: float, iters: int = 100) -> float:
    """Golden-section search of a 1-D function on [low, high], in log space (the variance spans decades),
    after a coarse grid so that a local dip does not trap it."""
    grid = np.geomspace(low, high, 64)
    k = int(np.argmin([f(g) for g in grid]))
    a, b = math.log(grid[max(k - 1, 0)]), math.log(grid[min(k + 1, len(grid) - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    for _ in range(iters):
        if f(math.exp(c)) < f(math.exp(d)):
            b = d
        else:
            a = c
        c, d = b - ratio * (b - a), a + ratio * (b - a)
    return math.exp((a + b) / 2)


def evbmf_rank(matrix: Tensor) -> int:
    """The number of components EVBMF keeps of ``matrix`` (at least 1 for a non-zero matrix)."""
    y = matrix.detach().to(torch.float64).cpu()
    if y.shape[0] > y.shape[1]:
        y = y.T
    l, m = y.shape
    s = torch.linalg.svdvals(y).numpy()
    if not s.any():
        return 0
    alpha = l / m
    tau_bar = TAU_BAR_FACTOR * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = 0.0  # the full SVD: nothing is left out
    h_ub = min(math.ceil(l / (1 + alpha)) - 1, len(s)) - 1
    upper = float(np.sum(s ** 2)) / (l * m)
    tail = s[h_ub + 1:] if h_ub + 1 < len(s) else s[-1:]
    lower = max(float(s[min(h_ub + 1, len(s) - 1)] ** 2) / (m * x_bar), float(np.mean(tail ** 2)) / m)
    lower = max(lower, upper * 1e-12)
    if lower >= upper:
        sigma2 = upper
    else:
        sigma2 = _minimise(lambda v: _free_energy(v, l, m, s, residual, x_bar), lower, upper)
    threshold = math.sqrt(m * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return max(1, int(np.sum(s > threshold)))


def conv_cp_rank(weight: Tensor, groups: int = 1) -> int:
    """The older tools' CP rank estimate of a conv weight: the larger EVBMF rank of its output-mode
    ``(Cout/G, Cin/G*kh*kw)`` and input-mode ``(Cin/G, Cout/G*kh*kw)`` unfoldings, the largest over
    groups."""
    w = weight.detach().unflatten(0, (groups, -1))  # [G, Cout/G, Cin/G, kh, kw]
    ranks = []
    for g in range(groups):
        wg = w[g]
        ranks.append(max(evbmf_rank(wg.flatten(1)), evbmf_rank(wg.transpose(0, 1).flatten(1))))
    return max(ranks)


def conv_tucker2_ranks(weight: Tensor, groups: int = 1) -> tuple[int, int]:
    """The older tools' Tucker-2 ranks of a conv weight (as pytorch-tensor-decompositions and MUSCO pick them):
    the EVBMF ranks of the output-mode and input-mode unfoldings, ``(R_out, R_in)``, the largest over groups."""
    w = weight.detach().unflatten(0, (groups, -1))  # [G, Cout/G, Cin/G, kh, kw]
    pairs = [(evbmf_rank(w[g].flatten(1)), evbmf_rank(w[g].transpose(0, 1).flatten(1))) for g in range(groups)]
    return (max(1, max(p[0] for p in pairs)), max(1, max(p[1] for p in pairs)))
