"""Fine-tuning a compressed network without labels: it learns to reproduce the dense network's outputs.

    report = distill(compressed, dense, batches, steps=200, lr=1e-4)            # outputs only
    report = distill(compressed, dense, batches, epochs=3, per_layer=True)      # and every factored layer's output

The dense network (the teacher) gives the targets; only unlabelled inputs are needed, such as the calibration
images the ranks were planned on. A factored layer keeps the name of the conv it replaced
(:func:`cpkernels.compress_model`), which is how ``per_layer`` pairs them.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from cpkernels.compression.calibration import _Kept, batch_args
from cpkernels.modules.factored import FactoredConv2d

LOSSES = ("mse", "kl")


@dataclass
class DistillReport:
    """What :func:`distill` did: ``losses`` per step (the objective, before that step's update), the steps
    taken and the seconds they took."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        return self.losses[-1]


def _inner(model: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel (or DataParallel) wraps, else the model itself."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _output(out) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"distill needs models that return one tensor, got {type(out).__name__}")
    return out


def _output_loss(student_out: Tensor, teacher_out: Tensor, loss: str, temperature: float) -> Tensor:
    # In float32 whatever autocast ran the forward passes in: a half-precision sum of squares loses the small
    # differences that distillation works on.
    s, t = student_out.float(), teacher_out.float()
    if loss == "kl":  # logits over dim 1, the softened targets of Hinton et al., scaled by T^2 to keep its gradient
        return F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), log_target=True,
                        reduction="batchmean") * temperature ** 2
    return relative_mse(s, t)


def relative_mse(output: Tensor, target: Tensor) -> Tensor:
    """The mean squared error over the target's mean square: free of the output's scale, so that one learning
    rate suits any network and layers of any magnitude weigh alike."""
    return F.mse_loss(output.float(), target.float()) / target.float().pow(2).mean().clamp_min(1e-30)


def _check_arguments(steps, epochs, lr, loss, temperature, l2_reg, layer_weight) -> None:
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps or epochs")
    for name, value in (("steps", steps), ("epochs", epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"Invalid learning rate: {lr}")  # torch.optim's wording
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    for name, value in (("temperature", temperature), ("l2_reg", l2_reg), ("layer_weight", layer_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                name == "temperature" and value == 0):
            raise ValueError(f"{name} must be a number {'> 0' if name == 'temperature' else '>= 0'}, got {value!r}")


def _factored_layers(student: nn.Module, teacher: nn.Module) -> list[str]:
    """The student's factored layers, each checked against the teacher's module of the same name."""
    names = [name for name, m in student.named_modules() if isinstance(m, FactoredConv2d)]
    teacher_modules = dict(teacher.named_modules())
    for name in names:
        dense = teacher_modules.get(name)
        layer = student.get_submodule(name)
        if not isinstance(dense, nn.Conv2d) or dense.out_channels != layer.out_channels:
            raise ValueError(f"per_layer: the student's {name!r} ({type(layer).__name__}, {layer.out_channels} "
                             f"output channels) has no conv of the same name and width in the teacher "
                             f"({type(dense).__name__ if dense is not None else 'nothing'} there)")
    return names


def _batches(batches: Iterable, steps: Optional[int], epochs: Optional[int]):
    """``(k, batch)`` for every step: ``epochs`` passes over ``batches``, or ``steps`` batches, starting over as often
    as needed."""
    passes = range(epochs) if epochs is not None else itertools.count()
    k = 0
    for _ in passes:
        empty = True
        for batch in batches:
            empty = False
            yield k, batch
            k += 1
            if steps is not None and k == steps:
                return
        if empty:
            raise ValueError("batches is empty: give at least one input batch")


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    *,
    steps: Optional[int] = None,
    epochs: Optional[int] = None,
    lr: float = 1e-4,
    loss: str = "mse",
    temperature: float = 1.0,
    per_layer: bool = False,
    layer_weight: float = 1.0,
    l2_reg: float = 0.0,
    optimizer: Optional[torch.optim.Optimizer] = None,
    progress: Optional[bool] = None,
) -> DistillReport:
    """Train ``student`` (a compressed model) to reproduce ``teacher``'s outputs on unlabelled ``batches``.

    Args:
        student: the model to train, in the mode it is in (``student.train()`` first to update BatchNorm statistics
            and run dropout; in eval mode they stay fixed, which suits a few calibration images). It may be wrapped
            in ``DistributedDataParallel``: each process then passes its own share of the data.
        teacher: the dense model; it runs in eval mode under ``torch.no_grad`` and is left exactly as it was (its
            parameters, buffers and training flags).
        batches: a re-iterable of input batches (a list, a DataLoader), each a tensor or a tuple of the models'
            positional inputs; they are moved to the student's device and never modified.
        steps / epochs: how long, exactly one of them: ``steps`` batches (starting over at the end of
            ``batches``), or ``epochs`` passes.
        lr: Adam's learning rate (ignored when ``optimizer`` is given).
        loss: ``"mse"``: the squared error over the teacher output's mean square (:func:`relative_mse`);
            ``"kl"``: for logits, the KL divergence of the student's softened class distribution (dim 1) from the
            teacher's, at ``temperature``, times ``temperature**2``.
        per_layer: also match the output of every factored layer to the teacher's conv of the same name (the
            relative squared error, each weighted by ``layer_weight``). A model compressed with
            ``fold_batchnorm=True`` is matched against a teacher folded the same way
            (:func:`cpkernels.compression.batchnorm.fold_batchnorm`).
        l2_reg: a penalty ``l2_reg * sum ||factor||^2`` over the factored layers' factors (not their biases): the
            guard against CP degeneracy, where rank-one terms grow large and cancel (as ``l2_reg`` in the
            decompositions).
        optimizer: an optimizer over the student's parameters, instead of Adam.
        progress: a progress bar over the steps (None: only on a terminal).

    Autocast: call it inside ``torch.autocast(...)`` and both forward passes run under it; the losses are computed
    in float32. Returns a :class:`DistillReport`.
    """
    _check_arguments(steps, epochs, lr, loss, temperature, l2_reg, layer_weight)
    if iter(batches) is batches:
        raise TypeError("batches must be re-iterable (a list or a DataLoader), not a one-shot iterator: "
                        "distill passes over it more than once")
    inner = _inner(student)
    teacher = _inner(teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    if optimizer is None and not params:
        raise ValueError("the student has no parameter that requires grad")
    layers = _factored_layers(inner, teacher) if per_layer or l2_reg > 0 else []
    names = layers if per_layer else []
    factors = [p for name in layers if l2_reg > 0
               for pname, p in inner.get_submodule(name).named_parameters() if pname != "bias"]
    device = next(iter(params or student.parameters())).device

    flags = {m: m.training for m in teacher.modules()}
    student_flags = {m: m.training for m in student.modules()}
    teacher.eval()
    try:
        first = next(iter(batches), None)
        if first is None:
            raise ValueError("batches is empty: give at least one input batch")
        student.eval()  # the check must not move BatchNorm statistics: no update before the first step
        with torch.no_grad():  # outputs that do not match are refused before any update
            first = tuple(a.to(device) for a in batch_args(first, 0, "batch"))
            s, t = _output(student(*first)), _output(teacher(*first))
        for m, training in student_flags.items():
            m.training = training
        if s.shape != t.shape:
            raise ValueError(f"the teacher's output has shape {tuple(t.shape)} but the student's has {tuple(s.shape)} "
                             "on the first batch: distill needs outputs of one shape")
        optimizer = optimizer or torch.optim.Adam(params, lr=lr)
        report = DistillReport()
        start = time.perf_counter()
        bar = tqdm(total=steps, desc="distilling", unit="step", disable=None if progress is None else not progress)
        with bar:
            for k, batch in _batches(batches, steps, epochs):
                args = tuple(a.to(device) for a in batch_args(batch, k, "batch"))
                with torch.no_grad(), _Kept(teacher, names, detach=True) as targets:
                    t = teacher(*args)
                with _Kept(inner, names) as outputs:
                    s = _output(student(*args))
                objective = _output_loss(s, t, loss, temperature)
                for name in names:
                    objective = objective + layer_weight * relative_mse(outputs[name], targets[name])
                if factors:
                    objective = objective + l2_reg * sum(p.float().pow(2).sum() for p in factors)
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                report.losses.append(float(objective.detach()))
                report.steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{report.losses[-1]:.3g}")
        report.seconds = time.perf_counter() - start
    finally:
        for m, training in (*flags.items(), *student_flags.items()):
            m.training = training
    return report
