"""Normalising ``nn.Conv2d``-style arguments, shared by the functional op and the module."""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

IntPair = Union[int, tuple[int, int]]
Padding = Union[str, int, tuple[int, int]]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PADDING_STRINGS = ("same", "valid")


def pair(value: IntPair, name: str) -> tuple[int, int]:
    """``3`` -> ``(3, 3)``; ``(1, 2)`` stays; anything else is an error."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        a, b = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (a, b)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (a, b)


def check_padding_arg(padding: Padding, stride: tuple[int, int]) -> None:
    """``nn.Conv2d``'s own checks on ``padding``."""
    if isinstance(padding, str):
        if padding not in PADDING_STRINGS:
            raise ValueError(f"Invalid padding string {padding!r}, should be one of {set(PADDING_STRINGS)}")
        if padding == "same" and any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions")
    elif any(p < 0 for p in pair(padding, "padding")):
        raise ValueError(f"negative padding is not supported, got {padding!r}")


def explicit_padding(
    padding: Padding, kernel_size: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding, as ``nn.Conv2d`` applies it.

    ``"same"`` puts the odd pixel of an even kernel's total padding at the bottom/right, like
    ``nn.Conv2d`` and ``F.conv2d`` do.
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        out = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = pair(padding, "padding")
    return (ph, ph, pw, pw)


def output_size(
    in_size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    (h, w), (kh, kw), (sh, sw), (pt, pb, pl, pr), (dh, dw) = in_size, kernel_size, stride, padding, dilation
    return ((h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1)


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is laid out channels-last (and not also plain contiguous)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def memory_format_of(x: Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


# The memory formats of a 4-D conv input, by the names torch gives them (``str(torch.channels_last)`` without
# ``torch.``): what a plan records in its JSON.
MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last}


def memory_format_name(memory_format) -> str:
    """``memory_format``'s name in :data:`MEMORY_FORMATS`, or a ValueError naming the two accepted."""
    for name, fmt in MEMORY_FORMATS.items():
        if memory_format is fmt:
            return name
    raise ValueError(f"memory_format must be torch.contiguous_format or torch.channels_last (a 4-D conv input's), "
                     f"got {memory_format!r}")
