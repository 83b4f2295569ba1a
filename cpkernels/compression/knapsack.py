"""The two ways the rank planner spends a budget: an exact multiple-choice knapsack over per-layer (cost, error)
options, and the older tools' estimates scaled by one common factor until they fit."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

RESOLUTION = 2000  # cost units in the budget for the knapsack (costs rounded up: the budget always holds)
TIE = 1e-9  # per unit of cost fraction: between equal errors, the cheaper option


def knapsack(options: list[list[tuple[float, float]]], capacity: float) -> list[int]:
    """Exact multiple-choice knapsack: one (cost, error) option per layer, total cost <= capacity,
    least summed error. Costs are discretised up to capacity / RESOLUTION units."""
    unit = capacity / RESOLUTION
    best = np.full(RESOLUTION + 1, np.inf)
    best[0] = 0.0
    picks = []
    for layer in options:
        new = np.full_like(best, np.inf)
        pick = np.full(best.shape, -1, dtype=np.int64)
        for k, (c, e) in enumerate(layer):
            u = math.ceil(c / unit - 1e-9)
            if u > RESOLUTION:
                continue
            shifted = np.full_like(best, np.inf)
            shifted[u:] = best[:len(best) - u] + e + TIE * u / RESOLUTION
            better = shifted < new
            new[better], pick[better] = shifted[better], k
        best = new
        picks.append(pick)
    if not np.isfinite(best).any():
        raise ValueError("no choice of ranks fits this budget, even the smallest rung of every layer")
    c = int(np.argmin(best))
    chosen = []
    for layer, pick in zip(reversed(options), reversed(picks)):
        k = int(pick[c])
        chosen.append(k)
        c -= math.ceil(layer[k][0] / unit - 1e-9)
    return chosen[::-1]


def scale_to_budget(scaled: list[Callable[[float], object]], costs: list[Callable], dense: list[float],
                    capacity: float) -> list:
    """Per layer, the rank ``scaled[i](k)`` for the largest common factor ``k`` whose total cost fits
    ``capacity`` (bisection: each layer's cost, dense where the factored form is not cheaper, never falls as
    ``k`` grows). None: that layer stays dense."""
    def ranks_at(k):
        out = []
        for scale, cost, d in zip(scaled, costs, dense):
            r = scale(k)
            out.append(r if cost(r) < d else None)
        return out

    def total(k):
        return sum(d if r is None else cost(r) for r, cost, d in zip(ranks_at(k), costs, dense))

    low, high = 0.0, 1.0
    while total(high) <= capacity and high < 1e6:
        low, high = high, 2 * high
    if total(low) > capacity:
        raise ValueError("no choice of ranks fits this budget, even rank 1 in every layer")
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if total(mid) <= capacity else (low, mid)
    return ranks_at(low)
