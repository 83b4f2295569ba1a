"""Model surgery: replace a network's ``nn.Conv2d`` layers by ``CPConv2d``, with a report of what it cost.

    model_cp, report = cpkernels.compress_model(model, rank=0.25, input_size=(1, 3, 224, 224))
    print(report)
    torch.save({"structure": report.structure, "state_dict": model_cp.state_dict()}, "cp.pt")
    # later, without pickled code:
    cpkernels.apply_structure(fresh_model, saved["structure"]); fresh_model.load_state_dict(saved["state_dict"])
"""
from __future__ import annotations

import copy
import csv
import fnmatch
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .decompose import RankSpec, resolve_rank
from .decompose_tucker2 import resolve_tucker2_rank
from .module import CPConv2d
from .module_tucker2 import TuckerConv2d
from .ops import conv_args

DEFAULT_RANK = 0.25  # compress_model's rank when neither rank nor target_error is given
NUMERIC_KEYS = ("params_before", "params_after", "macs_before", "macs_after", "seconds")
DECOMPOSITIONS = ("cp", "tucker2", "auto")
ROW_KEYS = ("name", "shape", "stride", "decomposition", "rank", "params_before", "params_after", "macs_before", "macs_after",
            "weight_error", "degeneracy", "cancellation", "seconds", "skipped")


# --------------------------------------------------------------------------------------------------
# Costs of one conv
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Shape:
    """The MACs of one conv on one image of a given size, dense and in CP form."""

    conv: nn.Conv2d
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]

    def dense_macs(self) -> int:
        c = self.conv
        return self.out_hw[0] * self.out_hw[1] * c.out_channels * (c.in_channels // c.groups) * math.prod(c.kernel_size)

    def cp_macs(self, rank: int) -> int:
        """Stage 1 at the input resolution, the vertical stage at (OH, W), the rest at (OH, OW)."""
        c = self.conv
        (h, w), (oh, ow), (kh, kw) = self.in_hw, self.out_hw, c.kernel_size
        gr = c.groups * rank
        return h * w * c.in_channels * rank + oh * w * gr * kh + oh * ow * gr * kw + oh * ow * rank * c.out_channels

    def tucker2_macs(self, rank: tuple[int, int]) -> int:
        """Stage 1 at the input resolution, the core conv and the output stage at (OH, OW)."""
        c = self.conv
        (h, w), (oh, ow), (kh, kw) = self.in_hw, self.out_hw, c.kernel_size
        r_out, r_in = rank
        return (h * w * c.in_channels * r_in + oh * ow * c.groups * r_out * r_in * kh * kw
                + oh * ow * r_out * c.out_channels)

    def macs(self, rank) -> int:
        """MACs of a CP rank (int) or Tucker-2 ranks (pair)."""
        return self.tucker2_macs(rank) if isinstance(rank, tuple) else self.cp_macs(rank)


def _conv_shape(conv: nn.Conv2d, in_hw: Optional[tuple[int, int]]) -> Optional[_Shape]:
    """The layer's cost on one ``in_hw`` image, or None when the input size is unknown."""
    if in_hw is None:
        return None
    padding = conv_args.explicit_padding(conv.padding, conv.kernel_size, conv.dilation)
    return _Shape(conv, in_hw, conv_args.output_size(in_hw, conv.kernel_size, conv.stride, padding, conv.dilation))


def cp_saves_macs(conv: nn.Conv2d, rank, in_hw: Optional[tuple[int, int]] = None) -> bool:
    """Whether the CP (int rank) or Tucker-2 (pair) form costs fewer MACs; without an input size, on a
    nominal 64x64 output."""
    shape = _conv_shape(conv, in_hw or (64 * conv.stride[0], 64 * conv.stride[1]))
    return shape.macs(rank) < shape.dense_macs()


def rank_for_mac_fraction(conv: nn.Conv2d, fraction: float, in_hw: tuple[int, int]) -> int:
    """The largest rank whose CP form costs at most ``fraction`` of the dense conv's MACs (at least 1)."""
    shape = _conv_shape(conv, in_hw)
    budget = fraction * shape.dense_macs()
    per_rank = shape.cp_macs(1)  # cp_macs is linear in the rank
    return max(1, int(budget // per_rank))


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
@dataclass
class CompressionReport:
    """One row per ``nn.Conv2d`` of the model (compressed or skipped), and their totals."""

    rows: list[dict] = field(default_factory=list)

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
            rank = "x".join(map(str, r["rank"])) if isinstance(r["rank"], tuple) else num(r["rank"], "d")
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


def degeneracy(factors) -> float:
    """Spread of the rank-one terms' norms, max/min over ranks and groups (1 = all equal; large = some
    terms cancel each other or vanish, which makes fine-tuning unstable)."""
    norms = torch.ones(factors.groups, factors.rank, dtype=torch.float64, device=factors.device)
    for f in factors.as_tuple():
        norms = norms * torch.linalg.vector_norm(f.detach().to(torch.float64), dim=1)
    lo, hi = float(norms.min()), float(norms.max())
    return float("inf") if lo == 0.0 else hi / lo


# --------------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------------
def _input_sizes(model: nn.Module, example_inputs) -> dict[int, tuple[int, int]]:
    """The (H, W) each conv sees in one forward pass, keyed by module id."""
    sizes: dict[int, tuple[int, int]] = {}

    def record(module, args):  # returns None: a pre-hook's return value would replace the input
        sizes.setdefault(id(module), tuple(args[0].shape[-2:]))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return sizes


def conv_input_sizes(model: nn.Module, input_size=None, example_inputs=None) -> dict[int, tuple[int, int]]:
    """The (H, W) each conv sees, keyed by module id, from ``example_inputs`` or, failing those, zeros of
    ``input_size`` in the model's device and dtype; empty when neither is given."""
    if example_inputs is None and input_size is not None:
        ref = next(model.parameters(), None)
        example_inputs = (torch.zeros(tuple(input_size), device=None if ref is None else ref.device,
                                      dtype=None if ref is None else ref.dtype),)
    return {} if example_inputs is None else _input_sizes(model, tuple(example_inputs))


def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every submodule, shared ones included, keyed by module id."""
    names: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _skip_reason(name, conv, rank, in_hw, include, exclude, predicate, min_channels, first) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not exactly nn.Conv2d"
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return "not matched by include"
    if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
        return "matched by exclude"
    if predicate is not None and not predicate(name, conv):
        return "rejected by predicate"
    if first:
        return "first conv (skip_first)"
    if conv.in_channels // conv.groups == 1:
        return "depthwise (one input channel per group)"
    if conv.kernel_size == (1, 1):
        return "1x1 conv: CP gains nothing over a pointwise conv"
    if min(conv.in_channels, conv.out_channels) < min_channels:
        return f"fewer than min_channels={min_channels} channels"
    if rank is not None and not cp_saves_macs(conv, rank, in_hw):
        return f"rank {rank} saves no MACs"
    return None


def _round_up(rank: int, multiple: int) -> int:
    return -(-rank // multiple) * multiple


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
    **decompose_kwargs,
) -> tuple[nn.Module, CompressionReport]:
    """Replace the ``nn.Conv2d`` layers of ``model`` by ``CPConv2d`` (or ``TuckerConv2d``).

    Args:
        model: any module; it is left untouched unless ``inplace=True``.
        rank: for every layer an ``int``, a ``float`` in (0, 1] (fraction of its parameters), a dict
            ``{qualified name: rank}`` (layers missing from it fall back to ``target_error`` if given,
            else are skipped), or a :class:`cpkernels.plans.ranks.RankPlan` from
            :func:`cpkernels.plan_ranks` (its decompositions are reused). Without ``rank`` and
            ``target_error``: 0.25.
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
            both, or a parameter fraction split in proportion to the channel counts); or ``"auto"``, per layer
            the one with the lower weight error at the same parameter fraction (or, for ``target_error``, the
            one meeting it with fewer MACs). A pair in a per-layer rank dict makes that layer Tucker-2.
        decompose_kwargs: passed to :func:`cpkernels.decompose_conv` (init, n_iter_max, random_state, ...);
            Tucker-2 takes ``n_iter_max``, ``random_state`` and ``input_covariance`` of them.

    Returns:
        The compressed model (same device and dtype) and a :class:`CompressionReport`.
        Depthwise and 1x1 convs, layers under ``min_channels`` and layers where CP would not save MACs
        are skipped, each with its reason. A conv shared by several parents is replaced once.
    """
    from .plans.ranks import RankPlan

    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple must be an int >= 1, got {rank_multiple!r}")
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}")
    if decomposition == "auto" and isinstance(rank, int) and not isinstance(rank, bool):
        raise ValueError("decomposition='auto' compares CP and Tucker-2 at one parameter fraction or target error: "
                         "give rank as a float in (0, 1] or target_error, not an int")
    if isinstance(rank, RankPlan):
        if rank_multiple != 1:
            raise ValueError("a RankPlan has its ranks already: give rank_multiple to plan_ranks instead")
        return _apply_plan(model, rank, inplace, backend)
    if rank is None and target_error is None:
        rank = DEFAULT_RANK
    if target_error is not None and rank is not None and not isinstance(rank, Mapping):
        raise ValueError("give either rank or target_error, not both (a per-layer rank dict may go with it)")
    if not inplace:
        model = copy.deepcopy(model)
    sizes = conv_input_sizes(model, input_size, example_inputs)

    names_of = _names_by_module(model)
    convs = {key: (names[0], model.get_submodule(names[0]), names) for key, names in names_of.items()
             if isinstance(model.get_submodule(names[0]), nn.Conv2d)}

    from tqdm.auto import tqdm

    report = CompressionReport()
    first_id = next(iter(convs), None)
    for key, (name, conv, all_names) in tqdm(convs.items(), desc="compressing", unit="layer",
                                             disable=(None if progress is None else not progress)):
        in_hw = sizes.get(key)
        layer_rank = rank.get(name) if isinstance(rank, Mapping) else rank
        layer_target = target_error if layer_rank is None else None
        kind = "tucker2" if isinstance(layer_rank, (tuple, list)) else decomposition
        ranks = {}  # the candidate ranks per decomposition, before any work (None: found for target_error)
        if type(conv) is nn.Conv2d:
            for k in (("cp", "tucker2") if kind == "auto" else (kind,)):
                ranks[k] = None if layer_rank is None else _layer_rank(conv, layer_rank, k, rank_multiple)
        # Skipped when every candidate is (the reason shown is the last one's).
        reasons = [_skip_reason(name, conv, r, in_hw, include, exclude, predicate, min_channels,
                                skip_first and key == first_id) for r in ranks.values() or [None]]
        reason = None if None in reasons else reasons[-1]
        if reason is None and layer_rank is None and layer_target is None:
            reason = "no rank given for this layer"
        if reason is None:  # of two candidates, only those that save MACs
            ranks = {k: r for k, r in ranks.items() if r is None or cp_saves_macs(conv, r, in_hw)}
        shape = _conv_shape(conv, in_hw) if type(conv) is nn.Conv2d else None
        row = {
            "name": name, "shape": tuple(conv.weight.shape), "stride": tuple(conv.stride), "decomposition": None,
            "rank": None, "params_before": conv.weight.numel(), "params_after": conv.weight.numel(),
            "macs_before": shape.dense_macs() if shape else None, "macs_after": shape.dense_macs() if shape else None,
            "weight_error": None, "degeneracy": None, "cancellation": None, "seconds": None, "skipped": reason,
        }
        if reason is None:
            start = time.perf_counter()
            layer = _best_layer(conv, ranks, layer_target, rank_multiple, backend, shape, decompose_kwargs)
            row["seconds"] = time.perf_counter() - start
            factors = layer.factors.detach()
            if shape is not None and not shape.macs(layer.rank) < shape.dense_macs():
                row["skipped"] = f"rank {layer.rank} (from target_error) saves no MACs"
            else:
                cp = isinstance(layer, CPConv2d)
                row.update(decomposition="cp" if cp else "tucker2", rank=layer.rank, params_after=factors.num_params,
                           macs_after=shape.macs(layer.rank) if shape else None,
                           weight_error=factors.relative_error(conv.weight),
                           degeneracy=degeneracy(factors) if cp else None,
                           cancellation=factors.cancellation() if cp else None)
                for n in all_names:  # a shared conv is decomposed once and replaced under every name
                    _set_submodule(model, n, layer)
        report.rows.append(row)
    return model, report


# The decompose_kwargs a Tucker-2 decomposition takes (the others are CP's ALS settings).
TUCKER2_KWARGS = ("n_iter_max", "random_state", "input_covariance")


def _layer_rank(conv: nn.Conv2d, rank, decomposition: str, multiple: int):
    """The rank policy as an int (CP) or a pair (Tucker-2), rounded up to ``multiple`` (Tucker-2 ranks at most
    the mode sizes)."""
    shape = tuple(conv.weight.shape)
    if decomposition == "cp":
        return _round_up(resolve_rank(rank, shape, conv.groups), multiple)
    r_out, r_in = resolve_tucker2_rank(rank, shape, conv.groups)
    return (min(_round_up(r_out, multiple), shape[0] // conv.groups), min(_round_up(r_in, multiple), shape[1]))


def _decomposed(conv, decomposition, rank, target, multiple, backend, kwargs):
    if decomposition == "cp":
        layer = CPConv2d.from_conv(conv, rank, target_error=target, backend=backend, **kwargs)
        if layer.rank % multiple:  # a rank found for target_error, rounded up: decomposed again
            layer = CPConv2d.from_conv(conv, _round_up(layer.rank, multiple), backend=backend, **kwargs)
        return layer
    tucker_kwargs = {k: v for k, v in kwargs.items() if k in TUCKER2_KWARGS}
    layer = TuckerConv2d.from_conv(conv, rank, target_error=target, backend=backend, **tucker_kwargs)
    if any(r % multiple for r in layer.rank) and target is not None:
        layer = TuckerConv2d.from_conv(conv, _layer_rank(conv, layer.rank, "tucker2", multiple), backend=backend,
                                       **tucker_kwargs)
    return layer


def _best_layer(conv, ranks: dict, target, multiple, backend, shape, kwargs):
    """The layer of each candidate decomposition; of two, the lower weight error at a given rank policy, or
    the fewer MACs (parameters without an input size) for a target error."""
    layers = [_decomposed(conv, k, r, target, multiple, backend, kwargs) for k, r in ranks.items()]
    if len(layers) == 1:
        return layers[0]
    if target is None:
        return min(layers, key=lambda m: m.factors.relative_error(conv.weight))
    return min(layers, key=lambda m: shape.macs(m.rank) if shape is not None else m.factors.num_params)


def _apply_plan(model: nn.Module, plan, inplace: bool, backend: str) -> tuple[nn.Module, CompressionReport]:
    """``compress_model(model, plan)``: the plan's ranks, with the factors it decomposed when it has them
    (a plan read from JSON has none: those layers are decomposed at the planned rank)."""
    plan.check_model(model)
    if plan.method == "data" and any(r["rank"] is not None and r["name"] not in plan.factors for r in plan.rows):
        warnings.warn("this plan holds no factors (a plan read from JSON): its layers are decomposed at the planned "
                      "ranks by weight-only CP, not with its calibration statistics; plan and compress in one "
                      "session for the data-aware factors", stacklevel=3)
    if not inplace:
        model = copy.deepcopy(model)
    names_of = _names_by_module(model)
    report = CompressionReport()
    for row in plan.rows:
        conv = model.get_submodule(row["name"])
        out = {"name": row["name"], "shape": tuple(conv.weight.shape), "stride": tuple(conv.stride),
               "decomposition": None, "rank": None,
               "params_before": conv.weight.numel(), "params_after": conv.weight.numel(), "macs_before": None,
               "macs_after": None, "weight_error": None, "degeneracy": None, "cancellation": None, "seconds": None,
               "skipped": row["reason"]}
        if plan.metric == "macs" and row["considered"]:
            out.update(macs_before=row["cost_before"], macs_after=row["cost_before"])
        if row["rank"] is not None:
            start = time.perf_counter()
            factors = plan.factors.get(row["name"])
            tucker2 = isinstance(row["rank"], (tuple, list))
            cls = TuckerConv2d if tucker2 else CPConv2d
            if factors is None:
                layer = cls.from_conv(conv, tuple(row["rank"]) if tucker2 else row["rank"], backend=backend)
            else:
                layer = cls.from_factors(factors.to(device=conv.weight.device, dtype=conv.weight.dtype),
                                         None if conv.bias is None else conv.bias.detach(), conv.stride,
                                         conv.padding, conv.dilation, conv.padding_mode, backend)
            f = layer.factors.detach()
            out.update(decomposition="tucker2" if tucker2 else "cp", rank=layer.rank, params_after=f.num_params,
                       weight_error=f.relative_error(conv.weight), degeneracy=None if tucker2 else degeneracy(f),
                       cancellation=None if tucker2 else f.cancellation(), seconds=time.perf_counter() - start,
                       skipped=None)
            if plan.metric == "macs":
                out.update(macs_before=row["cost_before"], macs_after=row["cost_after"])
            for n in names_of[id(conv)]:
                _set_submodule(model, n, layer)
        report.rows.append(out)
    return model, report


def apply_structure(model: nn.Module, structure: Union[CompressionReport, Mapping[str, int]]) -> nn.Module:
    """Give ``model`` the structure of a compression (in place), so a saved ``state_dict`` loads.

    ``structure`` is a :class:`CompressionReport` or its ``.structure`` dict ``{name: rank}``: an int rank
    makes a ``CPConv2d``, a pair ``(R_out, R_in)`` (or a 2-list, as JSON keeps it) a ``TuckerConv2d``. The
    new layers take each conv's hyperparameters, device and dtype; their factors are left to
    ``load_state_dict``.
    """
    if isinstance(structure, CompressionReport):
        structure = structure.structure
    names_of = _names_by_module(model)
    for name, rank in structure.items():
        conv = model.get_submodule(name)
        if isinstance(conv, (CPConv2d, TuckerConv2d)):
            continue
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"{name} is a {type(conv).__name__}, not an nn.Conv2d")
        cls = CPConv2d
        if isinstance(rank, (tuple, list)):
            cls, rank = TuckerConv2d, tuple(rank)
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, rank, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        for n in names_of[id(conv)]:  # a shared conv is replaced under every name it has
            _set_submodule(model, n, layer)
    return model
