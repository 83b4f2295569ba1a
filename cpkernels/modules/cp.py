"""``CPConv2d``: a drop-in ``nn.Conv2d`` whose weight is held as CP factors."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from cpkernels.core import conv_args
from cpkernels.decompositions.cp import RankSpec, decompose_conv, resolve_rank
from cpkernels.factors import CPFactors
from cpkernels.modules.factored import FactoredConv2d
from cpkernels.ops.cp_conv2d import cp_conv2d


class CPConv2d(FactoredConv2d):
    """2-D convolution with a rank-R CP weight ``W[o,c,i,j] = sum_r A[o,r] B[c,r] V[i,r] H[j,r]``.

    It takes ``nn.Conv2d``'s arguments and has its attributes (``in_channels``, ``out_channels``,
    ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups``, ``padding_mode``, ``bias``), plus
    ``rank`` and ``backend``. The factors are parameters of shape ``(G, dim, R)``:
    ``output_factor (G, Cout/G, R)``, ``input_factor (G, Cin/G, R)``, ``vertical_factor (G, kh, R)``,
    ``horizontal_factor (G, kw, R)``.

    ``backend``: ``"auto"`` follows the GPU plan on CUDA (dense, the four stages or a fused kernel) and
    the CPU plan on the CPU (the CPU arrangement of the stages, or dense); ``"reference"`` and
    ``"triton"`` force the four stages or the fused kernel.

    Build one from a trained conv with :meth:`from_conv`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: conv_args.IntPair,
        rank: RankSpec,
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
        weight_shape = self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                       padding_mode, backend)
        self.rank = resolve_rank(rank, weight_shape, groups)
        kw = dict(device=device, dtype=dtype)
        r, g = self.rank, groups
        self.output_factor = nn.Parameter(torch.empty(g, out_channels // g, r, **kw))
        self.input_factor = nn.Parameter(torch.empty(g, in_channels // g, r, **kw))
        self.vertical_factor = nn.Parameter(torch.empty(g, self.kernel_size[0], r, **kw))
        self.horizontal_factor = nn.Parameter(torch.empty(g, self.kernel_size[1], r, **kw))
        self._init_bias(bias, device, dtype)
        self.reset_parameters()

    # ---------------------------------------------------------------------------------------------
    @property
    def factors(self) -> CPFactors:
        """The factors as a :class:`CPFactors` view of the parameters (no copy, autograd intact)."""
        return CPFactors(self.output_factor, self.input_factor, self.vertical_factor, self.horizontal_factor)

    def reset_parameters(self) -> None:
        """Random factors whose product has ``nn.Conv2d``'s default weight variance.

        ``nn.Conv2d`` draws its weight from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), of variance 1/(3 fan_in).
        With four independent N(0, s^2) factors, a weight entry sums R products of four, of variance
        R s^8; s is chosen to match.
        """
        std = (1.0 / (3.0 * self._fan_in * self.rank)) ** 0.125
        for f in (self.output_factor, self.input_factor, self.vertical_factor, self.horizontal_factor):
            nn.init.normal_(f, 0.0, std)
        self._reset_bias()

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        rank: Optional[RankSpec] = None,
        *,
        target_error: Optional[float] = None,
        backend: str = "auto",
        **decompose_kwargs,
    ) -> "CPConv2d":
        """A CPConv2d approximating ``conv``: its hyperparameters, bias, device and dtype; ``conv`` is untouched.

        Args:
            conv: exactly an ``nn.Conv2d`` (not a subclass, a transposed or a lazy conv).
            rank: an ``int``, or a ``float`` in (0, 1] (fraction of the dense parameters).
            target_error: instead of ``rank``: the smallest rank with relative weight error <= this.
            backend: the new module's backend.
            decompose_kwargs: passed to :func:`cpkernels.decompose_conv` (init, n_iter_max, tol,
                random_state, l2_reg, ...).
        """
        cls._check_conv(conv)
        factors = decompose_conv(
            conv.weight.detach(), rank, groups=conv.groups, target_error=target_error, **decompose_kwargs
        )
        return cls.from_factors(
            factors,
            bias=None if conv.bias is None else conv.bias.detach(),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            padding_mode=conv.padding_mode,
            backend=backend,
        )

    # ---------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return cp_conv2d(
            x, self.factors, self.bias, self.stride, self.padding, self.dilation, self.padding_mode, self.backend
        )
