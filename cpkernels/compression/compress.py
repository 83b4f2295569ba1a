"""Model surgery: replace a network's ``nn.Conv2d`` layers by factored ones (each family's layer: ``CPConv2d``,
``TuckerConv2d``, ``SVDConv2d`` for 1x1 convs), with a report of what it cost.

    model_cp, report = cpkernels.compress_model(model, rank=0.25, input_size=(1, 3, 224, 224))
    print(report)
    torch.save({"structure": report.structure, "state_dict": model_cp.state_dict()}, "cp.pt")
    # later, without pickled code:
    cpkernels.apply_structure(fresh_model, saved["structure"]); fresh_model.load_state_dict(saved["state_dict"])
"""
from __future__ import annotations

import copy
import csv
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from cpkernels.compression.batchnorm import fold_batchnorm as fold_batchnorm_into_convs
from cpkernels.compression.calibration import as_batches
from cpkernels.compression.compensate import OPTIONS as COMPENSATE_OPTIONS
from cpkernels.compression.compensate import CompensationReport, check_options
from cpkernels.compression.compensate import compensate as compensate_model
from cpkernels.compression.convs import conv_input_sizes, conv_shape, convs_of, filter_reason, replace_everywhere
from cpkernels.compression.families import (FAMILIES, applicable, families_for, family_for, family_named,
                                            family_of_layer, not_applicable_reason)
from cpkernels.compression.families.base import Family
from cpkernels.compression.network_timing import keep_dense_where_slower_in_network
from cpkernels.compression.ranks import RankPlan, latency_us, plan_memory_format, timing_memory_format
from cpkernels.decompositions.cp import RankSpec
from cpkernels.dispatch.measured import fastest_keeping_dense

DEFAULT_RANK = 0.25  # compress_model's rank when neither rank nor target_error is given
NUMERIC_KEYS = ("params_before", "params_after", "macs_before", "macs_after", "seconds")
ROW_KEYS = ("name", "shape", "stride", "decomposition", "rank", "params_before", "params_after", "macs_before", "macs_after",
            "weight_error", "degeneracy", "cancellation", "seconds", "skipped")


# --------------------------------------------------------------------------------------------------
# Costs of one conv
# --------------------------------------------------------------------------------------------------
def saves_macs(family: Family, conv: nn.Conv2d, rank, in_hw: Optional[tuple[int, int]] = None) -> bool:
    """Whether ``family``'s form at ``rank`` costs fewer MACs than ``conv``; without an input size, on a
    nominal 64x64 output."""
    shape = conv_shape(conv, in_hw or (64 * conv.stride[0], 64 * conv.stride[1]))
    return family.macs(shape, rank) < shape.dense_macs()


def rank_for_mac_fraction(conv: nn.Conv2d, fraction: float, in_hw: tuple[int, int]) -> int:
    """The largest rank whose CP form costs at most ``fraction`` of the dense conv's MACs (at least 1)."""
    shape = conv_shape(conv, in_hw)
    per_rank = FAMILIES["cp"].macs(shape, 1)  # CP's MACs are linear in the rank
    return max(1, int(fraction * shape.dense_macs() // per_rank))


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
@dataclass
class CompressionReport:
    """One row per ``nn.Conv2d`` of the model (compressed or skipped), and their totals."""

    rows: list[dict] = field(default_factory=list)
    # compress_model(..., compensate=True): what the sequential error compensation did, per layer
    compensation: Optional[CompensationReport] = None

    @property
    def totals(self) -> dict:
        out = {}
        for key in NUMERIC_KEYS:
            values = [r[key] for r in self.rows if r[key] is not None]
            out[key] = sum(values) if values else None
        return out

    @property
    def structure(self) -> dict[str, Union[int, tuple[int, int]]]:
        """``{qualified name: rank}`` of the compressed layers, an int for CP and a pair ``(R_out, R_in)`` for
        Tucker-2: what :func:`apply_structure` needs."""
        return {r["name"]: r["rank"] for r in self.rows if r["skipped"] is None}

    def to_csv(self, path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ROW_KEYS)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: r[k] for k in ROW_KEYS})

    def __str__(self) -> str:
        def num(v, spec=","):
            return "-" if v is None else format(v, spec)

        header = ("layer", "shape", "form", "rank", "params", "MACs", "weight err", "degeneracy", "cancellation", "s",
                  "")
        lines = []
        for r in self.rows:
            params = f"{num(r['params_before'])} -> {num(r['params_after'])}"
            macs = "-" if r["macs_before"] is None else f"{num(r['macs_before'])} -> {num(r['macs_after'])}"
            rank = "-" if r["rank"] is None else family_named(r["decomposition"]).rank_text(r["rank"])
            lines.append((r["name"], "x".join(map(str, r["shape"])), r["decomposition"] or "-", rank, params, macs,
                          num(r["weight_error"], ".3f"), num(r["degeneracy"], ".1f"), num(r["cancellation"], ".1f"),
                          num(r["seconds"], ".2f"),
                          f"skipped: {r['skipped']}" if r["skipped"] else ""))
        t = self.totals
        lines.append(("total", "", "", "", f"{num(t['params_before'])} -> {num(t['params_after'])}",
                      "-" if t["macs_before"] is None else f"{num(t['macs_before'])} -> {num(t['macs_after'])}",
                      "", "", "", num(t["seconds"], ".2f"), ""))
        widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
        fmt = "  ".join(f"{{:{w}}}" for w in widths)
        table = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        table += [fmt.format(*map(str, line)) for line in lines]
        return "\n".join(line.rstrip() for line in table)


def layer_row(name: str, conv: nn.Conv2d, shape, skipped: Optional[str]) -> dict:
    """The report's row of ``conv`` left dense (``skipped`` says why; None until a factored form replaces it)."""
    macs = shape.dense_macs() if shape is not None else None
    return {"name": name, "shape": tuple(conv.weight.shape), "stride": tuple(conv.stride), "decomposition": None,
            "rank": None, "params_before": conv.weight.numel(), "params_after": conv.weight.numel(),
            "macs_before": macs, "macs_after": macs, "weight_error": None, "degeneracy": None, "cancellation": None,
            "seconds": None, "skipped": skipped}


def factored_row(row: dict, conv: nn.Conv2d, layer: nn.Module, shape, seconds: float) -> dict:
    """``row`` updated with the factored ``layer`` that replaces ``conv``."""
    family = family_of_layer(layer)
    factors = layer.factors.detach()
    row.update(decomposition=family.name, rank=layer.rank, params_after=factors.num_params,
               macs_after=family.macs(shape, layer.rank) if shape is not None else None,
               weight_error=factors.relative_error(conv.weight), seconds=seconds, skipped=None,
               **family.diagnostics(factors))
    return row


# --------------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------------
def compress_model(
    model: nn.Module,
    rank: Union[RankSpec, Mapping[str, RankSpec], None] = None,
    *,
    target_error: Optional[float] = None,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    predicate: Optional[Callable[[str, nn.Module], bool]] = None,
    min_channels: int = 1,
    skip_first: bool = False,
    inplace: bool = False,
    input_size: Optional[Sequence[int]] = None,
    example_inputs: Optional[Iterable] = None,
    backend: str = "auto",
    progress: Optional[bool] = None,
    rank_multiple: int = 1,
    decomposition: str = "cp",
    fold_batchnorm: bool = False,
    compensate: Union[bool, Mapping[str, Any]] = False,
    calibration: Optional[Iterable] = None,
    keep_dense_where_faster: Union[bool, str] = False,
    memory_format=None,
    **decompose_kwargs,
) -> tuple[nn.Module, CompressionReport]:
    """Replace the ``nn.Conv2d`` layers of ``model`` by ``CPConv2d`` (or ``TuckerConv2d``, ``SVDConv2d``).

    Args:
        model: any module; it is left untouched unless ``inplace=True``.
        rank: for every layer an ``int``, a ``float`` in (0, 1] (fraction of its parameters), a dict
            ``{qualified name: rank}`` (layers missing from it fall back to ``target_error`` if given,
            else are skipped), or a :class:`cpkernels.compression.ranks.RankPlan` from
            :func:`cpkernels.plan_ranks` (its decompositions are reused; under a ``metric="latency"`` plan a
            conv whose factored form is not faster than it on this device stays dense, the report saying why).
            Without ``rank`` and ``target_error``: 0.25.
        target_error: instead of a rank: per layer, the smallest rank with relative weight error at
            most this.
        include, exclude: glob patterns on qualified names (``"features.*"``).
        predicate: ``predicate(name, module) -> bool``, a further filter.
        min_channels: skip layers with fewer input or output channels.
        skip_first: leave the first conv (in ``model.named_modules()`` order) dense.
        input_size / example_inputs: an input shape (zeros are used) or inputs for one forward pass
            that records each conv's input size, for the MACs in the report.
        backend: the ``CPConv2d`` backend.
        progress: a tqdm bar over the layers; ``None`` shows it only on a terminal.
        rank_multiple: round every rank (given, or found for ``target_error``) up to a multiple of this;
            ONNX Runtime's blocked CPU convs want channel counts in multiples of 4 or 8 (see README).
        decomposition: ``"cp"``; ``"tucker2"`` (``TuckerConv2d``: a rank is a pair ``(R_out, R_in)``, an int for
            both, or a parameter fraction split in proportion to the channel counts); ``"svd"`` (``SVDConv2d``,
            the truncated SVD, for the 1x1 convs only); or ``"auto"``, per layer the family that factors it
            (the SVD on a 1x1 conv; CP or Tucker-2 on a kh x kw conv, the one with the lower weight error at
            the same parameter fraction or, for ``target_error``, the one meeting it with fewer MACs). A pair
            in a per-layer rank dict makes that layer Tucker-2; an int in it for a 1x1 conv makes it SVD.
        fold_batchnorm: first fold every BatchNorm2d that follows a conv (and that only it feeds) into it, the
            BatchNorm left as an ``nn.Identity`` (:func:`cpkernels.compression.batchnorm.fold_batchnorm`): the
            decomposition then minimises the error that reaches the next layer. The model must be in eval
            mode. A plan made with ``fold_batchnorm=True`` folds whatever this says.
        compensate: then refit every factored layer, front to back, to reproduce the dense conv's output from the
            input the compressed network gives it, on ``calibration`` (:func:`cpkernels.compensate`; its report is
            ``report.compensation``). A dict instead of True passes :func:`cpkernels.compensate` its options
            (``holdout``, ``ridges``, ``relu_steps``), e.g. ``compensate={"relu_steps": 3}``.
        calibration: input batches for ``compensate`` (at least two: some are held out to choose the ridge).
        keep_dense_where_faster: time each factored layer against its conv on the model's device, at the input
            shape ``input_size`` or ``example_inputs`` gives it, and keep the conv where the factored form is not
            faster by :data:`cpkernels.dispatch.measured.DENSE_MARGIN` (the report says why). A MAC plan's ranks
            are timed so too; a latency plan always checks again, at the inputs it was timed at. ``"network"``:
            instead, time the compressed model as a whole on those inputs, with every factored layer and then with
            every conv in its place, and keep the conv where the factored layer was not faster *there*
            (:mod:`cpkernels.compression.network_timing`: the layers before it can change the winner).
        memory_format: the layout ``keep_dense_where_faster`` times both forms in, ``torch.contiguous_format``
            (NCHW) or ``torch.channels_last``, as the model will be called (the fastest form can differ between
            them). None: that of the first example input when it is given, else a plan's ``memory_format``, else
            NCHW. A latency plan uses its own.
        decompose_kwargs: passed to :func:`cpkernels.decompose_conv` (init, n_iter_max, random_state, ...);
            Tucker-2 takes ``n_iter_max``, ``random_state`` and ``input_covariance`` of them, the SVD
            ``input_covariance``.

    Returns:
        The compressed model (same device and dtype) and a :class:`CompressionReport`.
        Depthwise convs, convs no family of ``decomposition`` factors (1x1 convs are the ``"svd"`` family's:
        ``decomposition="cp"`` or ``"tucker2"`` leaves them dense), layers under ``min_channels`` and layers
        where the factored form would not save MACs are skipped, each with its reason. A conv shared by several parents is replaced once.
    """
    options = _compensate_options(compensate)
    if compensate is not False:  # checked before any work: the batches, and a dense copy for the targets in place
        if calibration is None:
            raise ValueError("compensate=True needs calibration: an iterable of input batches")
        batches = as_batches(calibration)
        if len(batches) < 2:
            raise ValueError("compensate=True needs at least 2 calibration batches (some are held out to choose "
                             f"the ridge), got {len(batches)}")
        dense = copy.deepcopy(model) if inplace else model
    elif calibration is not None:
        raise ValueError("calibration is for compensate=True (plan_ranks takes its own)")
    latency_plan = isinstance(rank, RankPlan) and rank.metric == "latency"
    if not (isinstance(keep_dense_where_faster, bool) or keep_dense_where_faster == "network"):
        raise ValueError(f"keep_dense_where_faster must be True, False or 'network', got {keep_dense_where_faster!r}")
    inputs_needed = keep_dense_where_faster == "network" or (keep_dense_where_faster and not latency_plan)
    if inputs_needed and input_size is None and example_inputs is None:
        raise ValueError(f"keep_dense_where_faster={keep_dense_where_faster!r} needs input_size or example_inputs "
                         "(a conv's time depends on its input)")
    if memory_format is not None and latency_plan:
        raise ValueError("a latency plan was timed in its own memory format (plan.memory_format): give "
                         "memory_format to plan_ranks instead")
    if memory_format is not None and not keep_dense_where_faster:
        raise ValueError("memory_format is the layout keep_dense_where_faster=True times in: without it nothing "
                         "is timed")
    if memory_format is None and example_inputs is None and isinstance(rank, RankPlan):
        memory_format = plan_memory_format(rank)  # the layout the plan was made for
    memory_format = timing_memory_format(memory_format, None if input_size is not None else example_inputs)
    compressed, report = _compress(model, rank, target_error, include, exclude, predicate, min_channels, skip_first,
                                   inplace, input_size, example_inputs, backend, progress, rank_multiple,
                                   decomposition, fold_batchnorm, keep_dense_where_faster, memory_format,
                                   decompose_kwargs)
    if compensate is not False:
        folded = fold_batchnorm or (isinstance(rank, RankPlan) and rank.fold_batchnorm)
        compressed, report.compensation = compensate_model(compressed, dense, batches, fold_batchnorm=folded,
                                                           inplace=True, progress=progress, **options)
    return compressed, report


def _compensate_options(compensate) -> dict:
    """``compress_model``'s ``compensate`` argument as :func:`cpkernels.compensate`'s options, checked."""
    if isinstance(compensate, bool):
        return {}
    if not isinstance(compensate, Mapping):
        raise TypeError(f"compensate must be a bool or a dict of compensate's options, got {type(compensate).__name__}")
    unknown = sorted(set(compensate) - set(COMPENSATE_OPTIONS))
    if unknown:
        raise ValueError(f"compensate's options are {', '.join(COMPENSATE_OPTIONS)}; got "
                         f"{', '.join(map(repr, unknown))}")
    check_options(**compensate)
    return dict(compensate)


def _compress(model, rank, target_error, include, exclude, predicate, min_channels, skip_first, inplace, input_size,
              example_inputs, backend, progress, rank_multiple, decomposition, fold_batchnorm, keep_faster,
              memory_format, decompose_kwargs) -> tuple[nn.Module, CompressionReport]:
    """:func:`compress_model` without compensation."""
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple must be an int >= 1, got {rank_multiple!r}")
    families = families_for(decomposition)
    if decomposition == "auto" and isinstance(rank, int) and not isinstance(rank, bool):
        raise ValueError("decomposition='auto' compares the families of each conv at one parameter fraction or "
                         "target error: give rank as a float in (0, 1] or target_error, not an int")
    if isinstance(rank, RankPlan):
        if rank_multiple != 1:
            raise ValueError("a RankPlan has its ranks already: give rank_multiple to plan_ranks instead")
        return _apply_plan(model, rank, inplace, backend, fold_batchnorm or rank.fold_batchnorm,
                           "network" if keep_faster == "network" else keep_faster and rank.metric != "latency",
                           input_size, example_inputs, memory_format)
    if rank is None and target_error is None:
        rank = DEFAULT_RANK
    if target_error is not None and rank is not None and not isinstance(rank, Mapping):
        raise ValueError("give either rank or target_error, not both (a per-layer rank dict may go with it)")
    if fold_batchnorm:
        model, _ = fold_batchnorm_into_convs(model, inplace=inplace)  # refused in training mode, before any work
    elif not inplace:
        model = copy.deepcopy(model)
    sizes = conv_input_sizes(model, input_size, example_inputs)
    batch = _timing_batch(input_size, example_inputs) if keep_faster else None
    convs = list(convs_of(model))
    report = CompressionReport()
    replaced = {}  # name -> (conv, its names, its row, the row as dense): what "network" may put back
    for i, (name, conv, names) in enumerate(tqdm(convs, desc="compressing", unit="layer",
                                                 disable=None if progress is None else not progress)):
        in_hw = sizes.get(id(conv))
        layer_rank = rank.get(name) if isinstance(rank, Mapping) else rank
        target = target_error if layer_rank is None else None
        shape = conv_shape(conv, in_hw) if type(conv) is nn.Conv2d else None
        reason = filter_reason(name, conv, include, exclude, predicate, min_channels, skip_first and i == 0)
        candidates = {}
        if reason is None:
            candidates, reason = _candidates(conv, layer_rank, target, families, rank_multiple, in_hw,
                                             named=isinstance(rank, Mapping) and name in rank)
        row = layer_row(name, conv, shape, reason)
        if reason is None:
            start = time.perf_counter()
            layer = _best_layer(conv, candidates, target, rank_multiple, backend, shape, decompose_kwargs)
            seconds = time.perf_counter() - start
            family = family_of_layer(layer)
            if shape is not None and not family.macs(shape, layer.rank) < shape.dense_macs():
                row["skipped"] = f"rank {layer.rank} (from target_error) saves no MACs"
            elif keep_faster is True and in_hw is not None and (slower := slower_than_dense(
                    conv, family.name, layer.rank, (batch, conv.in_channels, *in_hw), memory_format)):
                row["skipped"] = slower
            else:
                replaced[name] = (conv, names, row, dict(row))
                factored_row(row, conv, layer, shape, seconds)
                replace_everywhere(model, names, layer)
        report.rows.append(row)
    if keep_faster == "network":
        _keep_dense_in_network(model, replaced, input_size, example_inputs, memory_format)
    return model, report


def _keep_dense_in_network(model: nn.Module, replaced: Mapping[str, tuple], input_size, example_inputs,
                           memory_format) -> None:
    """``keep_dense_where_faster="network"``: the convs in ``replaced`` whose factored layer was not faster in the
    model's forward on ``example_inputs`` (else on a random input of ``input_size`` in ``memory_format``) are put
    back, their report rows made dense again with the reason."""
    if not replaced:
        return
    if example_inputs is None:
        ref = next(model.parameters())
        # a generator of its own: the caller's random state is not drawn from
        x = torch.randn(tuple(input_size), generator=torch.Generator().manual_seed(0), dtype=ref.dtype)
        example_inputs = (x.to(ref.device).contiguous(memory_format=memory_format),)
    kept = keep_dense_where_slower_in_network(model, {name: (conv, names) for name, (conv, names, _, _) in
                                                      replaced.items()}, example_inputs)
    for name, why in kept.items():
        _, _, row, dense_row = replaced[name]
        row.clear()
        row.update(dense_row, skipped=why)


def _candidates(conv: nn.Conv2d, layer_rank, target, families, multiple: int, in_hw,
                named: bool = False) -> tuple[dict, Optional[str]]:
    """``({family: rank, or None for a target error}, None)`` of the candidate forms that save MACs, or
    ``({}, why none is tried)``. Only the families that factor the conv are candidates. A rank that only one
    family has on this conv (a Tucker-2 pair; an int given for this layer by name) picks that family."""
    if layer_rank is None and target is None:
        return {}, "no rank given for this layer"
    typed = layer_rank is not None and not isinstance(layer_rank, float)
    if typed and (named or not isinstance(layer_rank, numbers.Real)):
        try:
            families = (family_for(conv, layer_rank),)
        except TypeError as error:
            return {}, str(error)
    elif not applicable(families, conv):
        return {}, not_applicable_reason(families, conv)
    families = applicable(families, conv)
    candidates = {f: None if layer_rank is None else f.round_up(f.resolve(layer_rank, conv), conv, multiple)
                  for f in families}
    saving = {f: r for f, r in candidates.items() if r is None or saves_macs(f, conv, r, in_hw)}
    if not saving:  # the reason shown is the last candidate's
        return {}, f"rank {list(candidates.values())[-1]} saves no MACs"
    return saving, None


def _best_layer(conv, candidates: dict, target, multiple, backend, shape, decompose_kwargs):
    """The layer of each candidate family; of two, the lower weight error at a given rank policy, or the fewer
    MACs (parameters without an input size) for a target error."""
    layers = [f.layer(conv, r, target, multiple, backend, decompose_kwargs) for f, r in candidates.items()]
    if len(layers) == 1:
        return layers[0]
    if target is None:
        return min(layers, key=lambda m: m.factors.relative_error(conv.weight))
    return min(layers, key=lambda m: (family_of_layer(m).macs(shape, m.rank) if shape is not None
                                      else m.factors.num_params))


def _timing_batch(input_size, example_inputs) -> int:
    """The batch size ``keep_dense_where_faster`` times each conv at."""
    return input_size[0] if input_size is not None else next(iter(example_inputs)).shape[0]


def _apply_plan(model: nn.Module, plan: RankPlan, inplace: bool, backend: str, fold_batchnorm: bool,
                keep_faster: Union[bool, str] = False, input_size=None, example_inputs=None,
                memory_format=torch.contiguous_format) -> tuple[nn.Module, CompressionReport]:
    """``compress_model(model, plan)``: the plan's ranks, with the factors it decomposed when it has them
    (a plan read from JSON has none: those layers are decomposed at the planned rank). A latency plan checks
    each factored conv again at the input it was timed at; ``keep_faster`` times a MAC plan's at the input
    ``input_size`` or ``example_inputs`` gives it, in ``memory_format`` (``"network"``: any plan's, in the model's
    forward on those inputs)."""
    plan.check_model(model)
    if fold_batchnorm:
        model, _ = fold_batchnorm_into_convs(model, inplace=inplace)
        inplace = True
    if plan.method == "data" and any(r["rank"] is not None and r["name"] not in plan.factors for r in plan.rows):
        warnings.warn("this plan holds no factors (a plan read from JSON): its layers are decomposed at the planned "
                      "ranks by weight-only CP, not with its calibration statistics; plan and compress in one "
                      "session for the data-aware factors", stacklevel=3)
    if not inplace:
        model = copy.deepcopy(model)
    names_of = {id(conv): names for _, conv, names in convs_of(model)}
    sizes = conv_input_sizes(model, input_size, example_inputs) if keep_faster is True else {}
    batch = _timing_batch(input_size, example_inputs) if keep_faster is True else None
    report = CompressionReport()
    replaced = {}  # name -> (conv, its names, its row, the row as dense): what "network" may put back
    for planned in plan.rows:
        conv = model.get_submodule(planned["name"])
        # a latency plan recorded the input each conv it reached was timed at: its MACs there go in the report
        shape = conv_shape(conv, tuple(planned["input_shape"][2:])) if planned.get("input_shape") else None
        row = layer_row(planned["name"], conv, shape, planned["reason"])
        # A whole-network plan holds every conv's dense MACs; an older one only the considered convs'.
        if plan.metric == "macs" and (planned["considered"] or plan.budget_over == "network"):
            row.update(macs_before=planned["cost_before"], macs_after=planned["cost_before"])
        if planned["rank"] is not None and plan.metric == "latency" and planned.get("input_shape"):
            row["skipped"] = slower_than_dense(conv, planned["decomposition"], planned["rank"],
                                               planned["input_shape"], plan_memory_format(plan))
        elif planned["rank"] is not None and id(conv) in sizes:
            # keep_faster on a MAC plan; a conv that the input does not reach is factored as planned
            row["skipped"] = slower_than_dense(conv, planned["decomposition"], planned["rank"],
                                               (batch, conv.in_channels, *sizes[id(conv)]), memory_format)
        if planned["rank"] is not None and row["skipped"] is None:
            start = time.perf_counter()
            family = family_named(planned["decomposition"])
            factors = plan.factors.get(planned["name"])
            layer = (family.module.from_conv(conv, family.normalise(planned["rank"]), backend=backend)
                     if factors is None else family.from_factors(factors, conv, backend))
            replaced[planned["name"]] = (conv, names_of[id(conv)], row, dict(row))
            factored_row(row, conv, layer, shape, time.perf_counter() - start)
            if plan.metric == "macs":
                row.update(macs_before=planned["cost_before"], macs_after=planned["cost_after"])
            replace_everywhere(model, names_of[id(conv)], layer)
        report.rows.append(row)
    if keep_faster == "network":
        _keep_dense_in_network(model, replaced, input_size, example_inputs, memory_format)
    return model, report


def slower_than_dense(conv: nn.Conv2d, decomposition: str, rank, input_shape: Sequence[int],
                      memory_format=torch.contiguous_format) -> Optional[str]:
    """Why ``conv`` stays dense: its factored form at ``rank`` is not faster than it on ``input_shape`` (in
    ``memory_format``) by
    :data:`cpkernels.dispatch.measured.DENSE_MARGIN`, timed on the conv's device
    (:func:`cpkernels.compression.ranks.latency_us`); None where it is. The timings are cached per shape and
    device, so a plan made in this process keeps its own; a plan read from JSON (made on another machine,
    perhaps) is timed again here, where the model runs."""
    dense_us = latency_us(conv, tuple(input_shape), None, memory_format)
    factored_us = latency_us(conv, tuple(input_shape), rank, memory_format)
    if fastest_keeping_dense({"dense": dense_us, "factored": factored_us}, "dense") == "factored":
        return None
    layout = " channels_last" if memory_format is torch.channels_last else ""
    return (f"dense: rank {family_named(decomposition).rank_text(rank)} ran {factored_us:,.1f} µs against the dense "
            f"conv's {dense_us:,.1f} µs on {conv.weight.device.type}, input {'x'.join(map(str, input_shape))}"
            f"{layout}")


def convs_kept_dense(model: nn.Module, structure: Mapping[str, Union[int, tuple[int, int]]],
                     input_shape: Sequence[int], memory_format=torch.contiguous_format) -> dict[str, str]:
    """``{name: why}`` of the convs of ``model`` in ``structure`` (conv name -> rank, any family's) that
    ``compress_model(..., keep_dense_where_faster=True)`` would keep as ``nn.Conv2d`` on ``input_shape``: those
    whose factored form at that rank is not faster than the conv (:func:`slower_than_dense`), each timed at the
    input it sees in ``model``. Nothing is decomposed (the time does not depend on the factors' values)."""
    sizes = conv_input_sizes(model, tuple(input_shape))
    kept = {}
    for name, rank in structure.items():
        conv = model.get_submodule(name)
        if id(conv) not in sizes:
            raise ValueError(f"{name!r} is not reached by an input of shape {tuple(input_shape)}")
        why = slower_than_dense(conv, family_for(conv, rank).name, rank,
                                (input_shape[0], conv.in_channels, *sizes[id(conv)]), memory_format)
        if why is not None:
            kept[name] = why
    return kept


def apply_structure(model: nn.Module, structure: Union[CompressionReport, Mapping[str, int]]) -> nn.Module:
    """Give ``model`` the structure of a compression (in place), so a saved ``state_dict`` loads.

    ``structure`` is a :class:`CompressionReport` or its ``.structure`` dict ``{name: rank}``: an int rank
    makes a ``CPConv2d`` (an ``SVDConv2d`` on a 1x1 conv), a pair ``(R_out, R_in)`` (or a 2-list, as JSON keeps
    it) a ``TuckerConv2d``. The
    new layers take each conv's hyperparameters, device and dtype; their factors are left to
    ``load_state_dict``.
    """
    if isinstance(structure, CompressionReport):
        structure = structure.structure
    names_of = {id(conv): names for _, conv, names in convs_of(model)}
    factored = tuple(f.module for f in FAMILIES.values())
    for name, rank in structure.items():
        conv = model.get_submodule(name)
        if isinstance(conv, factored):
            continue
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"{name} is a {type(conv).__name__}, not an nn.Conv2d")
        family = family_for(conv, rank)
        replace_everywhere(model, names_of[id(conv)], family.empty_layer(conv, family.normalise(rank)))
    return model
