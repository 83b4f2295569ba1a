"""cpkernels: CP-decomposed convolutions for PyTorch, with a fused Triton kernel.

Layers of the package, bottom to top:
    decompose (TensorLy parafac) -> factors (CPFactors) -> ops (reference | Triton kernel)
    -> module (CPConv2d).
Importing it touches no GPU, sets no global flag and imports neither triton nor tensorly.
"""
from .decompose import decompose_conv, resolve_rank
from .factors import CPFactors
from .module import CPConv2d
from .ops import cp_conv2d

__version__ = "0.1.0"

__all__ = ["CPConv2d", "CPFactors", "cp_conv2d", "decompose_conv", "resolve_rank", "__version__"]
