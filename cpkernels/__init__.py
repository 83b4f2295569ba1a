"""cpkernels: trained convolutional networks made cheaper by low-rank forms of their convs (CP, Tucker-2, the
truncated SVD of 1x1 convs), with a
fused Triton kernel on the GPU, an arranged path on the CPU, and standard ONNX.

The package is built in layers, bottom to top; each imports only the layers below it (``tests/test_layers.py``
holds this):

1. ``cpkernels.core``: conv argument handling, switches, the one cost model, the one timer;
2. ``cpkernels.factors``: CP, Tucker-2 and SVD factors of a conv weight;
3. ``cpkernels.decompositions``: CP-ALS, Tucker-2 HOOI, the truncated SVD, input whitening;
4. ``cpkernels.kernels``: the fused Triton kernels (imported on first use: they import triton);
5. ``cpkernels.dispatch``: the per-call choice of backend (the CPU and GPU plans, measured or modeled);
6. ``cpkernels.ops``: the functional ops (one front end for every family), their reference, CPU and ONNX forms;
7. ``cpkernels.modules``: the ``nn.Module`` layers (``CPConv2d``, ``TuckerConv2d``, ``SVDConv2d``);
8. ``cpkernels.compression``: model passes (the decomposition families, ``compress_model``, ``plan_ranks``,
   calibration, ``compensate``, ``distill``);
9. ``cpkernels.export``: ``export_onnx``;
10. ``cpkernels.cli``: ``cpkernels plan | compress | export``.

On top, never imported by the library: ``cpkernels.tools`` (the profiler, the benchmark layer list, the
ahead-of-time compile report, the trained networks and the demos) and the entry point ``cpkernels.__main__``.
Importing the package touches no GPU, sets no global flag and imports neither triton nor tensorly.
"""
from cpkernels.compression.compensate import CompensationReport, compensate
from cpkernels.compression.compress import CompressionReport, apply_structure, compress_model
from cpkernels.compression.distill import DistillReport, distill
from cpkernels.compression.ranks import RankPlan, plan_ranks
from cpkernels.decompositions.cp import decompose_conv, resolve_rank
from cpkernels.decompositions.svd import decompose_svd
from cpkernels.decompositions.tucker2 import decompose_tucker2
from cpkernels.export.onnx import export_onnx  # onnx itself is imported on call: it is an optional dependency
from cpkernels.factors import CPFactors, SVDFactors, Tucker2Factors
from cpkernels.modules.cp import CPConv2d
from cpkernels.modules.svd import SVDConv2d
from cpkernels.modules.tucker2 import TuckerConv2d
from cpkernels.ops import cp_conv2d, svd_conv2d, tucker2_conv2d

__version__ = "0.1.0"

__all__ = [
    "CPConv2d", "CPFactors", "CompensationReport", "CompressionReport", "DistillReport", "RankPlan", "SVDConv2d",
    "SVDFactors", "Tucker2Factors", "TuckerConv2d", "apply_structure", "compensate", "compress_model", "cp_conv2d",
    "decompose_conv", "decompose_svd", "decompose_tucker2", "distill", "export_onnx", "plan_ranks", "resolve_rank",
    "svd_conv2d", "tucker2_conv2d", "__version__",
]
