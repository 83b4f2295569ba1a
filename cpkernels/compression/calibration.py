"""What calibration batches tell about a network's convs: their inputs' channel second moments, and how
much the network's output moves per unit of error in each conv's output.

    stats = input_statistics(model, batches, convs)            # {conv name: InputStatistics}
    s = shrink(stats["features.3"].covariance, 0.5)            # toward the weight-only objective
    factors = decompose_conv(conv.weight, rank, input_covariance=s)

Both run the model in eval mode under ``torch.no_grad`` with forward hooks that are always removed,
and restore its training flag: the model is left as it was. The forward-hook helpers they run on
(``_ForwardHooks``, ``EvalHooks``, ``_Kept``) and the batch check (:func:`batch_args`) serve the other compression
modules too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from cpkernels.compression.convs import eval_mode


@dataclass
class InputStatistics:
    """Of one conv's input over the calibration batches: ``covariance`` ``(Cin, Cin)`` float64 second
    moments per pixel (not centred: a conv has no mean to subtract), and ``pixels`` counted."""

    covariance: Tensor
    pixels: int


def batch_args(batch, k: int, what: str = "calibration batch") -> tuple:
    """Batch ``k`` as the model's positional arguments: a tensor, or a tuple (or list) of them; anything else is a
    TypeError that names it as ``what`` and ``k``."""
    args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise TypeError(f"{what} {k} must be a tensor or a tuple of tensors, got {type(batch).__name__}")
    return args


def as_batches(calibration: Iterable, input_shape: Optional[Sequence[int]] = None) -> list[tuple]:
    """The calibration batches as argument tuples, checked before any work: at least one, every batch a
    tensor (or a tuple of them) whose shape matches the first's in all but the batch dimension, and whose
    first input has ``input_shape``'s channels where that is given. Only the channels: the statistics
    gathered are per channel, so a fully convolutional network planned for 416x640 may be calibrated on
    smaller crops (a network that cannot run them says so when it is run)."""
    if calibration is None:
        raise ValueError("method='data' needs calibration: an iterable of input batches")
    if isinstance(calibration, (Tensor, tuple)):
        raise TypeError("calibration must be an iterable of batches (e.g. a list or a DataLoader), "
                        f"got a single {type(calibration).__name__}: wrap it in a list")
    batches = []
    for k, batch in enumerate(calibration):
        args = batch_args(batch, k)
        got = [tuple(a.shape[1:]) for a in args]
        if batches and got != [tuple(a.shape[1:]) for a in batches[0]]:
            raise ValueError(f"calibration batch {k} has shape {[tuple(a.shape) for a in args]}, expected "
                             f"[N, {', '.join(map(str, batches[0][0].shape[1:]))}] like the other batches")
        if input_shape is not None and tuple(args[0].shape[1:2]) != tuple(input_shape[1:2]):
            raise ValueError(f"calibration batch {k} has shape {tuple(args[0].shape)}, expected "
                             f"[N, {input_shape[1]}, ...]: the {input_shape[1]} channels of the input size "
                             f"{tuple(input_shape)}")
        batches.append(args)
    if not batches:
        raise ValueError("calibration is empty: give at least one input batch")
    return batches


def run_batch(model: nn.Module, batches: Sequence[tuple], k: int):
    """``model`` on calibration batch ``k``; a batch it cannot run is a ValueError that says which and why."""
    try:
        return model(*batches[k])
    except RuntimeError as error:
        raise ValueError(f"the model cannot run calibration batch {k} of shape "
                         f"{[tuple(a.shape) for a in batches[k]]}: {error}") from error


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward pass is not run, and the
    :class:`_ForwardHooks` block around it ends quietly."""


class _ForwardHooks:
    """Forward hooks ``hook(name)`` on ``modules`` (``{name: module}``) for the length of a ``with`` block, always
    removed after it; a hook that raises :class:`_Stop` ends the forward pass and the block, quietly. The model's
    training flags and the grad mode are left alone."""

    def __init__(self, modules: Mapping[str, nn.Module], hook) -> None:
        self.modules, self.hook = modules, hook

    def __enter__(self):
        self.handles = [m.register_forward_hook(self.hook(name)) for name, m in self.modules.items()]
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        for h in self.handles:
            h.remove()
        return exc_type is _Stop


class EvalHooks(_ForwardHooks):
    """Forward hooks on ``modules`` for the length of a ``with`` block, in eval mode without grad; every
    submodule's training flag and the grad mode are restored after it."""

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module], hook) -> None:
        super().__init__(modules, hook)
        self.model = model

    def __enter__(self):
        self.modes = eval_mode(self.model)  # each module's own flag comes back after the block
        self.modes.__enter__()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        return super().__enter__()

    def __exit__(self, exc_type, *exc) -> bool:
        stopped = super().__exit__(exc_type, *exc)
        self.no_grad.__exit__(exc_type, *exc)
        self.modes.__exit__(exc_type, *exc)
        return stopped


class _Kept(_ForwardHooks):
    """``with _Kept(model, names) as kept``: ``kept[name]`` is the output of ``model``'s submodule ``name`` (its first
    positional input with ``want="input"``) in the last forward pass inside the block, detached with ``detach``.
    ``stop``: the forward pass ends once a value is kept (the rest of the network is not run). Otherwise the value is
    kept as a copy (differentiable unless detached): an op later in the pass may work in place on the module's
    output (an in-place ReLU, as torchvision's VGG and ResNet have) and must not change what was kept. The model's
    training flags and the grad mode are left alone."""

    def __init__(self, model: nn.Module, names: Iterable[str], want: str = "output", detach: bool = False,
                 stop: bool = False) -> None:
        self.kept: dict[str, Tensor] = {}

        def hook(name):
            def keep(module, args, output):
                value = args[0] if want == "input" else output
                value = value.detach() if detach else value
                if stop:
                    self.kept[name] = value
                    raise _Stop
                self.kept[name] = value.clone()
            return keep

        super().__init__({name: model.get_submodule(name) for name in names}, hook)

    def __enter__(self) -> dict[str, Tensor]:
        super().__enter__()
        return self.kept


def input_statistics(model: nn.Module, batches: Sequence[tuple], convs: Mapping[str, nn.Conv2d]) -> dict:
    """``{name: InputStatistics}`` of each conv in ``convs`` over ``batches`` (from :func:`as_batches`)."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach()
            flat = x.transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)  # [Cin, N*H*W]
            sums[name] = sums.get(name, 0) + flat @ flat.T
            counts[name] = counts.get(name, 0) + flat.shape[1]
        return record

    with EvalHooks(model, convs, hook):
        for k in range(len(batches)):
            run_batch(model, batches, k)
    return {name: InputStatistics(sums[name] / counts[name], counts[name]) for name in sums}


def shrink(covariance: Tensor, shrinkage: float) -> Tensor:
    """``(1 - a) S / mean(diag S) + a I``: a sample covariance pulled toward the identity, which is the
    weight-only objective. ``a = 1`` ignores the data, ``a = 0`` trusts it fully; a few images'
    statistics overfit (a decomposition whitened on one photo did worse on another than plain CP)."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    scale = float(torch.diagonal(covariance).mean())
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    if scale <= 0.0:
        return eye
    return (1.0 - shrinkage) * covariance / scale + shrinkage * eye


def output_sensitivity(model: nn.Module, batches: Sequence[tuple], convs: Mapping[str, nn.Conv2d],
                       relative_noise: float = 0.05, seed: int = 0) -> dict[str, float]:
    """``{name: d}``: the network output's relative change per unit of relative error added to one
    conv's output (Gaussian, ``relative_noise`` of its norm), on the first calibration batch. One
    forward per conv: a first-order weight for how much each layer's error matters downstream (a
    conv feeding a pooling head matters less than one whose error the next layers amplify)."""
    def flat(out):
        return out if isinstance(out, Tensor) else torch.cat([t.flatten() for t in out if isinstance(t, Tensor)])

    target: dict[str, Optional[str]] = {"name": None}
    gen = torch.Generator().manual_seed(seed)

    def hook(name):
        def perturb(module, args, output):
            if target["name"] != name:
                return None
            noise = torch.randn(output.shape, generator=gen, dtype=torch.float32).to(output)
            return output + noise * (relative_noise * output.norm() / noise.norm().clamp_min(1e-30))
        return perturb

    sensitivity = {}
    with EvalHooks(model, convs, hook):
        clean = flat(run_batch(model, batches, 0)).double()
        for name in convs:
            target["name"] = name
            moved = flat(run_batch(model, batches, 0)).double()
            sensitivity[name] = float((moved - clean).norm() / clean.norm().clamp_min(1e-30)) / relative_noise
    return sensitivity
