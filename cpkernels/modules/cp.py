"""``CPConv2d``: a drop-in ``nn.Conv2d`` whose weight is held as CP factors."""
from __future__ import annotations

from torch import nn

from cpkernels.decompositions.cp import decompose_conv, resolve_rank
from cpkernels.factors import CPFactors
from cpkernels.modules.factored import FactoredConv2d
from cpkernels.ops.cp_conv2d import CP_OP


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

    op = CP_OP
    resolve_rank = staticmethod(resolve_rank)
    decompose = staticmethod(decompose_conv)

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        r, g, (kh, kw) = self.rank, self.groups, self.kernel_size
        return {"output_factor": (g, self.out_channels // g, r), "input_factor": (g, self.in_channels // g, r),
                "vertical_factor": (g, kh, r), "horizontal_factor": (g, kw, r)}

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
