"""Sequential error compensation: each factored layer refitted, front to back, so that it maps the input it
receives in the compressed network to the output its dense conv gives in the dense network.

    compensated, report = compensate(compressed, dense, calibration)
    print(report)          # per layer: pixels, unknowns, ridge, error before and after, held-out check

Every family ends in the same last stage: a 1x1 conv of the rank-R intermediate ``z`` (``output (G, Cout/G, R)``)
plus the bias. With the layers before it already compensated, the layer's input ``x^`` is what the compressed
network gives it, and ``z = intermediate(x^)``; the target ``y`` is the dense network's output of the same conv.
The output factor and the bias then have a closed form, ridge least squares toward the current factors:

    [A b] = argmin sum_pixels ||A z + b - y||^2 + lam ||A - A0||^2

accumulated as ``(R+1) x (R+1)`` and ``Cout x (R+1)`` sums per group over the calibration pixels, so memory does not
grow with the data (Zhang et al., TPAMI 2016, "asymmetric reconstruction", for the output side).

With ``relu_steps``, a layer whose output only a ReLU reads is fitted to the ReLU's output instead, since what the
ReLU zeroes reaches no later layer (Zhang et al.'s "nonlinear" reconstruction): after the refit above, a few
majorise-minimise steps, each the same closed form toward the ReLU's one-sided bound at the current factors (``y``
where ``y > 0``, else ``min(A z + b, 0)``), each from one more pass over the batches.

Overfitting is the danger: a refit on one photo and its mirror lowers every layer's calibration error and can
lower an unseen photo's quality. So the last calibration batches are held out: the ridge is chosen on them, and a
refit that does not lower their error is refused (the layer keeps its factors, and the report says so).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cpkernels.compression import batchnorm
from cpkernels.compression.calibration import _ForwardHooks, _Kept, as_batches, run_batch
from cpkernels.compression.families import family_of_layer
from cpkernels.compression.relu import convs_read_by_relu
from cpkernels.modules.factored import FactoredConv2d

# Ridges to try, as multiples of the intermediate's mean energy per channel (trace(Gzz) / R over the pixels): a
# scale-free grid from nearly plain least squares to nearly "keep the factors".
RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
HOLDOUT = 0.25


def _grouped(t: Tensor, groups: int) -> Tensor:
    """``[N, G*C, H, W]`` -> ``[G, C, N*H*W]`` in float64: one group's channels by its pixels."""
    n = t.shape[0]
    return t.to(torch.float64).reshape(n, groups, t.shape[1] // groups, -1).permute(1, 2, 0, 3).reshape(
        groups, t.shape[1] // groups, -1)


def _design(z: Tensor, groups: int) -> Tensor:
    """The intermediate ``[N, G*R, H, W]`` as ``[G, R+1, P]``, with a row of ones for the bias."""
    z = _grouped(z, groups)
    return torch.cat([z, torch.ones_like(z[:, :1])], 1)


@dataclass
class _Sums:
    """Per group, over pixels: ``zz = sum z~ z~^T`` and ``yz = sum y z~^T`` with ``z~ = [z; 1]``, and ``yy = sum ||y||^2``."""

    zz: Tensor  # [G, R+1, R+1]
    yz: Tensor  # [G, Cout/G, R+1]
    yy: float = 0.0
    pixels: int = 0

    @classmethod
    def zeros(cls, groups: int, out_per_group: int, rank: int, device) -> "_Sums":
        return cls(torch.zeros(groups, rank + 1, rank + 1, dtype=torch.float64, device=device),
                   torch.zeros(groups, out_per_group, rank + 1, dtype=torch.float64, device=device))

    def add(self, z: Tensor, y: Tensor) -> None:
        """Add the pixels of the intermediate ``z`` ``[N, G*R, H, W]`` and the target ``y`` ``[N, Cout, H, W]``."""
        g = self.zz.shape[0]
        self.add_grouped(_design(z, g), _grouped(y, g))

    def add_grouped(self, z: Tensor, y: Tensor) -> None:
        """Add the pixels of ``z`` ``[G, R+1, P]`` (:func:`_design`) and ``y`` ``[G, Cout/G, P]`` (:func:`_grouped`)."""
        self.zz += z @ z.transpose(1, 2)  # [G, R+1, P] @ [G, P, R+1] -> [G, R+1, R+1]
        self.yz += y @ z.transpose(1, 2)  # [G, Cout/G, P] @ [G, P, R+1] -> [G, Cout/G, R+1]
        self.yy += float(y.pow(2).sum())
        self.pixels += z.shape[-1]

    def __add__(self, other: "_Sums") -> "_Sums":
        return _Sums(self.zz + other.zz, self.yz + other.yz, self.yy + other.yy, self.pixels + other.pixels)

    def error(self, w: Tensor) -> float:
        """``sum ||W z~ - y||^2 / sum ||y||^2`` for ``w = [A b]`` ``[G, Cout/G, R+1]``, from the sums alone."""
        # ||Wz - y||^2 = tr(W zz W^T) - 2 tr(W yz^T) + yy
        quadratic = (w @ self.zz * w).sum() - 2 * (w * self.yz).sum()
        return max(float(quadratic) + self.yy, 0.0) / max(self.yy, 1e-300)

    def solve(self, w0: Tensor, ridge: float, bias: bool) -> Tensor:
        """The ridge solution toward ``w0`` on A (never on the bias): ``W (zz + lam D) = yz + lam D w0``, D the
        identity on A's columns and 0 on the bias's. Without a bias its column is left out and stays zero."""
        rank = self.zz.shape[-1] - 1
        k = rank + 1 if bias else rank
        zz, yz = self.zz[:, :k, :k], self.yz[:, :, :k]
        scale = float(torch.diagonal(zz[:, :rank, :rank], dim1=1, dim2=2).sum()) / (rank * zz.shape[0])
        d = torch.zeros(k, dtype=torch.float64, device=zz.device)
        d[:rank] = 1.0
        lam = ridge * max(scale, 1e-300)
        lhs = zz + lam * torch.diag_embed(d)
        rhs = yz + lam * w0[:, :, :k] * d
        # zz is symmetric: W lhs = rhs  <=>  lhs W^T = rhs^T
        w = torch.linalg.solve(lhs, rhs.transpose(1, 2)).transpose(1, 2)
        return w if bias else torch.cat([w, torch.zeros_like(w[:, :, :1])], 2)


@dataclass
class CompensationReport:
    """One row per factored layer, in forward order: what it was fitted to (``"conv output"``, or ``"after ReLU"``
    for a layer only a ReLU reads), its calibration pixels and its unknowns per output channel (the rank, plus one
    for the bias: each output channel is a regression of its own on those pixels), the ridge chosen, the refits
    kept (``steps``), the relative output error ``||layer(x^) - y||^2 / ||y||^2`` (after the ReLU:
    ``||relu(layer(x^)) - relu(y)||^2 / ||relu(y)||^2``) on all calibration batches before and after, the same on
    the held-out batches (after: of the refit on the other batches alone), and whether the refit was kept."""

    rows: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        header = ("layer", "fitted", "pixels", "unknowns per output", "ridge", "refits", "error before", "error after",
                  "held-out before", "held-out after", "refit")
        lines = [header]
        for r in self.rows:
            lines.append((r["name"], r["fitted"], f"{r['pixels']:,}", f"{r['unknowns']:,}",
                          "" if r["ridge"] is None else f"{r['ridge']:g}", str(r["steps"]), f"{r['error_before']:.4f}",
                          f"{r['error_after']:.4f}", f"{r['holdout_before']:.4f}", f"{r['holdout_after']:.4f}",
                          "kept" if r["refit"] else f"refused: {r['reason']}"))
        widths = [max(len(line[k]) for line in lines) for k in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def intermediate(layer: FactoredConv2d, x: Tensor) -> Tensor:
    """The layer's rank-R intermediate ``[N, G*R, H', W']`` on input ``x``: everything but the last 1x1 stage, run as
    the layer itself with an identity output factor and no bias (an exact copy through that stage)."""
    family = family_of_layer(layer)
    factors = layer.factors.detach()
    g, _, rank = factors.output.shape
    eye = torch.eye(rank, dtype=factors.output.dtype, device=factors.output.device).expand(g, rank, rank)
    return family.op(x, dataclasses.replace(factors, output=eye.contiguous()), None, layer.stride, layer.padding,
                     layer.dilation, layer.padding_mode, "reference")


def _capture(model: nn.Module, name: str, batch: tuple, want: str) -> Tensor:
    """The input (``want="input"``) or output of module ``name`` when ``model`` runs ``batch``; the rest of the
    forward pass is skipped."""
    with _Kept(model, [name], want, stop=True) as kept:
        model(*batch)
    if name not in kept:
        raise ValueError(f"module {name!r} did not run on the calibration batch")
    return kept[name]


def _forward_order(model: nn.Module, names: list[str], batches: list[tuple]) -> list[str]:
    """The factored layers in the order the first batch runs them (a batch the model cannot run is refused
    here, before any refit)."""
    order = []

    def hook(name):
        return lambda module, args, output: order.append(name) if name not in order else None

    device = next(model.parameters()).device
    with _ForwardHooks({name: model.get_submodule(name) for name in names}, hook):
        run_batch(model, [tuple(a.to(device) for a in batches[0])], 0)
    return order + [n for n in names if n not in order]  # layers that never ran stay last (and are refused)


def _check_pairs(compressed: nn.Module, dense: nn.Module, names: list[str]) -> None:
    dense_modules = dict(dense.named_modules())
    for name in names:
        layer, conv = compressed.get_submodule(name), dense_modules.get(name)
        if not isinstance(conv, nn.Conv2d) or tuple(conv.weight.shape) != layer.factors.weight_shape:
            raise ValueError(f"the compressed model's {name!r} ({type(layer).__name__}, weight "
                             f"{list(layer.factors.weight_shape)}) has no conv of that name and shape in the dense "
                             f"model ({type(conv).__name__ if conv is not None else 'nothing'} there): is it the "
                             "model this one was compressed from?")


def check_options(holdout: Optional[float] = None, ridges: Optional[Sequence[float]] = None,
                  relu_steps: Optional[int] = None) -> None:
    """Raise ``ValueError`` for a bad value of :func:`compensate`'s options, before any work (None: not given)."""
    if holdout is not None and (isinstance(holdout, bool) or not isinstance(holdout, (int, float))
                                or not 0 < holdout < 1):
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    if relu_steps is not None and (isinstance(relu_steps, bool) or not isinstance(relu_steps, int) or relu_steps < 0):
        raise ValueError(f"relu_steps must be an int >= 0, got {relu_steps!r}")
    if ridges is not None and (not ridges or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0
                                                 for r in ridges)):
        raise ValueError(f"ridges must be positive numbers, got {ridges!r}")


# What compress_model(..., compensate={...}) may pass on: the options check_options checks.
OPTIONS = tuple(inspect.signature(check_options).parameters)


def compensate(
    compressed: nn.Module,
    dense: nn.Module,
    calibration: Iterable,
    *,
    holdout: float = HOLDOUT,
    ridges: Sequence[float] = RIDGES,
    relu_steps: int = 0,
    fold_batchnorm: bool = False,
    inplace: bool = False,
    progress: Optional[bool] = None,
) -> tuple[nn.Module, CompensationReport]:
    """Refit every factored layer of ``compressed``, in forward order, to reproduce ``dense``'s output of the same
    conv from the input the compressed network gives it.

    Args:
        compressed: a model from :func:`cpkernels.compress_model` (its factored layers keep their convs' names).
        dense: the model it was compressed from; never modified.
        calibration: input batches (tensors, or tuples of the model's positional inputs), at least two: the last
            ``holdout`` of them (at least one) are held out to choose the ridge and to refuse a refit that does not
            generalise. Keep a photo and its mirror together (they share one batch or sit side by side at the end).
        holdout: the fraction of the batches held out, in (0, 1).
        ridges: the ridges tried, as multiples of the intermediate's mean energy per channel.
        relu_steps: 0 (the default) fits every layer to its conv's output, in one pass. Above 0, a layer whose
            conv's output only a ReLU reads (in ``dense``, on the first batch:
            :func:`cpkernels.compression.relu.convs_read_by_relu`) is fitted to the ReLU's output instead: what the
            ReLU zeroes reaches no later layer. That takes this many refits, the first toward the conv's output,
            each further one a majorise-minimise step toward the ReLU's output, each from one more pass over the
            batches (the held-out batches pick the best), and one more pass to check the last solve. On HED (README)
            ``relu_steps=3`` raised the worse of two photos in four of five plans and lowered the other a little in
            three, for four to seven times the time: not the default.
        fold_batchnorm: the dense model's BatchNorms folded into its convs first, as ``compress_model(...,
            fold_batchnorm=True)`` folded them (the targets are then the folded convs' outputs).
        inplace: refit ``compressed`` itself; by default a copy is refitted and ``compressed`` is left as it was.
        progress: a progress bar over the layers (None: only on a terminal).

    Runs under ``torch.no_grad`` in eval mode (training flags restored), one calibration batch at a time, on the
    models' device: memory is one batch's activations plus the per-layer sums. Returns the compensated model and a
    :class:`CompensationReport`.
    """
    check_options(holdout=holdout, ridges=ridges, relu_steps=relu_steps)
    if calibration is None:
        raise ValueError("compensate needs calibration: an iterable of input batches")
    batches = as_batches(calibration)
    if len(batches) < 2:
        raise ValueError(f"compensate needs at least 2 calibration batches (it holds some out to choose the ridge), "
                         f"got {len(batches)}")
    names = [n for n, m in compressed.named_modules() if isinstance(m, FactoredConv2d)]
    _check_pairs(compressed, dense, names)
    held = max(1, round(holdout * len(batches)))

    model = compressed if inplace else copy.deepcopy(compressed)
    target = batchnorm.fold_batchnorm(dense)[0] if fold_batchnorm else dense
    flags = {m: m.training for m in (*model.modules(), *dense.modules())}
    report = CompensationReport()
    try:
        model.eval()
        target.eval()
        with torch.no_grad():
            fit, check = batches[:-held], batches[-held:]
            order = _forward_order(model, names, batches)
            device = next(model.parameters()).device
            read_by_relu = convs_read_by_relu(target, {n: target.get_submodule(n) for n in names},
                                              tuple(a.to(device) for a in batches[0])) if relu_steps else set()
            for name in tqdm(order, desc="compensating", unit="layer",
                             disable=None if progress is None else not progress):
                report.rows.append(_compensate_layer(model, target, name, fit, check, ridges,
                                                     relu_steps if name in read_by_relu else 0))
    finally:
        for m, training in flags.items():
            m.training = training
    return model, report


@dataclass
class _Pass:
    """One pass over some calibration batches: the sums a refit solves from, and, for a layer read by a ReLU, the
    summed squared error after the ReLU of the factors the pass was made at, and the summed square of the target."""

    sums: _Sums
    error: float = 0.0
    norm: float = 0.0

    def relative_error(self) -> float:
        return self.error / max(self.norm, 1e-300)


def _layer_pass(model, target, name, batches, layer, w: Optional[Tensor] = None, one_sided: bool = False) -> _Pass:
    """The layer's intermediate against the dense conv's output ``y`` over ``batches``, one batch at a time.

    With ``w`` (``[A b]``, for a layer that only a ReLU reads) the pass also gives the error of ``w`` after the ReLU,
    and with ``one_sided`` the targets are the ReLU's one-sided bound at ``w``: ``y`` where ``y > 0``, else
    ``min(w z~, 0)``, since a prediction below zero there costs nothing after the ReLU. That bound's squared error
    is at least ``||relu(W z~) - relu(y)||^2`` and equals it at ``W = w``, so that a solve from these sums lowers the
    error after the ReLU (a majorise-minimise step)."""
    g, cout_g, rank = layer.factors.output.shape
    device = layer.factors.output.device
    result = _Pass(_Sums.zeros(g, cout_g, rank, device))
    for batch in batches:
        batch = tuple(a.to(device) for a in batch)  # one batch at a time on the models' device
        y = _grouped(_capture(target, name, batch, "output"), g)  # [G, Cout/G, P]
        z = _design(intermediate(layer, _capture(model, name, batch, "input")), g)  # [G, R+1, P]
        if w is not None:
            prediction = w @ z  # [G, Cout/G, R+1] @ [G, R+1, P] -> [G, Cout/G, P]
            result.error += float((prediction.clamp_min(0) - y.clamp_min(0)).pow(2).sum())
            result.norm += float(y.clamp_min(0).pow(2).sum())
            if one_sided:
                y = torch.where(y > 0, y, prediction.clamp_max(0))
        result.sums.add_grouped(z, y)
    return result


def _best_ridge(fit: _Sums, check: _Sums, w0: Tensor, ridges, bias: bool) -> Optional[tuple[float, float]]:
    """``(held-out error, ridge)`` of the ridge whose solve on ``fit`` has the least error on ``check``; None when
    every solve was singular."""
    candidates = []
    for ridge in ridges:
        try:
            held_out = check.error(fit.solve(w0, ridge, bias))
        except RuntimeError:  # torch.linalg.solve on a singular system: that ridge is too small
            continue
        if math.isfinite(held_out):
            candidates.append((held_out, ridge))
    return min(candidates) if candidates else None


def _set_output(layer: FactoredConv2d, w: Tensor) -> None:
    rank = layer.factors.output.shape[2]
    layer.factors.output.copy_(w[:, :, :rank].to(layer.factors.output.dtype))
    if layer.bias is not None:
        layer.bias.copy_(w[:, :, rank].reshape(-1).to(layer.bias.dtype))


def _compensate_layer(model, target, name, fit, check, ridges, relu_steps: int) -> dict:
    layer = model.get_submodule(name)
    output = layer.factors.output
    bias = layer.bias
    g, cout_g, rank = output.shape
    w0 = torch.cat([output.detach().to(torch.float64),
                    (torch.zeros(g, cout_g, 1, dtype=torch.float64, device=output.device) if bias is None
                     else bias.detach().to(torch.float64).reshape(g, cout_g, 1))], 2)
    # Each output channel is its own regression on the same pixels: R (+1 for the bias) unknowns against them.
    row = {"name": name, "pixels": 0, "unknowns": rank + (bias is not None), "fitted": "conv output", "ridge": None,
           "steps": 0, "refit": False, "reason": ""}
    if relu_steps:
        return _refit_through_relu(model, target, name, fit, check, ridges, relu_steps, layer, w0, row)
    fit_sums = _layer_pass(model, target, name, fit, layer).sums
    check_sums = _layer_pass(model, target, name, check, layer).sums
    every = fit_sums + check_sums
    row.update(pixels=every.pixels, error_before=every.error(w0), holdout_before=check_sums.error(w0))
    row.update(error_after=row["error_before"], holdout_after=row["holdout_before"])
    choice = _best_ridge(fit_sums, check_sums, w0, ridges, bias is not None)
    if choice is None:
        row["reason"] = "every solve was singular"
        return row
    held_out, ridge = choice
    if held_out >= row["holdout_before"]:
        row["reason"] = "it does not lower the held-out batches' error"
        return row
    w = every.solve(w0, ridge, bias is not None)
    error = every.error(w)
    if not error < row["error_before"]:  # the ridge solve cannot be worse in exact arithmetic; rounding can
        row["reason"] = "it does not lower the calibration error"
        return row
    _set_output(layer, w)
    # held-out: the error of the refit on the other batches alone, the honest measure of what it generalises
    row.update(ridge=ridge, error_after=error, holdout_after=held_out, steps=1, refit=True)
    return row


def _refit_through_relu(model, target, name, fit, check, ridges, steps: int, layer, w0: Tensor, row: dict) -> dict:
    """A layer that only a ReLU reads: the refit to the conv's output, then ``steps - 1`` majorise-minimise refits
    toward the ReLU's output, each from one more pass over the batches (:func:`_layer_pass`), fitted on ``fit``
    with the ridge chosen on ``check`` at each step. The step with the least error after the ReLU on ``check``, on
    which none was fitted, is then solved again from every batch's sums at its targets, as the plain refit is, and
    kept where one more pass finds it better than the step itself on every batch; none is kept when no step beats
    the factors it started from on ``check``."""
    bias = layer.bias is not None
    row["fitted"] = "after ReLU"
    w, ridge, best, every = w0, None, None, None
    for step in range(steps + 1):
        # the first solve fits the conv's output (the plain refit): a one-sided bound at the plan's factors would
        # anchor the targets below zero at its poor predictions, and the steps from there climb slowly
        fit_pass = _layer_pass(model, target, name, fit, layer, w, one_sided=step > 0)
        check_pass = _layer_pass(model, target, name, check, layer, w, one_sided=step > 0)
        error = (fit_pass.error + check_pass.error) / max(fit_pass.norm + check_pass.norm, 1e-300)
        held_out = check_pass.relative_error()
        if step == 0:
            row.update(pixels=fit_pass.sums.pixels + check_pass.sums.pixels, error_before=error,
                       holdout_before=held_out, error_after=error, holdout_after=held_out)
        elif best is None or held_out < best[0]:
            best = (held_out, error, w, ridge, step, every)
        if step == steps:
            break
        choice = _best_ridge(fit_pass.sums, check_pass.sums, w0, ridges, bias)
        if choice is None:
            break
        ridge = choice[1]
        w = fit_pass.sums.solve(w0, ridge, bias)
        every = fit_pass.sums + check_pass.sums  # what this step's targets give on every batch
    if best is None:
        row["reason"] = "every solve was singular"
        return row
    held_out, error, w, ridge, step, every = best
    if held_out >= row["holdout_before"]:
        row["reason"] = "it does not lower the held-out batches' error"
        return row
    w_every = every.solve(w0, ridge, bias)
    every_pass = _layer_pass(model, target, name, [*fit, *check], layer, w_every)
    if every_pass.relative_error() < error:
        w, error = w_every, every_pass.relative_error()
    if not error < row["error_before"]:
        row["reason"] = "it does not lower the calibration error"
        return row
    _set_output(layer, w)
    # held-out: the error of the step fitted on the other batches alone, the honest measure of what it generalises
    row.update(ridge=ridge, error_after=error, holdout_after=held_out, refit=True, steps=step)
    return row
