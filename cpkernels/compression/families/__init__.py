"""The decomposition families and how the model passes find them (:mod:`cpkernels.compression.families.base`
says what a family is)."""
from __future__ import annotations

from torch import nn

from cpkernels.compression.families.base import Family
from cpkernels.compression.families.cp import CP
from cpkernels.compression.families.tucker2 import TUCKER2

FAMILIES: dict[str, Family] = {family.name: family for family in (CP, TUCKER2)}
# decomposition="auto" offers every family of a kh x kw conv and keeps, per layer, the one that serves best.
DECOMPOSITIONS = (*FAMILIES, "auto")


def families_for(decomposition: str) -> tuple[Family, ...]:
    """The families a ``decomposition=`` argument names, refusing an unknown one."""
    if decomposition == "auto":
        return tuple(FAMILIES.values())
    if decomposition not in FAMILIES:
        raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}")
    return (FAMILIES[decomposition],)


def family_of_rank(rank) -> Family:
    """The family whose ranks look like ``rank`` (an int: CP; a pair: Tucker-2)."""
    for family in FAMILIES.values():
        if family.owns(rank):
            return family
    raise TypeError(f"{rank!r} is the rank of no decomposition family ({', '.join(FAMILIES)})")


def family_of_layer(layer: nn.Module) -> Family:
    for family in FAMILIES.values():
        if isinstance(layer, family.module):
            return family
    raise TypeError(f"{type(layer).__name__} is the layer of no decomposition family")


__all__ = ["DECOMPOSITIONS", "FAMILIES", "Family", "families_for", "family_of_layer", "family_of_rank"]
