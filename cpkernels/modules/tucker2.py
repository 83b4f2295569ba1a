"""``TuckerConv2d``: a drop-in ``nn.Conv2d`` whose weight is held as a Tucker-2 decomposition."""
from __future__ import annotations

import torch
from torch import nn

from cpkernels.decompositions.tucker2 import decompose_tucker2, resolve_tucker2_rank
from cpkernels.factors import Tucker2Factors
from cpkernels.modules.factored import FactoredConv2d
from cpkernels.ops.tucker2_conv2d import TUCKER2_OP


class TuckerConv2d(FactoredConv2d):
    """2-D convolution with a Tucker-2 weight ``W[o,c,i,j] = sum_{a,b} U_out[o,a] core[a,b,i,j] U_in[c,b]``:
    a 1x1 conv ``Cin -> R_in``, a kh x kw conv ``R_in -> R_out`` (the core, with the stride, padding and
    dilation) and a 1x1 conv ``R_out -> Cout`` with the bias.

    It takes ``nn.Conv2d``'s arguments and has its attributes, plus ``rank`` (the pair ``(R_out, R_in)``
    per group) and ``backend`` (``"auto"``, ``"reference"``, ``"triton"``, as :class:`cpkernels.CPConv2d`).
    Parameters: ``output_factor (G, Cout/G, R_out)``, ``core (G, R_out, R_in, kh, kw)``,
    ``input_factor (G, Cin/G, R_in)``, ``bias``. Build one from a trained conv with :meth:`from_conv`.
    """

    op = TUCKER2_OP
    resolve_rank = staticmethod(resolve_tucker2_rank)
    decompose = staticmethod(decompose_tucker2)

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        (r_out, r_in), g, (kh, kw) = self.rank, self.groups, self.kernel_size
        return {"output_factor": (g, self.out_channels // g, r_out), "core": (g, r_out, r_in, kh, kw),
                "input_factor": (g, self.in_channels // g, r_in)}

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
