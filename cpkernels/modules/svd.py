"""``SVDConv2d``: a drop-in 1x1 ``nn.Conv2d`` whose weight is held as a truncated SVD."""
from __future__ import annotations

from torch import nn

from cpkernels.decompositions.svd import decompose_svd, resolve_svd_rank
from cpkernels.factors import SVDFactors
from cpkernels.modules.factored import FactoredConv2d
from cpkernels.ops.svd_conv2d import SVD_OP


class SVDConv2d(FactoredConv2d):
    """1x1 convolution with a rank-R weight ``W[o, c] = sum_r U[o, r] V[c, r]`` per group: a 1x1 conv
    ``Cin -> R`` (with the stride and padding), then a 1x1 conv ``R -> Cout`` with the bias.

    It takes the ``nn.Conv2d`` arguments a 1x1 conv can have and has its attributes, plus ``rank`` (per group)
    and ``backend`` (``"auto"``, ``"reference"``, ``"triton"``, as :class:`cpkernels.CPConv2d`; no fused kernel:
    see :mod:`cpkernels.ops.svd_conv2d`). Parameters: ``output_factor (G, Cout/G, R)``,
    ``input_factor (G, Cin/G, R)``, ``bias``. Build one from a trained 1x1 conv with :meth:`from_conv`
    (:func:`cpkernels.decompose_svd`).
    """

    op = SVD_OP
    resolve_rank = staticmethod(resolve_svd_rank)
    decompose = staticmethod(decompose_svd)

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.kernel_size != (1, 1):
            raise ValueError(f"SVDConv2d is a 1x1 conv, got kernel_size={self.kernel_size} (a kh x kw conv takes "
                             "CPConv2d or TuckerConv2d)")
        r, g = self.rank, self.groups
        return {"output_factor": (g, self.out_channels // g, r), "input_factor": (g, self.in_channels // g, r)}

    @property
    def factors(self) -> SVDFactors:
        """The factors as an :class:`SVDFactors` view of the parameters (no copy, autograd intact)."""
        return SVDFactors(self.output_factor, self.input_factor)

    def reset_parameters(self) -> None:
        """Random factors whose product has ``nn.Conv2d``'s default weight variance, 1/(3 fan_in): a weight entry
        sums R products of two independent N(0, s^2) values, of variance R s^4."""
        std = (1.0 / (3.0 * self._fan_in * self.rank)) ** 0.25
        for f in (self.output_factor, self.input_factor):
            nn.init.normal_(f, 0.0, std)
        self._reset_bias()
