"""The rank plan: one rank per conv (or dense) for a budget on the whole network.

For every conv considered, a ladder of candidate ranks (each a fraction of the layer's dense cost,
rounded up to ``rank_multiple``) is decomposed from the largest rank down, each rung warm-started from
the strongest terms of the one above, and its relative error measured in float64: the weight's error
(``method="weight"``), or the conv output's error on calibration inputs, weighed by how much the
network's output moves per unit of it (``method="data"``). Then an exact multiple-choice knapsack
(dynamic programming over costs discretised *up* to 1/``RESOLUTION`` of the budget, so the plan never
exceeds it) picks for each layer one rung or dense, minimising the summed error under ``budget`` times
the layers' dense cost. ``method="vbmf"`` skips the ladder: the older tools' per-layer estimate, scaled
to the budget. The cost is MACs, parameters, or latency measured on the model's device. The
decompositions are kept with the plan, so ``compress_model(model, plan)`` decomposes nothing again.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..decompose import _decompose_at_rank, strongest_terms
from ..factors import CPFactors, Tucker2Factors, params_per_rank, tucker2_params

METRICS = ("macs", "params", "latency")
METHODS = ("weight", "data", "vbmf")
DECOMPOSITIONS = ("cp", "tucker2", "auto")
SHRINKAGE = 0.8  # method="data": weight of the identity in the shrunk input covariance (see README)
# Candidate ranks: these fractions of each layer's dense cost.
LADDER = (0.02, 0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.28, 0.4, 0.55, 0.75)
MAX_RANK = 1.5  # candidate ranks up to this times the larger channel count (per group)
# The ladder's ALS runs in float32 on layers of at least this many weights (errors are measured in
# float64): it halves the time where time goes. Smaller layers cost little and keep float64, in which
# ALS far above an exact rank still finds it (float32 stalled there: 0.5 error at R = 48 on a rank-5
# whitened 32x32x3x3 weight).
LADDER_FP32_FROM = 1 << 16
RESOLUTION = 2000  # cost units in the budget for the knapsack (costs rounded up: the budget always holds)
EXACT = 1e-6  # a relative error this small is an exact decomposition: the plan looks for its smallest rank
EXACT_SCREEN = 1e-3  # a float32 rung (30 warm-started iterations) this close may be exact: float64 decides
TIE = 1e-9  # per unit of cost fraction: between equal errors, the cheaper rung


@dataclass
class RankPlan:
    """Per conv: ``name``, ``shape``, ``rank`` (None: stays dense), ``reason`` (why dense), ``considered``
    (counted in the budget), ``error`` (the method's relative error at that rank: the output's for
    ``"data"``, the weight's otherwise), ``weight_error``, ``sensitivity`` (``"data"``: the network
    output's relative change per unit of relative error in this conv's output; 1 otherwise),
    ``cost_before``, ``cost_after`` in ``metric`` units (microseconds for latency; 0 for convs not
    considered), and for ``"vbmf"`` the layer's unscaled estimate ``vbmf_rank``."""

    metric: str
    method: str
    budget: float
    rows: list[dict] = field(default_factory=list)
    factors: dict[str, Union[CPFactors, Tucker2Factors]] = field(default_factory=dict, repr=False)  # not in the JSON
    decomposition: str = "cp"

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
        unit = "µs" if self.metric == "latency" else self.metric
        data = self.method == "data"  # the output error is planned on; the weight error and sensitivity shown too
        header = ("layer", "shape", "rank", f"{unit} before", f"{unit} after",
                  *(("output err", "weight err", "sensitivity") if data else ("weight err",)), "")

        def num(x):
            return f"{x:,.1f}" if isinstance(x, float) else f"{x:,}"

        lines = []
        for r in self.rows:
            dense = r["rank"] is None
            errors = ("-" if dense else f"{r['error']:.3f}",)
            if data:
                errors += ("-" if dense else f"{r['weight_error']:.3f}",
                           f"{r['sensitivity']:.2f}" if r["considered"] else "-")
            rank = "-" if dense else "x".join(map(str, r["rank"])) if isinstance(r["rank"], tuple) else str(r["rank"])
            lines.append((r["name"], "x".join(map(str, r["shape"])), rank,
                          num(r["cost_before"]) if r["considered"] else "-",
                          num(r["cost_after"]) if r["considered"] else "-", *errors, r["reason"] or ""))
        t = self.totals
        lines.append(("total", "", "", num(t["cost_before"]), num(t["cost_after"]), f"{t['error_sum']:.3f}",
                      *(("", "") if data else ()), f"{t['fraction']:.3f} of {self.metric} (budget {self.budget})"))
        widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
        fmt = "  ".join(f"{{:{w}}}" for w in widths)
        rows = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines]
        return "\n".join(line.rstrip() for line in rows)

    def to_json(self) -> str:
        return json.dumps({"metric": self.metric, "method": self.method, "budget": self.budget,
                           "decomposition": self.decomposition,
                           "rows": [{**r, "shape": list(r["shape"])} for r in self.rows]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RankPlan":
        data = json.loads(text)
        rows = [{**r, "shape": tuple(r["shape"]),
                 "rank": tuple(r["rank"]) if isinstance(r["rank"], list) else r["rank"]} for r in data["rows"]]
        return cls(data["metric"], data["method"], data["budget"], rows, decomposition=data.get("decomposition", "cp"))

    def check_model(self, model: nn.Module) -> None:
        """A plan applies only to a model with the same convs under the same names."""
        convs = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        mine = {r["name"]: tuple(r["shape"]) for r in self.rows}
        if convs != mine:
            missing = sorted(set(mine) ^ set(convs)) or sorted(n for n in mine if mine[n] != convs[n])
            raise ValueError(f"this plan was made for another model: its convs differ at {missing[:5]}")


def _layer_costs(conv: nn.Conv2d, in_hw, metric: str) -> tuple[int, Callable]:
    """(dense cost, cost of a rank) of one conv in MACs or parameters: a CP rank (int; the cost is linear in
    it) or Tucker-2 ranks (a pair)."""
    from ..compress import _conv_shape

    if metric == "params":
        per_rank = params_per_rank(conv.out_channels, conv.in_channels, conv.kernel_size, conv.groups)

        def params(r):
            if isinstance(r, tuple):
                return tucker2_params(conv.out_channels, conv.in_channels, conv.kernel_size, conv.groups, r)
            return r * per_rank
        return conv.weight.numel(), params
    shape = _conv_shape(conv, in_hw)
    return shape.dense_macs(), shape.macs


def _tucker2_ladder(conv: nn.Conv2d, dense: int, cost: Callable, multiple: int, fractions: Sequence[float]) -> list:
    """Distinct Tucker-2 rank pairs on the proportional split (:func:`cpkernels.decompose_tucker2.proportional_ranks`),
    largest first: per fraction, the largest within that fraction of the dense cost (ranks rounded up to
    ``multiple``), cheaper than dense."""
    from ..decompose_tucker2 import largest_proportional_ranks

    cout_g, cin_g = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    pairs = {largest_proportional_ranks(cost, f * dense, cout_g, cin_g, multiple) for f in fractions}
    return sorted((p for p in pairs if p is not None and cost(p) < dense), reverse=True)


_LATENCY_US: dict = {}  # (conv signature, input shape, rank or None, device, dtype) -> median microseconds


def _time_layer(layer: nn.Module, x: torch.Tensor) -> float:
    from ..profile import time_median

    return 1e6 * time_median(layer, x)


def latency_us(conv: nn.Conv2d, input_shape: tuple, rank) -> float:
    """Median microseconds of ``conv`` (``rank=None``) or of a ``CPConv2d`` of that rank (a ``TuckerConv2d``
    for a pair) with the same arguments, on ``conv``'s device and dtype, with the backend ``"auto"`` runs
    there (the CPU plan or the GPU plan). Cached per shape: the values of the factors do not change the time."""
    from ..module import CPConv2d
    from ..module_tucker2 import TuckerConv2d

    p = conv.weight
    key = (tuple(p.shape), conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode,
           conv.bias is not None, tuple(input_shape), rank, str(p.device), p.dtype)
    if key not in _LATENCY_US:
        x = torch.randn(input_shape, device=p.device, dtype=p.dtype)
        if rank is None:
            layer = conv
        else:
            cls = TuckerConv2d if isinstance(rank, tuple) else CPConv2d
            layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, conv.stride, conv.padding,
                        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, p.device, p.dtype)
        _LATENCY_US[key] = _time_layer(layer, x)
    return _LATENCY_US[key]


def _ladder(dense: int, cost: Callable[[int], int], rank_multiple: int, fractions: Sequence[float],
            cap: int) -> list[int]:
    """Distinct ranks, largest first, each the largest rank within a fraction of the dense cost rounded
    up to ``rank_multiple``, cheaper than dense and at most ``cap`` (the cap itself is a rung when a
    fraction reaches past it)."""
    per_rank = cost(1)  # both costs are linear in the rank
    ranks = set()
    for f in fractions:
        r = max(1, int(f * dense // per_rank))
        r = -(-min(r, cap) // rank_multiple) * rank_multiple
        if cost(r) < dense:
            ranks.add(r)
    return sorted(ranks, reverse=True)


def _smallest_exact_rank(weight, groups, rungs, cost, rank_multiple, options) -> list:
    """A weight of exact rank r below the smallest rung that reproduces it gets the rung r (up to
    ``rank_multiple``). Trials start from the requested (SVD) start: a warm start from an over-complete
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


def _tucker2_options(options: dict) -> dict:
    return {"n_iter_max": options["n_iter_max"], "random_state": options["random_state"]}


def _tucker2_at_rank(weight, rank, groups, **options) -> Tucker2Factors:
    from ..decompose_tucker2 import _decompose_at_rank as tucker2_at_rank

    return tucker2_at_rank(weight, rank, groups, **options)


def _tucker2_rungs(weight, groups: int, ranks: list, cost: Callable, options: dict) -> list:
    """(cost, error, rank pair, factors) per Tucker-2 rung, largest first, each HOOI starting from the rung above."""
    rungs, start = [], None
    for r in sorted(ranks, reverse=True):
        f = _tucker2_at_rank(weight, r, groups, **_tucker2_options(options), start=start)
        rungs.append((cost(r), f.relative_error(weight), r, f))
        start = f
    return rungs


def unwhiten(factors, inverse: torch.Tensor):
    """Factors of a decomposition of the whitened weight, their input factor taken back: ``S^(-1/2) B'``."""
    from ..decompose import _unwhiten
    from ..decompose_tucker2 import unwhiten_tucker2

    return _unwhiten(factors, inverse) if isinstance(factors, CPFactors) else unwhiten_tucker2(factors, inverse)


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


def _scale_to_budget(estimates: list, costs: list[Callable], dense: list[float], capacity: float,
                     rank_multiple: int, caps: Optional[list] = None) -> list:
    """VBMF ranks times one common factor, the largest that fits ``capacity`` (bisection: each layer's
    cost, dense where the factored form is not cheaper, never falls as the factor grows). None: dense.
    An estimate is a CP rank or a Tucker-2 pair; ``caps`` bound each pair by its layer's mode sizes."""
    caps = caps or [None] * len(estimates)

    def scaled(k, est, cap):
        r = -(-max(1, math.ceil(k * est)) // rank_multiple) * rank_multiple
        return r if cap is None else min(r, cap)

    def ranks_at(k):
        out = []
        for est, cost, d, cap in zip(estimates, costs, dense, caps):
            r = (tuple(scaled(k, e, c) for e, c in zip(est, cap)) if isinstance(est, tuple)
                 else scaled(k, est, None))
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
    shrinkage: float = SHRINKAGE,
    max_rank: float = MAX_RANK,
    n_iter_max: int = 30,
    random_state: int = 0,
    decomposition: str = "cp",
    **decompose_kwargs,
) -> RankPlan:
    """Ranks for every conv of ``model`` so that the considered convs keep at most ``budget`` of their
    ``metric``, with the least summed error. ``model`` is not modified.

    Args:
        budget: the fraction in (0, 1] of the metric, over the convs considered, that may remain.
        metric: ``"macs"`` (needs ``input_size``, ``example_inputs`` or ``calibration``), ``"params"``, or
            ``"latency"``: every candidate timed on the model's device and dtype with the backend that
            will run it (cached per shape); a conv whose CP form is not faster than it stays dense.
        method: how a rank's error is judged.

            - ``"weight"``: the relative weight error of its CP.
            - ``"data"``: the relative error of the conv's output on ``calibration`` inputs (the CP
              minimises that error: its input mode is whitened by the inputs' channel second moments,
              shrunk toward the identity by ``shrinkage``), times the network output's measured
              sensitivity to that conv's output.
            - ``"vbmf"``: the older tools' data-free estimate (EVBMF on the output- and input-mode
              unfoldings, the larger of the two), all layers' estimates scaled by one factor to the
              budget; no ladder, one decomposition per layer.
        calibration: for ``method="data"``, an iterable of input batches (tensors, or tuples of the
            model's positional inputs). A few hundred images or more: statistics of a handful overfit.
        input_size / example_inputs, include, exclude, predicate, min_channels, skip_first: as
            :func:`cpkernels.compress_model`.
        rank_multiple: round every candidate rank up to a multiple of this.
        progress: a progress bar over the layers (None: only on a terminal).
        ladder: the candidate ranks, as fractions of each layer's dense MACs (parameters for
            ``metric="params"``).
        max_rank: no candidate rank above this times the layer's larger channel count (per group):
            trained networks keep their outputs close from 0.5-1.25 C, and ALS time grows as R^3
            (a 512-channel 3x3 conv at 75 % of its MACs would be R = 1718, 22 s per rung here).
        shrinkage: for ``"data"``, the weight in [0, 1] of the identity in the input covariance.
        n_iter_max, random_state, decompose_kwargs: for the decompositions (each rung warm-starts
            from the one above, so a small budget suffices).
        decomposition: ``"cp"``, ``"tucker2"`` (ladder rungs are Tucker-2 rank pairs on the proportional split;
            with ``"vbmf"``, each mode's EVBMF rank, both scaled by the common factor), or ``"auto"``: both
            ladders offered to the knapsack together, so each layer gets whichever rung serves the budget
            best, and the plan's summed error is never above the better of the two alone. Each row says
            which was chosen.
    """
    from ..calibration import as_batches, input_statistics, output_sensitivity, shrink
    from ..compress import _names_by_module, _skip_reason, conv_input_sizes
    from ..decompose import input_whitening, whiten_input_mode
    from .vbmf import conv_cp_rank, conv_tucker2_ranks

    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(rank_multiple, int) or isinstance(rank_multiple, bool) or rank_multiple < 1:
        raise ValueError(f"rank_multiple must be an int >= 1, got {rank_multiple!r}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage!r}")
    if not max_rank > 0:
        raise ValueError(f"max_rank must be > 0, got {max_rank!r}")
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}")
    if decomposition == "auto" and method == "vbmf":
        raise ValueError("method='vbmf' estimates one decomposition's ranks; decomposition='auto' needs a ladder "
                         "(method='weight' or 'data')")
    if calibration is not None and method != "data":
        raise ValueError(f"calibration is used by method='data' only, not by method={method!r}")
    batches = None
    if method == "data":
        shape = input_size
        if shape is None and example_inputs is not None:
            shape = tuple(next(iter(example_inputs)).shape)
        batches = as_batches(calibration, shape)
        if input_size is None and example_inputs is None:
            example_inputs = batches[0]
    if metric in ("macs", "latency") and input_size is None and example_inputs is None:
        raise ValueError(f"metric={metric!r} needs input_size or example_inputs (a conv's cost depends on its input)")

    from ..calibration import _Hooks

    with _Hooks(model, {}, None):  # eval mode for the size probe; the training flag comes back after
        try:
            sizes = conv_input_sizes(model, input_size, example_inputs)
        except RuntimeError as error:
            what = ("calibration batch 0" if batches is not None and example_inputs is batches[0]
                    else "the example inputs")
            raise ValueError(f"the model cannot run {what}: {error}") from error
    batch = (input_size[0] if input_size is not None
             else next(iter(example_inputs)).shape[0] if example_inputs is not None else None)
    options = dict(method="als", init="svd", n_iter_max=n_iter_max, tol=1e-8, random_state=random_state,
                   l2_reg=0.0, **decompose_kwargs)
    plan = RankPlan(metric, method, float(budget), decomposition=decomposition)

    # Which convs are considered, before any work.
    convs = []
    first = True
    for names in _names_by_module(model).values():
        conv = model.get_submodule(names[0])
        if not isinstance(conv, nn.Conv2d):
            continue
        name = names[0]
        reason = _skip_reason(name, conv, None, None, include, exclude, predicate, min_channels, skip_first and first)
        first = False
        if reason is None and metric != "params" and id(conv) not in sizes:
            reason = "not reached by the example inputs"
        row = {"name": name, "shape": tuple(conv.weight.shape), "decomposition": None, "rank": None, "error": 0.0,
               "weight_error": 0.0,
               "sensitivity": 1.0, "reason": reason, "considered": reason is None, "cost_before": 0, "cost_after": 0}
        plan.rows.append(row)
        if reason is None:
            convs.append((row, conv))

    # Per layer: its dense cost, the cost of a rank, and the candidate ranks; a budget no candidates can
    # meet is refused here, before any decomposition.
    sized = []
    for row, conv in convs:
        in_hw = sizes.get(id(conv))
        ladder_dense, ladder_cost = _layer_costs(conv, in_hw, "params" if metric == "params" else "macs")
        if metric == "latency":
            shape = (batch, conv.in_channels, *in_hw)
            dense = latency_us(conv, shape, None)
            cost = (lambda c, x: lambda r: latency_us(c, x, r))(conv, shape)
        else:
            dense, cost = ladder_dense, ladder_cost
        row.update(cost_before=dense, cost_after=dense)
        ranks = []
        if method != "vbmf":
            cap = max(1, int(max_rank * max(conv.in_channels, conv.out_channels) // conv.groups))
            if decomposition != "tucker2":
                ranks += _ladder(ladder_dense, ladder_cost, rank_multiple, ladder, cap)
            if decomposition != "cp":
                ranks += _tucker2_ladder(conv, ladder_dense, ladder_cost, rank_multiple, ladder)
            if metric == "latency":
                ranks = [r for r in ranks if cost(r) < dense]
                if not ranks:
                    row["reason"] = f"dense: no candidate rank runs faster than dense on {conv.weight.device.type}"
        sized.append((row, conv, cost, ranks))
    if not sized:
        return plan
    capacity = budget * sum(row["cost_before"] for row, *_ in sized)
    if method != "vbmf":
        least = sum(min([row["cost_before"]] + [cost(r) for r in ranks]) for row, _, cost, ranks in sized)
        if least > capacity:
            stuck = [row["name"] for row, *_, ranks in sized if not ranks]
            raise ValueError(
                f"no choice of ranks fits budget {budget}: the cheapest candidates keep "
                f"{least / (capacity / budget):.3f} of the {metric}"
                + (f"; {len(stuck)} conv(s) have no candidate faster than dense here ({', '.join(stuck[:5])})"
                   if stuck else "; add smaller fractions to the ladder or raise the budget"))

    stats, sensitivity = {}, {}
    if method == "data":
        stats = input_statistics(model, batches, {row["name"]: conv for row, conv in convs})
        sensitivity = output_sensitivity(model, batches, {row["name"]: conv for row, conv in convs})

    from tqdm.auto import tqdm

    layers = []  # (row, conv, cost of a rank, weight decomposed, un-whitening, [(cost, error, rank, factors)])
    for row, conv, cost, ranks in tqdm(sized, desc="planning", unit="layer",
                                       disable=None if progress is None else not progress):
        weight = conv.weight.detach()
        target, inverse = weight, None
        if method == "data":
            root, inverse = input_whitening(shrink(stats[row["name"]].covariance, shrinkage), conv.in_channels,
                                            conv.groups)
            target = whiten_input_mode(weight, root)
            row["sensitivity"] = sensitivity[row["name"]]
        rungs, start = [], None
        ladder_dtype = torch.float32 if weight.numel() >= LADDER_FP32_FROM else torch.float64
        for r in (r for r in ranks if not isinstance(r, tuple)):
            f = _decompose_at_rank(target, r, conv.groups, ladder_dtype, options,
                                   None if start is None else strongest_terms(start, r))
            rungs.append((cost(r), f.relative_error(target), r, f))
            start = f
        if rungs:
            rungs += [x for x in _smallest_exact_rank(target, conv.groups, rungs, cost, rank_multiple, options)
                      if x[0] < row["cost_before"]]
            rungs.sort(key=lambda x: -x[2])
        rungs += _tucker2_rungs(target, conv.groups, [r for r in ranks if isinstance(r, tuple)], cost, options)
        rungs = [(c, e, r, f if inverse is None else unwhiten(f, inverse)) for c, e, r, f in rungs]
        layers.append((row, conv, cost, target, inverse, rungs))

    if method == "vbmf":
        if decomposition == "tucker2":
            estimates = [conv_tucker2_ranks(conv.weight, conv.groups) for _, conv, *_ in layers]
            caps = [(conv.out_channels // conv.groups, conv.in_channels // conv.groups) for _, conv, *_ in layers]
        else:
            estimates = [conv_cp_rank(conv.weight, conv.groups) for _, conv, *_ in layers]
            caps = [None] * len(layers)
        chosen = _scale_to_budget(estimates, [x[2] for x in layers], [x[0]["cost_before"] for x in layers], capacity,
                                  rank_multiple, caps)
        for (row, conv, cost, target, inverse, rungs), r, est in zip(layers, chosen, estimates):
            row["vbmf_rank"] = est
            if r is None:
                row["reason"] = "dense: the scaled VBMF rank saves nothing"
                continue
            if isinstance(r, tuple):
                f = _tucker2_at_rank(target, r, conv.groups, **_tucker2_options(options))
            else:
                f = _decompose_at_rank(target, r, conv.groups, torch.float64, options)
            rungs.append((cost(r), f.relative_error(target), r, f))
        picks = [1 if rungs else 0 for *_, rungs in layers]
    else:
        # Errors under EXACT are exact decompositions: equal, so the cheapest of them wins.
        picks = _knapsack([[(row["cost_before"], 0.0)]
                           + [(c, row["sensitivity"] * (e if e > EXACT else 0.0)) for c, e, _, _ in rungs]
                           for row, _, _, _, _, rungs in layers], capacity)
    for (row, conv, cost, target, inverse, rungs), k in zip(layers, picks):
        if k == 0:
            row["reason"] = row["reason"] or "dense: its error budget is better spent elsewhere"
            continue
        c, e, r, f = rungs[k - 1]
        f = f.to(conv.weight.dtype)
        row.update(decomposition="tucker2" if isinstance(r, tuple) else "cp", rank=r, error=e,
                   weight_error=f.relative_error(conv.weight), cost_after=c)
        plan.factors[row["name"]] = f
    return plan
