"""The decomposition families and how the model passes find them (:mod:`cpkernels.compression.families.base`
says what a family is)."""
from __future__ import annotations

from types import SimpleNamespace

from torch import nn

from cpkernels.compression.families.base import Family
from cpkernels.compression.families.cp import CP
from cpkernels.compression.families.svd import SVD
from cpkernels.compression.families.tucker2 import TUCKER2

FAMILIES: dict[str, Family] = {family.name: family for family in (CP, TUCKER2, SVD)}
# decomposition="auto" offers every family that applies to a conv (CP and Tucker-2 on a kh x kw conv, the SVD
# on a 1x1 conv) and keeps, per layer, the one that serves best.
DECOMPOSITIONS = (*FAMILIES, "auto")


def families_for(decomposition: str) -> tuple[Family, ...]:
    """The families a ``decomposition=`` argument names, refusing an unknown one."""
    if decomposition == "auto":
        return tuple(FAMILIES.values())
    if decomposition not in FAMILIES:
        raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}")
    return (FAMILIES[decomposition],)


def applicable(families, conv: nn.Module) -> tuple[Family, ...]:
    """Those of ``families`` that factor ``conv``."""
    return tuple(f for f in families if f.applies_to(conv))


def not_applicable_reason(families, conv: nn.Module) -> str:
    """Why none of ``families`` factors ``conv``, and which family would."""
    kh, kw = conv.kernel_size
    others = [f.name for f in FAMILIES.values() if f.applies_to(conv)]
    named = "' or '".join(f.name for f in families)
    return (f"{kh}x{kw} conv: decomposition='{named}' does not factor it"
            + (f" ({others[0]!r} or 'auto' does)" if others else ""))


def family_for(conv: nn.Module, rank) -> Family:
    """The family of ``rank`` on ``conv`` (anything with ``kernel_size``): an int is the SVD family's on a 1x1
    conv and CP's on a kh x kw conv; a pair is Tucker-2's."""
    for family in FAMILIES.values():
        if family.applies_to(conv) and family.owns(rank):
            return family
    kh, kw = conv.kernel_size
    raise TypeError(f"{rank!r} is the rank of no decomposition family of a {kh}x{kw} conv "
                    f"({', '.join(f.name for f in applicable(FAMILIES.values(), conv))})")


def family_of_rank(rank) -> Family:
    """The family of ``rank`` on a kh x kw conv (an int: CP; a pair: Tucker-2), for callers that hold a rank and
    no conv (the benchmarks). The package asks :func:`family_for`: an int rank on a 1x1 conv is the SVD's."""
    return family_for(_KH_X_KW, rank)


_KH_X_KW = SimpleNamespace(kernel_size=(3, 3))  # what family_of_rank assumes


def family_of_layer(layer: nn.Module) -> Family:
    for family in FAMILIES.values():
        if isinstance(layer, family.module):
            return family
    raise TypeError(f"{type(layer).__name__} is the layer of no decomposition family")


def family_named(name: str) -> Family:
    """The family a plan row or a report row records by name."""
    return FAMILIES[name]


__all__ = ["DECOMPOSITIONS", "FAMILIES", "Family", "applicable", "families_for", "family_for", "family_named",
           "family_of_layer", "family_of_rank", "not_applicable_reason"]
