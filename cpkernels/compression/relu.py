"""Which convs' outputs only a ReLU reads. Compensation fits such a layer to the ReLU's output, not to the conv's:
what the ReLU zeroes reaches no later layer, so an error there costs nothing (Zhang et al., TPAMI 2016, the
"nonlinear" asymmetric reconstruction).

The readers are seen by running the model once on an input, under a ``TorchFunctionMode`` that records every torch
function each conv's output is passed to. A static trace (``torch.fx``) would miss them in the many real networks
that do not trace, such as any whose forward checks its input's shape.
"""
from __future__ import annotations

import weakref
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from cpkernels.compression.calibration import _ForwardHooks

RELUS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_})
# What reads a tensor's metadata, not its values: no reader of its output.
_METADATA = frozenset({Tensor.size, Tensor.dim, Tensor.numel, Tensor.__len__, Tensor.is_contiguous, Tensor.stride})


def _tensors(value):
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)


class _Readers(TorchFunctionMode):
    """Records, per conv name, every torch function that a watched tensor (a conv's output) is passed to."""

    def __init__(self) -> None:
        super().__init__()
        # id -> (conv name, weak reference): a freed output's id may be taken by another tensor, which the
        # reference then tells apart, and no output is kept alive beyond the forward pass's own use of it
        self.watched: dict[int, tuple[str, weakref.ref]] = {}
        self.readers: dict[str, set] = {}

    def watch(self, name: str, output) -> None:
        for t in _tensors(output):
            self.watched[id(t)] = (name, weakref.ref(t))
            self.readers.setdefault(name, set())

    def name_of(self, t: Tensor) -> Optional[str]:
        entry = self.watched.get(id(t))
        return entry[0] if entry is not None and entry[1]() is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _METADATA and getattr(func, "__name__", "") != "__get__":  # .shape, .dtype, ... read no values
            for t in _tensors((args, kwargs)):
                name = self.name_of(t)
                if name is not None:
                    self.readers[name].add(func)
        out = func(*args, **kwargs)
        if func in RELUS and self.name_of(out) is not None:  # in place: what reads it now reads the ReLU's output
            del self.watched[id(out)]
        return out


def convs_read_by_relu(model: nn.Module, convs: Mapping[str, nn.Module], batch: tuple) -> set[str]:
    """The names among ``convs`` (``{name: module of model}``) whose every output, when ``model`` runs ``batch``
    (a tuple of its positional inputs), is read by a ReLU and by nothing else (``nn.ReLU``, ``F.relu``,
    ``torch.relu``, ``.relu()``, in place or not; an ``nn.Identity`` between them passes the same tensor on).
    A conv that did not run is not among them. Runs under ``torch.no_grad``; the model's state is not changed."""
    recorder = _Readers()

    def hook(name):
        return lambda module, args, output: recorder.watch(name, output)

    with torch.no_grad(), _ForwardHooks(convs, hook), recorder:
        model(*batch)
    return {name for name, readers in recorder.readers.items() if readers and readers <= RELUS}
