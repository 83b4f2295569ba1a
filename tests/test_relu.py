"""Which convs a ReLU alone reads (cpkernels.compression.relu), seen in a forward pass: ReLUs of every kind, a
model that torch.fx cannot trace, what a folded BatchNorm leaves between them, and the convs that must not count
(a second reader, a view, a shared conv called twice with one call unread by a ReLU, a conv that never ran)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpkernels.compression.batchnorm import fold_batchnorm
from cpkernels.compression.relu import convs_read_by_relu


class Readers(nn.Module):
    """One conv per kind of ReLU, and convs read otherwise."""

    def __init__(self):
        super().__init__()
        self.module = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.functional = nn.Conv2d(3, 3, 3, padding=1)
        self.method = nn.Conv2d(3, 3, 3, padding=1)
        self.torch_inplace = nn.Conv2d(3, 3, 3, padding=1)
        self.two_readers = nn.Conv2d(3, 3, 3, padding=1)  # a ReLU and the residual sum
        self.no_relu = nn.Conv2d(3, 3, 3, padding=1)
        self.viewed = nn.Conv2d(3, 3, 3, padding=1)  # reshaped, then the view goes through a ReLU
        self.unused = nn.Conv2d(3, 3, 3, padding=1)
        self.shared = nn.Conv2d(3, 3, 3, padding=1)  # called twice, once into a ReLU, once not

    def forward(self, x):
        x = self.relu(self.module(x))
        x = F.relu(self.functional(x))
        x = self.method(x).relu()
        x = torch.relu_(self.torch_inplace(x))
        t = self.two_readers(x)
        x = F.relu(t) + t
        x = torch.sigmoid(self.no_relu(x))
        v = self.viewed(x)
        x = F.relu(v.reshape(v.shape)) * v.size(0)  # .shape and .size() read no values
        return F.relu(self.shared(x)) + self.shared(x)


def _read_by_relu(model: nn.Module, x: torch.Tensor) -> set[str]:
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    return convs_read_by_relu(model, convs, (x,))


def test_every_kind_of_relu_is_found_and_nothing_else():
    model = Readers()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert _read_by_relu(model, torch.randn(2, 3, 8, 8)) == {"module", "functional", "method", "torch_inplace"}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Sigmoid(),
                                  nn.Conv2d(4, 4, 1), nn.Identity(), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.body(x)
        return self.body(-x)


def test_a_model_that_does_not_trace():
    model = Untraceable()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    assert _read_by_relu(model, torch.randn(1, 3, 9, 9)) == {"body.0", "body.4"}


def test_a_relu_after_a_folded_batchnorm_reads_the_folded_conv():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    folded, pairs = fold_batchnorm(model.eval())
    assert pairs == [("0", "1"), ("3", "4")]
    x = torch.randn(1, 3, 9, 9)
    assert _read_by_relu(model, x) == set()  # the BatchNorm reads the conv
    assert _read_by_relu(folded, x) == {"0"}  # through the Identity the BatchNorm became
