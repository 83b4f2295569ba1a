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
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from cpkernels.compression.batchnorm import fold_batchnorm as fold_batchnorm_into_convs
from cpkernels.compression.calibration import EvalHooks, as_batches, input_statistics, output_sensitivity, shrink
from cpkernels.compression.convs import conv_input_sizes, conv_shape, convs_of, filter_reason
from cpkernels.compression.families import (DECOMPOSITIONS, applicable, families_for, family_for, family_named,
                                            not_applicable_reason)
from cpkernels.compression.families.cp import EXACT
from cpkernels.compression.knapsack import knapsack, scale_to_budget
from cpkernels.core.conv_args import MEMORY_FORMATS, memory_format_name, memory_format_of
from cpkernels.core.timing import time_median
from cpkernels.decompositions.whitening import input_whitening, whiten_input_mode
from cpkernels.dispatch.measured import DENSE_MARGIN
from cpkernels.factors import CPFactors, Tucker2Factors

METRICS = ("macs", "params", "latency")
# What a budget is a fraction of: every conv of the model (those left dense at their full cost), or only the
# convs the planner considers (the meaning before whole-network budgets).
BUDGET_OVER = ("network", "considered")
METHODS = ("weight", "data", "vbmf")
SHRINKAGE = 0.8  # method="data": weight of the identity in the shrunk input covariance (see README)
# Candidate ranks: these fractions of each layer's dense cost.
LADDER = (0.02, 0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.28, 0.4, 0.55, 0.75)
MAX_RANK = 1.5  # candidate ranks up to this times the larger channel count (per group)


@dataclass
class RankPlan:
    """Per conv: ``name``, ``shape``, ``rank`` (None: stays dense), ``reason`` (why dense), ``considered``
    (counted in the budget), ``error`` (the method's relative error at that rank: the output's for
    ``"data"``, the weight's otherwise), ``weight_error``, ``sensitivity`` (``"data"``: the network
    output's relative change per unit of relative error in this conv's output; 1 otherwise),
    ``cost_before``, ``cost_after`` in ``metric`` units (microseconds for latency; a conv not considered keeps
    its dense cost, 0 where the example inputs do not reach it), for ``"latency"`` the ``input_shape`` it was
    timed at, and for ``"vbmf"`` the layer's unscaled estimate ``vbmf_rank``. ``budget_over``: what ``budget`` is a
    fraction of, ``"network"`` (every conv) or ``"considered"``. ``memory_format``: of the inputs a latency plan
    timed (``"contiguous_format"`` or ``"channels_last"``)."""

    metric: str
    method: str
    budget: float
    rows: list[dict] = field(default_factory=list)
    factors: dict[str, Union[CPFactors, Tucker2Factors]] = field(default_factory=dict, repr=False)  # not in the JSON
    decomposition: str = "cp"
    fold_batchnorm: bool = False  # planned on the model with its BatchNorms folded: compress_model folds them too
    budget_over: str = "network"
    memory_format: str = "contiguous_format"

    @property
    def totals(self) -> dict:
        """``cost_before``, ``cost_after`` and ``fraction`` over what the budget counts (``budget_over``), the
        fractions of both (``network_fraction``, ``considered_fraction``), and the considered convs' summed error."""
        considered = [r for r in self.rows if r["considered"]]

        def fraction(rows):
            before = sum(r["cost_before"] for r in rows)
            return before, sum(r["cost_after"] for r in rows), (sum(r["cost_after"] for r in rows) / before
                                                                if before else 1.0)

        counted = fraction(self.rows if self.budget_over == "network" else considered)
        return {"cost_before": counted[0], "cost_after": counted[1], "fraction": counted[2],
                "network_fraction": fraction(self.rows)[2], "considered_fraction": fraction(considered)[2],
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
            rank = "-" if dense else family_named(r["decomposition"]).rank_text(r["rank"])
            lines.append((r["name"], "x".join(map(str, r["shape"])), rank,
                          num(r["cost_before"]), num(r["cost_after"]), *errors, r["reason"] or ""))
        t = self.totals
        lines.append(("total", "", "", num(t["cost_before"]), num(t["cost_after"]), f"{t['error_sum']:.3f}",
                      *(("", "") if data else ()),
                      f"{t['network_fraction']:.3f} of the network's {self.metric}, {t['considered_fraction']:.3f} "
                      f"of the convs considered (budget {self.budget} of the {self.budget_over})"))
        widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
        fmt = "  ".join(f"{{:{w}}}" for w in widths)
        rows = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines]
        return "\n".join(line.rstrip() for line in rows)

    def to_json(self) -> str:
        return json.dumps({"metric": self.metric, "method": self.method, "budget": self.budget,
                           "decomposition": self.decomposition, "fold_batchnorm": self.fold_batchnorm,
                           "budget_over": self.budget_over, "memory_format": self.memory_format,
                           "totals": self.totals,
                           "rows": [{**r, "shape": list(r["shape"]),
                                     **({"input_shape": list(r["input_shape"])} if r.get("input_shape") else {})}
                                    for r in self.rows]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RankPlan":
        data = json.loads(text)
        rows = [{**r, "shape": tuple(r["shape"]),
                 "rank": None if r["rank"] is None else family_named(r["decomposition"]).normalise(r["rank"]),
                 **({"input_shape": tuple(r["input_shape"])} if r.get("input_shape") else {})}
                for r in data["rows"]]
        # A plan written before whole-network budgets counted its budget over the convs it considered.
        return cls(data["metric"], data["method"], data["budget"], rows, decomposition=data.get("decomposition", "cp"),
                   fold_batchnorm=data.get("fold_batchnorm", False), budget_over=data.get("budget_over", "considered"),
                   memory_format=data.get("memory_format", "contiguous_format"))

    def check_model(self, model: nn.Module) -> None:
        """A plan applies only to a model with the same convs under the same names."""
        convs = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        mine = {r["name"]: tuple(r["shape"]) for r in self.rows}
        if convs != mine:
            missing = sorted(set(mine) ^ set(convs)) or sorted(n for n in mine if mine[n] != convs[n])
            raise ValueError(f"this plan was made for another model: its convs differ at {missing[:5]}")


_LATENCY_US: dict = {}  # (conv signature, input shape, memory format, rank or None, device, dtype) -> median µs


# Seconds of timed calls after which a candidate's timing stops (after three calls; at most ten): a call of
# 100 ms, as VGG's first convs at 416x640 take on two cores, is timed three times, a call of 5 ms ten times.
LATENCY_BUDGET_S = 0.3


def _time_layer(layer: nn.Module, x: torch.Tensor) -> float:
    return 1e6 * time_median(layer, x, budget_s=LATENCY_BUDGET_S)


def latency_us(conv: nn.Conv2d, input_shape: tuple, rank, memory_format=torch.contiguous_format) -> float:
    """Median microseconds of ``conv`` (``rank=None``) or of its factored layer at ``rank`` (the family
    whose rank it is) with the same arguments, on ``conv``'s device and dtype, with the backend ``"auto"``
    runs there (the CPU plan or the GPU plan), on an input of ``input_shape`` in ``memory_format``. Cached per
    shape: the factors' values do not change the time."""
    p = conv.weight
    key = (tuple(p.shape), conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode,
           conv.bias is not None, tuple(input_shape), memory_format_name(memory_format), rank, str(p.device),
           p.dtype)
    if key not in _LATENCY_US:
        # the layout matters: on the CPU a conv and its factored form run faster on channels_last strides, by
        # different amounts (README, channels_last on the CPU)
        x = torch.randn(input_shape, device=p.device, dtype=p.dtype).contiguous(memory_format=memory_format)
        layer = conv if rank is None else family_for(conv, rank).empty_layer(conv, rank)
        _LATENCY_US[key] = _time_layer(layer, x)
    return _LATENCY_US[key]


@dataclass
class _Layer:
    """One conv considered by the planner, as the phases fill it in."""

    row: dict
    conv: nn.Conv2d
    cost: Optional[Callable] = None  # the cost of a rank (any family's), in the plan's metric
    ranks: list = field(default_factory=list)  # candidate ranks, every family's
    target: Optional[torch.Tensor] = None  # the weight decomposed (input-whitened for method="data")
    inverse: Optional[torch.Tensor] = None  # S^(-1/2) of the whitening, which takes the input factor back
    rungs: list = field(default_factory=list)  # (cost, error, rank, factors), the factors un-whitened


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
    fold_batchnorm: bool = False,
    budget_over: str = "network",
    memory_format: Optional[torch.memory_format] = None,
    **decompose_kwargs,
) -> RankPlan:
    """Ranks for every conv of ``model`` so that its convs keep at most ``budget`` of their ``metric``, with the
    least summed error. ``model`` is not modified.

    Args:
        budget: the fraction in (0, 1] of the metric of all the model's convs that may remain; convs left dense
            (by a filter, or because no family factors them) count at their full cost. A budget that not even
            every considered conv at its cheapest candidate meets is refused before any decomposition, the
            smallest reachable fraction in the message.
        budget_over: ``"network"`` (the above) or ``"considered"``: a fraction of the considered convs' metric
            alone (what ``budget`` meant before).
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
            with ``"vbmf"``, each mode's EVBMF rank, both scaled by the common factor), ``"svd"`` (the 1x1 convs
            alone, truncated SVDs: one SVD per layer gives every rung), or ``"auto"``: every family that
            factors a conv offers its ladder to the knapsack (the SVD on a 1x1 conv, CP and Tucker-2 on a
            kh x kw conv), so each layer gets whichever rung serves the budget best, and the plan's summed
            error is never above the better of CP and Tucker-2 alone. Each row says which was chosen. A conv
            no family of ``decomposition`` factors (a 1x1 conv under ``"cp"``) stays dense.
        fold_batchnorm: plan on the model with every BatchNorm2d that follows a conv (and only it feeds) folded
            into that conv (as :func:`cpkernels.compress_model` folds it); the model must be in eval mode and is
            not modified. The plan records it, so ``compress_model(model, plan)`` folds the same pairs.
        memory_format: for ``metric="latency"``, the layout every candidate is timed in: ``torch.contiguous_format``
            (NCHW) or ``torch.channels_last``, as the deployed model will be called. None: that of the first
            example input (or calibration batch) when one is given, else NCHW. The plan records it, and
            ``compress_model(model, plan)`` times its check in it.
    """
    if memory_format is not None:
        memory_format_name(memory_format)  # refused before any work
    _check_arguments(budget, metric, method, rank_multiple, shrinkage, max_rank, decomposition, calibration)
    if budget_over not in BUDGET_OVER:
        raise ValueError(f"budget_over must be one of {BUDGET_OVER}, got {budget_over!r}")
    families = families_for(decomposition)
    if fold_batchnorm:  # planned on a folded copy; the plan remembers, so compress_model folds the same pairs
        model, _ = fold_batchnorm_into_convs(model)
    batches, example_inputs = _calibration_batches(method, calibration, input_size, example_inputs)
    if metric in ("macs", "latency") and input_size is None and example_inputs is None:
        raise ValueError(f"metric={metric!r} needs input_size or example_inputs (a conv's cost depends on its input)")
    sizes = _input_sizes(model, input_size, example_inputs, batches)
    batch = (input_size[0] if input_size is not None
             else next(iter(example_inputs)).shape[0] if example_inputs is not None else None)
    memory_format = timing_memory_format(memory_format, None if input_size is not None else example_inputs)
    options = dict(method="als", init="svd", n_iter_max=n_iter_max, tol=1e-8, random_state=random_state,
                   l2_reg=0.0, **decompose_kwargs)
    plan = RankPlan(metric, method, float(budget), decomposition=decomposition, fold_batchnorm=fold_batchnorm,
                    budget_over=budget_over, memory_format=memory_format_name(memory_format))

    layers = _select_convs(plan, model, sizes, metric, include, exclude, predicate, min_channels, skip_first,
                           families)
    for layer in layers:
        _measure_costs(layer, sizes.get(id(layer.conv)), batch, metric,
                       () if method == "vbmf" else applicable(families, layer.conv), rank_multiple, ladder, max_rank,
                       memory_format)
    _dense_costs(plan, model, sizes, batch, metric, memory_format)
    if not layers:
        return plan
    considered = sum(layer.row["cost_before"] for layer in layers)
    fixed = sum(r["cost_before"] for r in plan.rows if not r["considered"])  # what the budget cannot touch
    whole = considered + fixed if budget_over == "network" else considered
    capacity = budget * whole - (fixed if budget_over == "network" else 0)
    _refuse_unreachable(layers, budget, capacity, whole, fixed if budget_over == "network" else 0, metric,
                        budget_over, method == "vbmf")
    if method == "data":
        _whiten_for_calibration(model, layers, batches, shrinkage)
    for layer in tqdm(layers, desc="planning", unit="layer", disable=None if progress is None else not progress):
        _build_ladder(layer, families, rank_multiple, options)
    if method == "vbmf":
        picks = _scale_vbmf(layers, families[0], capacity, rank_multiple, options)
    else:
        # Errors under EXACT are exact decompositions: equal, so the cheapest of them wins.
        picks = knapsack([[(layer.row["cost_before"], 0.0)]
                          + [(c, layer.row["sensitivity"] * (e if e > EXACT else 0.0)) for c, e, _, _ in layer.rungs]
                          for layer in layers], capacity)
    _fill_rows(plan, layers, picks)
    return plan


def _check_arguments(budget, metric, method, rank_multiple, shrinkage, max_rank, decomposition, calibration) -> None:
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


def timing_memory_format(memory_format, example_inputs) -> torch.memory_format:
    """The layout candidates are timed in: ``memory_format`` when given, else channels_last where the first of
    ``example_inputs`` (the model's positional inputs) is a 4-D channels_last tensor, else NCHW."""
    if memory_format is not None:
        memory_format_name(memory_format)
        return memory_format
    first = next(iter(example_inputs), None) if example_inputs is not None else None
    return memory_format_of(first) if isinstance(first, torch.Tensor) else torch.contiguous_format


def plan_memory_format(plan: RankPlan) -> torch.memory_format:
    """The memory format ``plan`` was timed in."""
    return MEMORY_FORMATS[plan.memory_format]


def _calibration_batches(method, calibration, input_size, example_inputs):
    """``(batches, example_inputs)``: the calibration batches for ``"data"`` (None otherwise), and what sizes
    the convs (the first batch, when nothing else does)."""
    if method != "data":
        return None, example_inputs
    shape = input_size
    if shape is None and example_inputs is not None:
        shape = tuple(next(iter(example_inputs)).shape)
    batches = as_batches(calibration, shape)
    if input_size is None and example_inputs is None:
        example_inputs = batches[0]
    return batches, example_inputs


def _input_sizes(model, input_size, example_inputs, batches) -> dict[int, tuple[int, int]]:
    with EvalHooks(model, {}, None):  # eval mode for the size probe; the training flag comes back after
        try:
            return conv_input_sizes(model, input_size, example_inputs)
        except RuntimeError as error:
            what = ("calibration batch 0" if batches is not None and example_inputs is batches[0]
                    else "the example inputs")
            raise ValueError(f"the model cannot run {what}: {error}") from error


def _select_convs(plan, model, sizes, metric, include, exclude, predicate, min_channels, skip_first,
                  families) -> list[_Layer]:
    """A row per conv of the model in the plan; the convs considered, before any work."""
    layers = []
    for i, (name, conv, _) in enumerate(convs_of(model)):
        reason = filter_reason(name, conv, include, exclude, predicate, min_channels, skip_first and i == 0)
        if reason is None and not applicable(families, conv):
            reason = not_applicable_reason(families, conv)
        if reason is None and metric != "params" and id(conv) not in sizes:
            reason = "not reached by the example inputs"
        row = {"name": name, "shape": tuple(conv.weight.shape), "decomposition": None, "rank": None, "error": 0.0,
               "weight_error": 0.0, "sensitivity": 1.0, "reason": reason, "considered": reason is None,
               "cost_before": 0, "cost_after": 0}
        plan.rows.append(row)
        if reason is None:
            layers.append(_Layer(row, conv))
    return layers


def _measure_costs(layer: _Layer, in_hw, batch, metric, families, rank_multiple, fractions, max_rank,
                   memory_format) -> None:
    """The layer's dense cost, the cost of a rank, and its candidate ranks (none for ``"vbmf"``)."""
    conv = layer.conv
    if metric == "params":
        ladder_dense = conv.weight.numel()

        def ladder_cost(r):
            return family_for(conv, r).params(conv, r)
    else:
        shape = conv_shape(conv, in_hw)
        ladder_dense = shape.dense_macs()

        def ladder_cost(r):
            return family_for(conv, r).macs(shape, r)
    if metric == "latency":
        call = (batch, conv.in_channels, *in_hw)
        layer.row["input_shape"] = call  # compress_model times the planned rank against dense again on this shape
        dense = latency_us(conv, call, None, memory_format)

        def cost(r):
            return latency_us(conv, call, r, memory_format)
    else:
        dense, cost = ladder_dense, ladder_cost
    layer.row.update(cost_before=dense, cost_after=dense)
    layer.cost = cost
    layer.ranks = [r for f in families for r in f.ladder(conv, ladder_dense, ladder_cost, rank_multiple, fractions,
                                                          max_rank)]
    if metric == "latency" and families:
        # the rule compress_model applies again (compress.slower_than_dense): faster than dense by the margin
        layer.ranks = [r for r in layer.ranks if cost(r) < (1.0 - DENSE_MARGIN) * dense]
        if not layer.ranks:
            layer.row["reason"] = (f"dense: no candidate rank runs {DENSE_MARGIN:.0%} faster than dense on "
                                  f"{conv.weight.device.type}")


def _dense_costs(plan: RankPlan, model, sizes, batch, metric, memory_format) -> None:
    """The dense cost of every conv not considered, which a whole-network budget counts in full (0 for a conv the
    example inputs do not reach: it costs nothing in that forward)."""
    convs = {name: conv for name, conv, _ in convs_of(model)}
    for row in plan.rows:
        if row["considered"]:
            continue
        conv, in_hw = convs[row["name"]], sizes.get(id(convs[row["name"]]))
        if metric == "params":
            cost = conv.weight.numel()
        elif in_hw is None:
            cost = 0
        elif metric == "macs":
            cost = conv_shape(conv, in_hw).dense_macs()
        else:
            row["input_shape"] = (batch, conv.in_channels, *in_hw)  # as a considered conv's: its MACs in the report
            cost = latency_us(conv, row["input_shape"], None, memory_format)
        row.update(cost_before=cost, cost_after=cost)


def _refuse_unreachable(layers: list[_Layer], budget, capacity, whole, fixed, metric, budget_over,
                        vbmf: bool) -> None:
    """A budget that not even every layer's cheapest candidate meets (for ``"vbmf"``, which has no candidates
    yet: that the convs left dense alone exceed) is refused before any decomposition."""
    least = sum(x.row["cost_before"] if vbmf else min([x.row["cost_before"]] + [x.cost(r) for r in x.ranks])
                for x in layers)
    if (capacity < 0) if vbmf else (least > capacity):
        stuck = [] if vbmf else [x.row["name"] for x in layers if not x.ranks]
        of = "of the whole network's" if budget_over == "network" else "of the considered convs'"
        reachable = (fixed if vbmf else least + fixed) / whole
        raise ValueError(
            f"no choice of ranks fits budget {budget}: the smallest reachable fraction is {reachable:.3f} "
            f"{of} {metric}"
            + (f" (the convs left dense keep {fixed / whole:.3f} of it)" if fixed else "")
            + (f"; {len(stuck)} conv(s) have no candidate faster than dense here ({', '.join(stuck[:5])})"
               if stuck else "; add smaller fractions to the ladder, let more convs be factored (decomposition='auto' "
               "factors 1x1 convs too) or raise the budget"))


def _whiten_for_calibration(model, layers: list[_Layer], batches, shrinkage) -> None:
    """``method="data"``: each layer's network-output sensitivity, and its weight whitened by the shrunk second
    moments of its inputs, which the decompositions then minimise the output error of."""
    convs = {x.row["name"]: x.conv for x in layers}
    stats = input_statistics(model, batches, convs)
    sensitivity = output_sensitivity(model, batches, convs)
    for x in layers:
        root, x.inverse = input_whitening(shrink(stats[x.row["name"]].covariance, shrinkage), x.conv.in_channels,
                                          x.conv.groups)
        x.target = whiten_input_mode(x.conv.weight.detach(), root)
        x.row["sensitivity"] = sensitivity[x.row["name"]]


def _build_ladder(layer: _Layer, families, rank_multiple, options) -> None:
    """Every family's rungs of the layer, errors measured on the target, factors un-whitened."""
    if layer.target is None:
        layer.target = layer.conv.weight.detach()
    for family in applicable(families, layer.conv):  # their ranks' types differ on any one conv
        ranks = [r for r in layer.ranks if family.owns(r)]
        layer.rungs += family.rungs(layer.target, layer.conv.groups, ranks, layer.cost, layer.row["cost_before"],
                                    rank_multiple, options)
    if layer.inverse is not None:
        layer.rungs = [(c, e, r, f.unwhitened(layer.inverse)) for c, e, r, f in layer.rungs]


def _scale_vbmf(layers: list[_Layer], family, capacity, rank_multiple, options) -> list[int]:
    """``method="vbmf"``: each layer's estimate scaled by one common factor to the budget, decomposed once."""
    estimates = [family.vbmf_estimate(x.conv) for x in layers]
    chosen = scale_to_budget([(lambda e, c: lambda k: family.scaled(e, k, c, rank_multiple))(est, x.conv)
                              for est, x in zip(estimates, layers)],
                             [x.cost for x in layers], [x.row["cost_before"] for x in layers], capacity)
    for x, r, est in zip(layers, chosen, estimates):
        x.row["vbmf_rank"] = est
        if r is None:
            x.row["reason"] = "dense: the scaled VBMF rank saves nothing"
            continue
        f = family.at_rank(x.target, r, x.conv.groups, options)
        x.rungs.append((x.cost(r), f.relative_error(x.target), r, f))
    return [1 if x.rungs else 0 for x in layers]


def _fill_rows(plan: RankPlan, layers: list[_Layer], picks: list[int]) -> None:
    for x, k in zip(layers, picks):
        if k == 0:
            x.row["reason"] = x.row["reason"] or "dense: its error budget is better spent elsewhere"
            continue
        c, e, r, f = x.rungs[k - 1]
        f = f.to(x.conv.weight.dtype)
        x.row.update(decomposition=family_for(x.conv, r).name, rank=r, error=e,
                     weight_error=f.relative_error(x.conv.weight), cost_after=c)
        plan.factors[x.row["name"]] = f
