"""``FactoredConv2d``: what every factored conv layer shares with ``nn.Conv2d``."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from cpkernels.core import conv_args
from cpkernels.ops.frontend import BACKENDS


class FactoredConv2d(nn.Module):
    """What every factored conv shares with ``nn.Conv2d``: its arguments and attributes, the bias, the
    backend switch, ``to_conv2d``, ``extra_repr`` and the checks of ``from_conv``. Subclasses hold the
    factors and define ``factors``, ``forward`` and ``to_dense_weight``."""

    __constants__ = ["stride", "padding", "dilation", "groups", "padding_mode", "in_channels", "out_channels",
                     "kernel_size", "rank"]

    def _init_conv(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                   backend) -> tuple[int, int, int, int]:
        """``nn.Conv2d``'s checks and attributes; returns the dense weight's shape."""
        if groups <= 0:
            raise ValueError("groups must be a positive integer")
        if in_channels % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        if out_channels % groups != 0:
            raise ValueError("out_channels must be divisible by groups")
        kernel_size_ = conv_args.pair(kernel_size, "kernel_size")
        stride_ = conv_args.pair(stride, "stride")
        dilation_ = conv_args.pair(dilation, "dilation")
        conv_args.check_padding_arg(padding, stride_)
        if padding_mode not in conv_args.PADDING_MODES:
            raise ValueError(
                f"padding_mode must be one of {list(conv_args.PADDING_MODES)}, but got padding_mode='{padding_mode}'"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size_
        self.stride = stride_
        self.padding = padding if isinstance(padding, str) else conv_args.pair(padding, "padding")
        self.dilation = dilation_
        self.groups = groups
        self.padding_mode = padding_mode
        self.backend = backend
        return (out_channels, in_channels // groups, *kernel_size_)

    def _init_bias(self, bias: bool, device, dtype) -> None:
        """Registered after the factors, as ``nn.Conv2d`` registers it after its weight."""
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    @property
    def _fan_in(self) -> int:
        return (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]

    def _reset_bias(self) -> None:
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self._fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def _check_conv(cls, conv: nn.Module) -> None:
        if type(conv) is not nn.Conv2d:
            kind = type(conv).__name__
            if isinstance(conv, nn.modules.lazy.LazyModuleMixin):
                reason = "a lazy conv has no weight yet; run a forward pass first, then copy it into an nn.Conv2d"
            elif isinstance(conv, nn.modules.conv._ConvTransposeNd):
                reason = "transposed convolutions are not supported"
            elif isinstance(conv, nn.Conv2d):
                reason = "subclasses may change forward(), which a factored form cannot reproduce"
            else:
                reason = "only nn.Conv2d is supported"
            raise TypeError(f"{cls.__name__}.from_conv expects exactly nn.Conv2d, got {kind}: {reason}")

    @classmethod
    def from_factors(
        cls,
        factors,
        bias: Optional[Tensor] = None,
        stride: conv_args.IntPair = 1,
        padding: conv_args.Padding = 0,
        dilation: conv_args.IntPair = 1,
        padding_mode: str = "zeros",
        backend: str = "auto",
    ) -> "FactoredConv2d":
        """A layer of this class holding copies of ``factors`` (:class:`CPFactors` or :class:`Tucker2Factors`,
        as the class takes) and ``bias``."""
        module = cls(
            factors.in_channels, factors.out_channels, factors.kernel_size, factors.rank,
            stride=stride, padding=padding, dilation=dilation, groups=factors.groups,
            bias=bias is not None, padding_mode=padding_mode,
            device=factors.device, dtype=factors.dtype, backend=backend,
        )
        with torch.no_grad():
            for param, value in zip(module.factors.as_tuple(), factors.as_tuple()):
                param.copy_(value)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def to_dense_weight(self) -> Tensor:
        """The effective weight ``[Cout, Cin/G, kh, kw]`` (differentiable w.r.t. the factors)."""
        return self.factors.to_dense()

    def to_conv2d(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function, on the same device and dtype."""
        ref = self.factors.output
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, bias=self.bias is not None,
            padding_mode=self.padding_mode, device=ref.device, dtype=ref.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.to_dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        s = "{in_channels}, {out_channels}, kernel_size={kernel_size}, rank={rank}, stride={stride}"
        if self.padding != (0,) * len(self.kernel_size):
            s += ", padding={padding}"
        if self.dilation != (1,) * len(self.dilation):
            s += ", dilation={dilation}"
        if self.groups != 1:
            s += ", groups={groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += ", padding_mode={padding_mode}"
        if self.backend != "auto":
            s += ", backend={backend}"
        return s.format(**self.__dict__, backend=self.backend)
