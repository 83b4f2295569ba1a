"""The one shared list of benchmark layers (used by the benchmarks and the GPU check)."""
from cpkernels.cost import ConvShape

# The roofline layers of FACTS: bf16, N = 32, 3x3, stride 1.
ROOFLINE_LAYERS = (
    ConvShape(32, 256, 256, (56, 56)),
    ConvShape(32, 128, 128, (28, 28)),
    ConvShape(32, 512, 512, (28, 28)),
    ConvShape(32, 64, 64, (224, 224)),
)
