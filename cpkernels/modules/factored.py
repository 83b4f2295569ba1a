"""``FactoredConv2d``: what every factored conv layer shares with ``nn.Conv2d``."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from cpkernels.core import conv_args
from cpkernels.ops.frontend import BACKENDS, CALL_ARGUMENTS, FactoredOp, layer_conv2d


class FactoredConv2d(nn.Module):
    """What every factored conv shares with ``nn.Conv2d``: its constructor arguments and attributes, the bias,
    the backend switch, ``forward``, ``from_conv``, ``from_factors``, ``to_conv2d`` and ``extra_repr``. A subclass
    names its op (``op``), rank policy (``resolve_rank``), its decomposition (``decompose``) and the shapes of its
    factor parameters (``factor_shapes``, named as the op's arguments), and defines ``factors`` and
    ``reset_parameters``.

    ``forward`` memoises its argument checks, backend, CPU plan and settled GPU plan per call signature
    (:func:`cpkernels.ops.frontend.layer_conv2d`), keyed by the identity of the parameter tensors among the rest.
    Where a tensor changes in place of the same object the memo is cleared: ``.to()``, ``.double()``, ``.cuda()``
    and the rest of ``_apply``, ``load_state_dict`` (its ``assign=True`` and tensor swaps included), and
    assigning or registering a parameter, and assigning a conv argument (``stride``, ``padding``, ``dilation``,
    ``padding_mode``) or ``backend``. In-place updates of values (an optimizer step) change nothing it
    memoises. Not seen: assigning a parameter's ``.data`` a tensor of another shape, dtype or device (assign a
    new ``nn.Parameter``, or call ``.to()``, instead)."""

    __constants__ = ["stride", "padding", "dilation", "groups", "padding_mode", "in_channels", "out_channels",
                     "kernel_size", "rank"]
    op: FactoredOp  # the family's op (cpkernels.ops.frontend.FactoredOp)
    resolve_rank: Callable  # (rank policy, dense weight shape, groups) -> the rank
    decompose: Callable  # (weight, rank, *, groups, target_error, **kwargs) -> factors

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: conv_args.IntPair,
        rank,
        stride: conv_args.IntPair = 1,
        padding: conv_args.Padding = 0,
        dilation: conv_args.IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self._call_memo: dict = {}  # call signature -> what its checks and plan came to (layer_conv2d)
        weight_shape = self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                       padding_mode, backend)
        self.rank = type(self).resolve_rank(rank, weight_shape, groups)
        for name, shape in self.factor_shapes().items():  # registered in this order, the bias after them
            self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self._init_bias(bias, device, dtype)
        self.reset_parameters()

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The factor parameters' names and shapes at ``self.rank``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return layer_conv2d(self.op, self._call_memo, x, self._parameters, lambda: self.factors, self.stride,
                            self.padding, self.dilation, self.padding_mode, self._backend)

    # Where a parameter tensor may change without changing identity, or be replaced, the memo goes.
    def _forget_calls(self) -> None:
        memo = self.__dict__.get("_call_memo")
        if memo:
            memo.clear()

    def __setattr__(self, name: str, value) -> None:
        if name in CALL_ARGUMENTS:
            self._forget_calls()  # the memo's key leaves the conv arguments out (layer_conv2d)
        super().__setattr__(name, value)

    def register_parameter(self, name: str, param: Optional[nn.Parameter]) -> None:
        self._forget_calls()  # also what assigning a parameter attribute calls
        super().register_parameter(name, param)

    def _apply(self, fn, recurse: bool = True):
        self._forget_calls()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._forget_calls()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_call_memo"] = {}  # a copy or an unpickled layer works its calls out afresh
        return state

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        replica._call_memo = {}
        return replica

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
    def from_conv(cls, conv: nn.Conv2d, rank=None, *, target_error: Optional[float] = None, backend: str = "auto",
                  **decompose_kwargs) -> "FactoredConv2d":
        """A layer approximating ``conv``: its hyperparameters, bias, device and dtype; ``conv`` is untouched.

        Args:
            conv: exactly an ``nn.Conv2d`` (not a subclass, a transposed or a lazy conv).
            rank: the class's rank (CP: an int; Tucker-2: a pair ``(R_out, R_in)`` or an int for both), or a
                float in (0, 1]: that fraction of the dense parameters.
            target_error: instead of ``rank``: the smallest rank with relative weight error <= this.
            backend: the new module's backend.
            decompose_kwargs: passed to the class's decomposition (:func:`cpkernels.decompose_conv`: init,
                n_iter_max, tol, random_state, l2_reg, input_covariance, ...; :func:`cpkernels.decompose_tucker2`:
                n_iter_max, tol, input_covariance, method).
        """
        cls._check_conv(conv)
        factors = cls.decompose(conv.weight.detach(), rank, groups=conv.groups, target_error=target_error,
                                **decompose_kwargs)
        return cls.from_factors(factors, None if conv.bias is None else conv.bias.detach(), conv.stride,
                                conv.padding, conv.dilation, conv.padding_mode, backend)

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
