"""The one shared list of conv layers, imported by the benchmark suites, the GPU check and the profiler."""
from __future__ import annotations

from dataclasses import dataclass

from cpkernels.core.cost import ConvShape
from cpkernels.decompositions.tucker2 import largest_proportional_ranks

# The shared rank list, as divisors of C: C/16 ... C/2, then C and 1.25 C (trained networks).
RANK_DIVISORS = (16, 8, 4, 2, 1, 0.8)


@dataclass(frozen=True)
class Layer:
    name: str
    shape: ConvShape

    def rank(self, divisor: float) -> int:
        """C/divisor for C = min(Cin, Cout), rounded to a multiple of 8 once above 8 (tensor-core
        friendly), and at least 1."""
        r = min(self.shape.cin, self.shape.cout) / divisor
        return max(1, int(round(r / 8) * 8) if r > 8 else int(round(r)))

    def tucker2_rank(self, cp_rank: int) -> tuple[int, int]:
        """The largest Tucker-2 ranks on the proportional split whose MACs stay within those of CP at
        ``cp_rank``: the two decompositions compared at equal MACs."""
        s = self.shape
        pair = largest_proportional_ranks(s.tucker2_macs, s.cp_macs(cp_rank), s.cout // s.groups, s.cin // s.groups)
        return pair or (1, 1)

    def ranks(self) -> tuple[int, ...]:
        """The distinct ranks of {C/16, C/8, C/4, C/2, C, 1.25 C}: the small ranks random weights allow,
        and the ranks trained networks need to keep their output without fine-tuning (0.5-1.25 C)."""
        return tuple(dict.fromkeys(self.rank(d) for d in RANK_DIVISORS))


def _l(name, cin, cout, size, batch=8, kernel=3, stride=1, padding=None):
    k = (kernel, kernel)
    pad = kernel // 2 if padding is None else padding
    return Layer(name, ConvShape(batch, cin, cout, (size, size), k, stride, pad))


LAYERS = (
    # The two examples the project started from.
    _l("example-3-2-5x5", 3, 2, 32, kernel=5, padding=0),
    _l("vgg19-conv1_1", 3, 64, 224),
    # Every distinct 3x3 conv of VGG-16 (224x224 input).
    _l("vgg16-conv1_2", 64, 64, 224),
    _l("vgg16-conv2_1", 64, 128, 112),
    _l("vgg16-conv2_2", 128, 128, 112),
    _l("vgg16-conv3_1", 128, 256, 56),
    _l("vgg16-conv3_2", 256, 256, 56),
    _l("vgg16-conv4_1", 256, 512, 28),
    _l("vgg16-conv4_2", 512, 512, 28),
    _l("vgg16-conv5_1", 512, 512, 14),
    # The 3x3 convs of ResNet-18, the stride-2 ones included.
    _l("resnet18-layer1", 64, 64, 56),
    _l("resnet18-layer2-down", 64, 128, 56, stride=2),
    _l("resnet18-layer2", 128, 128, 28),
    _l("resnet18-layer3-down", 128, 256, 28, stride=2),
    _l("resnet18-layer3", 256, 256, 14),
    _l("resnet18-layer4-down", 256, 512, 14, stride=2),
    _l("resnet18-layer4", 512, 512, 7),
    # The 3x3 convs of ResNet-50's bottlenecks (torchvision: the stride sits on the 3x3).
    _l("resnet50-layer2-down", 128, 128, 56, stride=2),
    _l("resnet50-layer3-down", 256, 256, 28, stride=2),
    _l("resnet50-layer4-down", 512, 512, 14, stride=2),
    # A 5x5 layer (AlexNet's conv2).
    _l("alexnet-conv2-5x5", 64, 192, 27, kernel=5),
)
# ResNet-50's stride-1 3x3 convs have the shapes of resnet18-layer1..layer4 (64@56, 128@28, 256@14,
# 512@7), so they are not listed twice.

# The roofline layers of docs/kernel.md: N = 32, 3x3, stride 1 (the GPU check).
ROOFLINE_LAYERS = (
    _l("roofline-256-56", 256, 256, 56, batch=32),
    _l("roofline-128-28", 128, 128, 28, batch=32),
    _l("roofline-512-28", 512, 512, 28, batch=32),
    _l("roofline-64-224", 64, 64, 224, batch=32),
)

LAYERS_BY_NAME = {layer.name: layer for layer in LAYERS + ROOFLINE_LAYERS}
