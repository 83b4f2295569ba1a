"""The rank plan: one rank per conv (or dense) for a budget on the whole network.

For every conv considered, a ladder of candidate ranks (each a fraction of the layer's dense cost,
rounded up to ``rank_multiple``) is decomposed from the largest rank down, each rung warm-started from
the strongest terms of the one above, and its relative weight error measured in float64. Then an exact
multiple-choice knapsack (dynamic programming over costs discretised *up* to 1/``RESOLUTION`` of the
budget, so the plan never exceeds it) picks for each layer one rung or dense, minimising the summed
error under ``budget`` times the layers' dense cost. The decompositions are kept with the plan, so
``compress_model(model, plan)`` decomposes nothing again.

Implemented: ``metric="macs" | "params"``, ``method="weight"``. Not yet: ``metric="latency"``,
``method="data" | "vbmf"``, calibration statistics; they are refused with that reason.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..decompose import _decompose_at_rank, strongest_terms
from ..factors import CPFactors, params_per_rank

METRICS = ("macs", "params")
METHODS = ("weight",)
# Candidate ranks: these fractions of each layer's dense cost.
LADDER = (0.02, 0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.28, 0.4, 0.55, 0.75)
RESOLUTION = 2000  # cost units in the budget for the knapsack (costs rounded up: the budget always holds)
EXACT = 1e-6  # a relative error this small is an exact decomposition: the plan looks for its smallest rank
TIE = 1e-9  # per unit of cost fraction: between equal errors, the cheaper rung


@dataclass
class RankPlan:
    """Per conv: ``name``, ``shape``, ``rank`` (None: stays dense), ``reason`` (why dense), ``considered``
    (counted in the budget), ``error`` (relative weight error at that rank), ``cost_before``,
    ``cost_after`` in ``metric`` units (0 for convs not considered)."""

    metric: str
    method: str
    budget: float
    rows: list[dict] = field(default_factory=list)
    factors: dict[str, CPFactors] = field(default_factory=dict, repr=False)  # not in the JSON

    @property
    def totals(self) -> dict:
        considered = [r for r in self.rows if r["considered"]]
        before = sum(r["cost_before"] for r in considered)
        after = sum(r["cost_after"] for r in considered)
        return {"cost_before": before, "cost_after": after, "fraction": after / before if before else 1.0,
                "error_sum": sum(r["error"] for r in considered)}

    @property
    def structure(self) -> dict[str, int]:
        return {r["name"]: r["rank"] for r in self.rows if r["rank"] is not None}

    def __str__(self) -> str:
        header = ("layer", "shape", "rank", f"{self.metric} before", f"{self.metric} after", "weight err", "")
        lines = [(r["name"], "x".join(map(str, r["shape"])), "-" if r["rank"] is None else str(r["rank"]),
                  f"{r['cost_before']:,}", f"{r['cost_after']:,}", f"{r['error']:.3f}", r["reason"] or "")
                 for r in self.rows]
        t = self.totals
        lines.append(("total", "", "", f"{t['cost_before']:,}", f"{t['cost_after']:,}", f"{t['error_sum']:.3f}",
                      f"{t['fraction']:.3f} of {self.metric} (budget {self.budget})"))
        widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
        fmt = "  ".join(f"{{:{w}}}" for w in widths)
        rows = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines]
        return "\n".join(line.rstrip() for line in rows)

    def to_json(self) -> str:
        return json.dumps({"metric": self.metric, "method": self.method, "budget": self.budget,
                           "rows": [{**r, "shape": list(r["shape"])} for r in self.rows]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RankPlan":
        data = json.loads(text)
        rows = [{**r, "shape": tuple(r["shape"])} for r in data["rows"]]
        return cls(data["metric"], data["method"], data["budget"], rows)

    def check_model(self, model: nn.Module) -> None:
        """A plan applies only to a model with the same convs under the same names."""
        convs = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        mine = {r["name"]: tuple(r["shape"]) for r in self.rows}
        if convs != mine:
            missing = sorted(set(mine) ^ set(convs)) or sorted(n for n in mine if mine[n] != convs[n])
            raise ValueError(f"this plan was made for another model: its convs differ at {missing[:5]}")


def _layer_costs(conv: nn.Conv2d, in_hw, metric: str) -> tuple[int, Callable[[int], int]]:
    """(dense cost, cost of rank r) of one conv."""
    from ..compress import _conv_shape

    if metric == "params":
        per_rank = params_per_rank(conv.out_channels, conv.in_channels, conv.kernel_size, conv.groups)
        return conv.weight.numel(), lambda r: r * per_rank
    shape = _conv_shape(conv, in_hw)
    return shape.dense_macs(), shape.cp_macs


def _ladder(dense: int, cost: Callable[[int], int], rank_multiple: int, fractions: Sequence[float]) -> list[int]:
    """Distinct ranks, largest first, each the largest rank within a fraction of the dense cost rounded
    up to ``rank_multiple``, and cheaper than dense."""
    per_rank = cost(1)  # both costs are linear in the rank
    ranks = set()
    for f in fractions:
        r = max(1, int(f * dense // per_rank))
        r = -(-r // rank_multiple) * rank_multiple
        if cost(r) < dense:
            ranks.add(r)
    return sorted(ranks, reverse=True)


def _smallest_exact_rank(weight, groups, rungs, cost, rank_multiple, options) -> list:
    """A weight of exact rank r below the smallest rung that reproduces it gets the rung r (up to
    ``rank_multiple``). Trials start from the requested (SVD) start: a warm start from an over-complete
    fit can stall far from the exact answer (seen: 5e-4 where a cold start reached 6e-8), and so can
    ALS far above the exact rank, so the smaller rungs are tried upwards, then the gap below the
    first exact one is bisected."""
    exact = [x for x in rungs if x[1] <= EXACT]
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
    while high - low > rank_multiple:
        mid = -(-((low + high) // 2) // rank_multiple) * rank_multiple
        if mid >= high:
            break
        t = trial(mid)
        if t[1] <= EXACT:
            high, found = mid, t
        else:
            low = mid
    return [] if found is None else [found]


def _knapsack(options: list[list[tuple[float, float]]], capacity: float) -> list[int]:
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


def plan_ranks(
    model: nn.Module,
    budget: float = 0.25,
    *,
    metric: str = "macs",
    method: str = "weight",
    calibration: Optional[Iterable] = None,
    input_size: Optional[Sequence[int]] = None,
    example_inputs: Optional[Iterable] = None,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    predicate: Optional[Callable[[str, nn.Module], bool]] = None,
    min_channels: int = 1,
    skip_first: bool = False,
    rank_multiple: int = 1,
    progress: Optional[bool] = None,
    ladder: Sequence[float] = LADDER,
    n_iter_max: int = 30,
    random_state: int = 0,
    **decompose_kwargs,
) -> RankPlan:
    """Ranks for every conv of ``model`` so that the considered convs keep at most ``budget`` of their
    ``metric``, with the least summed relative weight error. ``model`` is not modified.

    Args:
        budget: the fraction in (0, 1] of the metric, over the convs considered, that may remain.
        metric: ``"macs"`` (needs ``input_size`` or ``example_inputs``) or ``"params"``.
        method: ``"weight"``.
        input_size / example_inputs, include, exclude, predicate, min_channels, skip_first: as
            :func:`cpkernels.compress_model`.
        rank_multiple: round every candidate rank up to a multiple of this.
        ladder: the candidate ranks, as fractions of each layer's dense cost.
        n_iter_max, random_state, decompose_kwargs: for the decompositions (each rung warm-starts
            from the one above, so a small budget suffices).
    """
    from ..compress import _names_by_module, _skip_reason, conv_input_sizes

    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS} (latency is not implemented yet), got {metric!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (data and vbmf are not implemented yet), got {method!r}")
    if calibration is not None:
        raise ValueError("calibration data is for method='data', which is not implemented yet")
    if not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple must be an int >= 1, got {rank_multiple!r}")
    if metric == "macs" and input_size is None and example_inputs is None:
        raise ValueError("metric='macs' needs input_size or example_inputs (a conv's MACs depend on its input)")

    sizes = conv_input_sizes(model, input_size, example_inputs)
    options = dict(method="als", init="svd", n_iter_max=n_iter_max, tol=1e-8, random_state=random_state,
                   l2_reg=0.0, **decompose_kwargs)
    plan = RankPlan(metric, method, float(budget))
    layers = []  # (row, [(cost, error, rank, factors)])
    first = True
    from tqdm.auto import tqdm

    convs = [(names[0], model.get_submodule(names[0])) for names in _names_by_module(model).values()
             if isinstance(model.get_submodule(names[0]), nn.Conv2d)]
    for name, conv in tqdm(convs, desc="planning", unit="layer", disable=None if progress is None else not progress):
        reason = _skip_reason(name, conv, None, None, include, exclude, predicate, min_channels, skip_first and first)
        first = False
        in_hw = sizes.get(id(conv))
        if reason is None and metric == "macs" and in_hw is None:
            reason = "not reached by example_inputs"
        row = {"name": name, "shape": tuple(conv.weight.shape), "rank": None, "error": 0.0, "reason": reason,
               "considered": reason is None, "cost_before": 0, "cost_after": 0}
        if reason is not None:
            plan.rows.append(row)
            continue
        dense, cost = _layer_costs(conv, in_hw, metric)
        row.update(cost_before=dense, cost_after=dense)
        weight = conv.weight.detach()
        rungs, start = [], None
        for r in _ladder(dense, cost, rank_multiple, ladder):
            f = _decompose_at_rank(weight, r, conv.groups, torch.float64, options,
                                   None if start is None else strongest_terms(start, r))
            rungs.append((cost(r), f.relative_error(weight), r, f))
            start = f
        rungs += _smallest_exact_rank(weight, conv.groups, rungs, cost, rank_multiple, options)
        rungs = [(c, e, r, f.to(weight.dtype)) for c, e, r, f in sorted(rungs, key=lambda x: -x[2])]
        layers.append((row, rungs))
        plan.rows.append(row)

    if layers:
        capacity = budget * sum(row["cost_before"] for row, _ in layers)
        # Errors under EXACT are exact decompositions: equal, so the cheapest of them wins.
        choices = _knapsack([[(row["cost_before"], 0.0)] + [(c, e if e > EXACT else 0.0) for c, e, _, _ in rungs]
                             for row, rungs in layers], capacity)
        for (row, rungs), k in zip(layers, choices):
            if k == 0:
                row["reason"] = "dense: its error budget is better spent elsewhere"
                continue
            c, e, r, f = rungs[k - 1]
            row.update(rank=r, error=e, cost_after=c)
            plan.factors[row["name"]] = f
    return plan
