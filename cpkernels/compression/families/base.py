"""What a decomposition family is to the model passes: one object that knows its ranks, its costs, its layer
and its planning ladder, so that ``compress_model``, ``plan_ranks``, the report, the profiler and export ask the
family and never tell families apart by the type of a rank. A new family is one module beside this one that
subclasses :class:`Family`, plus a line in :data:`cpkernels.compression.families.FAMILIES`."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import nn

from cpkernels.core.cost import ConvShape

# A rung of a planning ladder: (cost, relative error, rank, factors).
Rung = tuple


class Family:
    """One decomposition family. Subclasses set the class attributes and implement the methods that raise."""

    name: str  # as ``decomposition=`` names it, and as the report and the plan JSON record it
    module: type  # its nn.Module: ``from_conv``, ``from_factors`` and ``nn.Conv2d``'s constructor arguments
    # its functional op, ``op(x, factors, bias, stride, padding, dilation, padding_mode, backend)``; every family's
    # factors end in ``output (G, Cout/G, R)``, a 1x1 conv of the rank-R intermediate (compensation refits it)
    op: Callable
    factors: type  # its factors class (a :class:`cpkernels.factors.FactoredWeight`)
    gpu_strategies: dict  # the GPU plan's strategies for it (:mod:`cpkernels.dispatch.gpu`)
    decompose_options: Optional[tuple[str, ...]] = None  # the decompose_kwargs it takes; None: all of them
    onnx_forms: tuple[str, ...] = ("merged", "dense")  # the forms export_onnx may write it in (export.forms)

    # --- ranks -------------------------------------------------------------------------------------------
    def applies_to(self, conv: nn.Module) -> bool:
        """Whether this family factors ``conv`` (anything with ``kernel_size``): by default every kh x kw conv
        with kh*kw > 1; a 1x1 conv is the SVD family's."""
        kh, kw = conv.kernel_size
        return kh * kw > 1

    def owns(self, rank) -> bool:
        """Whether ``rank`` (as a plan, a report or JSON holds it) is one of this family's ranks."""
        raise NotImplementedError

    def normalise(self, rank):
        """A rank as JSON kept it, back in this family's type."""
        return rank

    def rank_text(self, rank) -> str:
        return str(rank)

    def resolve(self, policy, conv: nn.Conv2d):
        """A rank policy (an int, a fraction of the parameters, or the family's own rank) for ``conv``."""
        raise NotImplementedError

    def round_up(self, rank, conv: nn.Conv2d, multiple: int):
        """``rank`` rounded up to a multiple of ``multiple`` (within what the layer can hold)."""
        raise NotImplementedError

    # --- costs -------------------------------------------------------------------------------------------
    def macs(self, shape: ConvShape, rank) -> int:
        raise NotImplementedError

    def params(self, conv: nn.Conv2d, rank) -> int:
        raise NotImplementedError

    def fused_macs(self, shape: ConvShape, rank) -> int:
        """The MACs the fused kernel issues for this family's layer (the profiler's roofline)."""
        raise NotImplementedError

    # --- layers ------------------------------------------------------------------------------------------
    def options(self, decompose_kwargs: dict) -> dict:
        """The decompose_kwargs this family's decomposition takes."""
        if self.decompose_options is None:
            return dict(decompose_kwargs)
        return {k: v for k, v in decompose_kwargs.items() if k in self.decompose_options}

    def layer(self, conv: nn.Conv2d, rank, target_error: Optional[float], multiple: int, backend: str,
              decompose_kwargs: dict) -> nn.Module:
        """``conv`` decomposed at ``rank`` (or for ``target_error``), its rank rounded up to ``multiple``."""
        options = self.options(decompose_kwargs)
        layer = self.module.from_conv(conv, rank, target_error=target_error, backend=backend, **options)
        rounded = self.round_up(layer.rank, conv, multiple)
        if rounded != layer.rank:  # a rank found for target_error, rounded up: decomposed again
            layer = self.module.from_conv(conv, rounded, backend=backend, **options)
        return layer

    def from_factors(self, factors, conv: nn.Conv2d, backend: str) -> nn.Module:
        """A layer of ``factors`` with ``conv``'s bias and arguments."""
        return self.module.from_factors(factors.to(device=conv.weight.device, dtype=conv.weight.dtype),
                                        None if conv.bias is None else conv.bias.detach(), conv.stride,
                                        conv.padding, conv.dilation, conv.padding_mode, backend)

    def empty_layer(self, conv: nn.Conv2d, rank) -> nn.Module:
        """A layer of this rank with ``conv``'s arguments, device and dtype, its factors freshly initialised."""
        p = conv.weight
        return self.module(conv.in_channels, conv.out_channels, conv.kernel_size, rank, conv.stride, conv.padding,
                           conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, p.device, p.dtype)

    def diagnostics(self, factors) -> dict:
        """The report's ``degeneracy`` and ``cancellation`` of these factors (None where they mean nothing)."""
        return {"degeneracy": None, "cancellation": None}

    # --- planning ----------------------------------------------------------------------------------------
    def ladder(self, conv: nn.Conv2d, dense: float, cost: Callable, multiple: int, fractions: Sequence[float],
               max_rank: float) -> list:
        """Distinct candidate ranks, largest first, each within a fraction of the dense cost and cheaper than it."""
        raise NotImplementedError

    def rungs(self, weight, groups: int, ranks: list, cost: Callable, dense: float, multiple: int,
              options: dict) -> list[Rung]:
        """A rung per candidate rank of ``weight`` (the target, whitened or not), each decomposition starting
        from the one above."""
        raise NotImplementedError

    def at_rank(self, weight, rank, groups: int, options: dict):
        """The factors of ``weight`` at ``rank``, from a cold start."""
        raise NotImplementedError

    def vbmf_estimate(self, conv: nn.Conv2d):
        """The older tools' data-free rank estimate of ``conv``."""
        raise NotImplementedError

    def scaled(self, estimate, k: float, conv: nn.Conv2d, multiple: int):
        """A VBMF ``estimate`` times ``k``, rounded up to ``multiple`` (within what the layer can hold)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<decomposition family {self.name!r}>"


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
