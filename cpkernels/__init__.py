"""cpkernels: CP-decomposed convolutions for PyTorch, with a fused Triton kernel.

Layers of the package, bottom to top:
    decompose (CP: ALS / TensorLy parafac; Tucker-2: HOOI) -> factors (CPFactors, Tucker2Factors)
    -> ops (reference | CPU | Triton kernel) -> modules (CPConv2d, TuckerConv2d) -> model surgery (compress_model).
Importing it touches no GPU, sets no global flag and imports neither triton nor tensorly.
"""
from .compress import CompressionReport, apply_structure, compress_model
from .decompose import decompose_conv, resolve_rank
from .decompose_tucker2 import decompose_tucker2
from .export import export_onnx  # onnx itself is imported on call: it is an optional dependency
from .factors import CPFactors, Tucker2Factors
from .module import CPConv2d
from .module_tucker2 import TuckerConv2d
from .ops import cp_conv2d, tucker2_conv2d
from .plans.ranks import RankPlan, plan_ranks

__version__ = "0.1.0"

__all__ = [
    "CPConv2d", "CPFactors", "CompressionReport", "RankPlan", "Tucker2Factors", "TuckerConv2d", "apply_structure",
    "compress_model", "cp_conv2d", "decompose_conv", "decompose_tucker2", "export_onnx", "plan_ranks", "resolve_rank",
    "tucker2_conv2d", "__version__",
]
