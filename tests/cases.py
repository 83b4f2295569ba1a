"""Conv cases shared by the reference tests and the fused-kernel parity tests, and the compile/export check that
every family's layer tests share."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch


@dataclass(frozen=True)
class ConvCase:
    cin: int
    cout: int
    kernel_size: tuple[int, int]
    rank: int
    size: tuple[int, int] = (9, 11)
    batch: int = 2
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    layout: str = "nchw"  # "nchw", "channels_last", "strided" (a non-contiguous view), "unbatched"
    extra: dict = field(default_factory=dict)

    def make_input(self, dtype, device) -> torch.Tensor:
        h, w = self.size
        if self.layout == "unbatched":
            return torch.randn(self.cin, h, w, dtype=dtype, device=device)
        x = torch.randn(self.batch, self.cin, h, w, dtype=dtype, device=device)
        if self.layout == "channels_last":
            return x.to(memory_format=torch.channels_last)
        if self.layout == "strided":
            # Every other column of a wider tensor: no dense layout at all.
            wide = torch.randn(self.batch, self.cin, h, 2 * w, dtype=dtype, device=device)
            return wide[..., ::2]
        return x

    def conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, padding_mode=self.padding_mode)


def case(id: str, *args, marks=(), **kwargs):
    return pytest.param(ConvCase(*args, **kwargs), id=id, marks=marks)


# Every conv semantic the op promises; shared by the reference and the fused-kernel tests.
CONV_CASES = [
    case("basic-3x3", 8, 6, (3, 3), 4),
    case("pad1", 8, 6, (3, 3), 4, padding=1),
    case("stride2", 8, 6, (3, 3), 4, stride=2, padding=1),
    case("stride-per-axis", 8, 6, (3, 3), 4, stride=(2, 1), padding=1),
    case("padding-per-axis", 8, 6, (3, 3), 4, padding=(2, 0)),
    case("dilation2", 8, 6, (3, 3), 4, dilation=2, padding=2),
    case("dilation-per-axis", 8, 6, (3, 3), 4, dilation=(1, 3), padding=(1, 2)),
    case("stride-dilation-odd", 5, 7, (3, 3), 3, size=(13, 10), stride=(3, 2), dilation=(2, 1), padding=(1, 2)),
    case("same-odd-kernel", 8, 6, (3, 3), 4, padding="same"),
    case("same-even-kernel", 8, 6, (2, 4), 4, padding="same"),
    case("same-even-dilated", 8, 6, (4, 2), 4, padding="same", dilation=(2, 3), size=(12, 13)),
    case("valid", 8, 6, (3, 3), 4, padding="valid"),
    case("5x5", 3, 2, (5, 5), 2, size=(12, 12), padding=2),
    case("1xk-kernel", 4, 6, (1, 3), 5, padding=(0, 1)),
    case("kx1-kernel", 4, 6, (3, 1), 5, padding=(1, 0)),
    case("1x1-kernel", 6, 10, (1, 1), 3),
    case("reflect", 8, 6, (3, 3), 4, padding=1, padding_mode="reflect"),
    case("replicate", 8, 6, (3, 3), 4, padding=(2, 1), padding_mode="replicate"),
    case("circular", 8, 6, (3, 3), 4, padding=1, padding_mode="circular"),
    case("reflect-same-even", 8, 6, (2, 2), 4, padding="same", padding_mode="reflect"),
    case("no-bias", 8, 6, (3, 3), 4, padding=1, bias=False),
    case("groups2", 8, 6, (3, 3), 4, padding=1, groups=2),
    case("groups4-stride2", 8, 12, (3, 3), 3, stride=2, groups=4),
    case("depthwise", 6, 6, (3, 3), 2, padding=1, groups=6),
    case("unbatched", 8, 6, (3, 3), 4, padding=1, layout="unbatched"),
    case("batch0", 8, 6, (3, 3), 4, padding=1, batch=0),
    case("batch1-odd-size", 8, 6, (3, 3), 4, batch=1, size=(7, 5), padding=1),
    case("channels-last", 8, 6, (3, 3), 4, padding=1, layout="channels_last"),
    case("channels-last-stride2", 16, 12, (3, 3), 8, stride=2, padding=1, layout="channels_last"),
    case("non-contiguous", 8, 6, (3, 3), 4, padding=1, layout="strided"),
    case("rank-off-block", 40, 33, (3, 3), 36, size=(7, 9), padding=1),
    case("channels-off-block", 37, 70, (3, 3), 20, size=(6, 7), padding=1),
    case("rank-1", 8, 6, (3, 3), 1, padding=1),
    case("tiny-image", 4, 4, (3, 3), 2, size=(3, 3)),
    case("image-1x1-padded", 4, 4, (3, 3), 2, size=(1, 1), padding=1),
    case("wide-image", 4, 8, (3, 3), 4, size=(3, 70), padding=1),
]


def assert_compiles_and_exports(layer, x, op, backend="aot_eager", rtol=None, atol=None) -> None:
    """``layer`` on ``x``: compiled in one graph (``fullgraph=True``, ``backend``), its output and every gradient (of
    ``x`` and of each parameter, to ``rtol``/``atol``) equal eager; ``torch.export`` records the custom op ``op`` (an
    overload such as ``torch.ops.cpkernels.cp_conv2d.default``) and its module gives eager's output."""
    torch._dynamo.reset()
    x = x.detach().requires_grad_()
    y_eager = layer(x)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), (x, *layer.parameters()))
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    y = compiled(x)
    grads = torch.autograd.grad(y.square().sum(), (x, *layer.parameters()))
    torch.testing.assert_close(y, y_eager)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    program = torch.export.export(layer, (x.detach(),))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert op in targets
    torch.testing.assert_close(program.module()(x.detach()), y_eager.detach())
