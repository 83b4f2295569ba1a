"""The walk over a model's convs that every model pass shares: their names (a shared conv has several), the
input size each one sees, which ones a user's filters leave dense and why, and replacing one under every name."""
from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from cpkernels.core.cost import ConvShape


def names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every submodule, shared ones included, keyed by module id."""
    names: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    return names


def convs_of(model: nn.Module) -> Iterator[tuple[str, nn.Conv2d, list[str]]]:
    """``(first name, conv, every name)`` of each distinct ``nn.Conv2d`` (subclasses included), in
    ``named_modules`` order."""
    for names in names_by_module(model).values():
        module = model.get_submodule(names[0])
        if isinstance(module, nn.Conv2d):
            yield names[0], module, names


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_everywhere(model: nn.Module, names: Sequence[str], module: nn.Module) -> None:
    """Put ``module`` under every name of a (possibly shared) conv: it is decomposed once."""
    for name in names:
        set_submodule(model, name, module)


def conv_input_sizes(model: nn.Module, input_size=None, example_inputs=None) -> dict[int, tuple[int, int]]:
    """The (H, W) each conv sees, keyed by module id, from one forward pass on ``example_inputs`` or, failing
    those, on zeros of ``input_size`` in the model's device and dtype; empty when neither is given."""
    if example_inputs is None and input_size is not None:
        ref = next(model.parameters(), None)
        example_inputs = (torch.zeros(tuple(input_size), device=None if ref is None else ref.device,
                                      dtype=None if ref is None else ref.dtype),)
    if example_inputs is None:
        return {}
    sizes: dict[int, tuple[int, int]] = {}

    def record(module, args):  # returns None: a pre-hook's return value would replace the input
        sizes.setdefault(id(module), tuple(args[0].shape[-2:]))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with eval_mode(model), torch.no_grad():
            model(*tuple(example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return sizes


@contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode within the block, each module's own flag put back after it: a probe's or a timing's
    forward pass must not update a BatchNorm's running statistics or draw dropout masks."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def conv_shape(conv: nn.Conv2d, in_hw: Optional[tuple[int, int]]) -> Optional[ConvShape]:
    """The conv's call on one ``in_hw`` image, or None when the input size is unknown."""
    return None if in_hw is None else ConvShape.of_conv(conv, in_hw)


def filter_reason(name: str, conv: nn.Module, include: Optional[Sequence[str]], exclude: Optional[Sequence[str]],
                  predicate: Optional[Callable[[str, nn.Module], bool]], min_channels: int,
                  first: bool) -> Optional[str]:
    """Why the user's filters leave this conv dense, or None when they let it through. What no family can
    factor is refused here too: a conv that is not exactly ``nn.Conv2d``, a depthwise conv. (Which family
    factors a conv the passes ask the families: a 1x1 conv is the SVD family's.)"""
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
    if min(conv.in_channels, conv.out_channels) < min_channels:
        return f"fewer than min_channels={min_channels} channels"
    return None
