"""``TuckerConv2d``: a drop-in ``nn.Conv2d`` whose weight is held as a Tucker-2 decomposition."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from cpkernels.core import conv_args
from cpkernels.decompositions.tucker2 import Tucker2RankSpec, decompose_tucker2, resolve_tucker2_rank
from cpkernels.factors import Tucker2Factors
from cpkernels.modules.factored import FactoredConv2d
from cpkernels.ops.tucker2_conv2d import tucker2_conv2d


class TuckerConv2d(FactoredConv2d):
    """2-D convolution with a Tucker-2 weight ``W[o,c,i,j] = sum_{a,b} U_out[o,a] core[a,b,i,j] U_in[c,b]``:
    a 1x1 conv ``Cin -> R_in``, a kh x kw conv ``R_in -> R_out`` (the core, with the stride, padding and
    dilation) and a 1x1 conv ``R_out -> Cout`` with the bias.

    It takes ``nn.Conv2d``'s arguments and has its attributes, plus ``rank`` (the pair ``(R_out, R_in)``
    per group) and ``backend`` (``"auto"``, ``"reference"``, ``"triton"``, as :class:`cpkernels.CPConv2d`).
    Parameters: ``output_factor (G, Cout/G, R_out)``, ``core (G, R_out, R_in, kh, kw)``,
    ``input_factor (G, Cin/G, R_in)``, ``bias``. Build one from a trained conv with :meth:`from_conv`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: conv_args.IntPair,
        rank: Tucker2RankSpec,
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
        self.rank = resolve_tucker2_rank(rank, weight_shape, groups)
        r_out, r_in = self.rank
        g, (kh, kw) = groups, self.kernel_size
        kw_ = dict(device=device, dtype=dtype)
        self.output_factor = nn.Parameter(torch.empty(g, out_channels // g, r_out, **kw_))
        self.core = nn.Parameter(torch.empty(g, r_out, r_in, kh, kw, **kw_))
        self.input_factor = nn.Parameter(torch.empty(g, in_channels // g, r_in, **kw_))
        self._init_bias(bias, device, dtype)
        self.reset_parameters()

    @property
    def factors(self) -> Tucker2Factors:
        """The factors as a :class:`Tucker2Factors` view of the parameters (no copy, autograd intact)."""
        return Tucker2Factors(self.output_factor, self.core, self.input_factor)

    def reset_parameters(self) -> None:
        """Orthonormal channel factors and a core with ``nn.Conv2d``'s weight distribution: the product then
        has the variance of ``nn.Conv2d``'s default weight, projected on the factors' subspaces."""
        for f in (self.output_factor, self.input_factor):
            for g in range(self.groups):
                with torch.no_grad():
                    f[g].copy_(nn.init.orthogonal_(torch.empty(f.shape[1:], dtype=torch.float32)).to(f.dtype))
        bound = 1.0 / (self._fan_in ** 0.5)
        nn.init.uniform_(self.core, -bound, bound)
        self._reset_bias()

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        rank: Optional[Tucker2RankSpec] = None,
        *,
        target_error: Optional[float] = None,
        backend: str = "auto",
        **decompose_kwargs,
    ) -> "TuckerConv2d":
        """A TuckerConv2d approximating ``conv`` (its hyperparameters, bias, device and dtype); ``conv`` is
        untouched. ``rank``: ``(R_out, R_in)``, an int for both, or a parameter fraction (see
        :func:`cpkernels.decompositions.tucker2`), or ``target_error`` instead. ``decompose_kwargs`` go to
        :func:`cpkernels.decompositions.tucker2` (``n_iter_max``, ``tol``, ``input_covariance``, ``method``)."""
        cls._check_conv(conv)
        factors = decompose_tucker2(conv.weight.detach(), rank, groups=conv.groups, target_error=target_error,
                                    **decompose_kwargs)
        return cls.from_factors(factors, None if conv.bias is None else conv.bias.detach(), conv.stride,
                                conv.padding, conv.dilation, conv.padding_mode, backend)

    def forward(self, x: Tensor) -> Tensor:
        return tucker2_conv2d(
            x, self.factors, self.bias, self.stride, self.padding, self.dilation, self.padding_mode, self.backend
        )
