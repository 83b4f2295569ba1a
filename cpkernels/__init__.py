"""cpkernels: CP-decomposed convolutions for PyTorch, with a fused Triton kernel.

Layers of the package, bottom to top:
    decompose (ALS / TensorLy parafac) -> factors (CPFactors) -> ops (reference | CPU | Triton kernel)
    -> module (CPConv2d) -> model surgery (compress_model).
Importing it touches no GPU, sets no global flag and imports neither triton nor tensorly.
"""
from .compress import CompressionReport, apply_structure, compress_model
from .decompose import decompose_conv, resolve_rank
from .export import export_onnx  # onnx itself is imported on call: it is an optional dependency
from .factors import CPFactors
from .module import CPConv2d
from .ops import cp_conv2d
from .plans.ranks import RankPlan, plan_ranks

__version__ = "0.1.0"

__all__ = [
    "CPConv2d", "CPFactors", "CompressionReport", "RankPlan", "apply_structure", "compress_model", "cp_conv2d",
    "decompose_conv", "export_onnx", "plan_ranks", "resolve_rank", "__version__",
]
