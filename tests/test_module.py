"""CPConv2d behaves like nn.Conv2d wherever a user or a tool can look."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

from cpkernels import CPConv2d

from .oracle import assert_matches_oracle, oracle_conv2d

CONV_KWARGS = [
    pytest.param(dict(in_channels=8, out_channels=6, kernel_size=3), id="plain"),
    pytest.param(
        dict(in_channels=8, out_channels=12, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
             groups=2, bias=False, padding_mode="reflect"),
        id="every-hyperparameter",
    ),
    pytest.param(dict(in_channels=4, out_channels=6, kernel_size=(2, 4), padding="same", padding_mode="circular"),
                 id="same-circular"),
]


@pytest.mark.parametrize("kwargs", CONV_KWARGS)
def test_from_conv_copies_everything_and_leaves_conv_alone(kwargs):
    conv = nn.Conv2d(**kwargs, dtype=torch.float64)
    state = copy.deepcopy(conv.state_dict())
    layer = CPConv2d.from_conv(conv, rank=4)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(layer, name) == getattr(conv, name), name
    assert (layer.bias is None) == (conv.bias is None)
    if conv.bias is not None:
        assert torch.equal(layer.bias, conv.bias) and layer.bias is not conv.bias
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert all(torch.equal(conv.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(2, conv.in_channels, 11, 10, dtype=torch.float64)
    y = layer(x)
    expected = oracle_conv2d(x, layer.factors, layer.bias, conv.stride, conv.padding, conv.dilation, conv.padding_mode)
    assert_matches_oracle(y, expected, torch.float64)


def test_to_conv2d_and_dense_weight_compute_the_same_function():
    layer = CPConv2d(8, 6, 3, rank=4, stride=2, padding=1, groups=2, padding_mode="replicate")
    conv = layer.to_conv2d()
    assert type(conv) is nn.Conv2d and conv.groups == 2 and conv.padding_mode == "replicate"
    assert torch.equal(conv.weight, layer.to_dense_weight().detach())
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "bad, match",
    [
        pytest.param(nn.Conv1d(4, 4, 3), "exactly nn.Conv2d", id="conv1d"),
        pytest.param(nn.ConvTranspose2d(4, 4, 3), "transposed", id="transposed"),
        pytest.param(nn.LazyConv2d(4, 3), "lazy", id="lazy"),
        pytest.param(type("MyConv", (nn.Conv2d,), {})(4, 4, 3), "subclass", id="subclass"),
        pytest.param(nn.Linear(4, 4), "exactly nn.Conv2d", id="linear"),
    ],
)
def test_from_conv_accepts_only_conv2d(bad, match):
    with pytest.raises(TypeError, match=match):
        CPConv2d.from_conv(bad, rank=2)


def test_extra_repr_follows_conv2d():
    layer = CPConv2d(8, 6, 3, rank=4, stride=2, padding=1, groups=2, bias=False, padding_mode="reflect")
    conv = nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2, bias=False, padding_mode="reflect")
    expected = repr(conv).replace("Conv2d(8, 6, kernel_size=(3, 3),", "CPConv2d(8, 6, kernel_size=(3, 3), rank=4,")
    assert repr(layer) == expected
    assert "rank=4" in repr(CPConv2d(3, 2, 5, rank=4))
    assert "backend=reference" in repr(CPConv2d(3, 2, 5, rank=4, backend="reference"))


def test_state_dict_round_trip_deepcopy_and_pickle():
    layer = CPConv2d(8, 6, 3, rank=4, padding=1, groups=2)
    other = CPConv2d(8, 6, 3, rank=4, padding=1, groups=2)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(1, 8, 7, 7)
    for clone in (other, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(clone(x), layer(x))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), layer(x)) and loaded.rank == 4


def test_to_dtype_and_device():
    layer = CPConv2d(8, 6, 3, rank=4).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    y = layer(torch.randn(1, 8, 5, 5, dtype=torch.float64))
    assert y.dtype == torch.float64
    assert layer.to("meta").output_factor.device.type == "meta"


def test_autograd_reaches_input_every_factor_and_bias():
    layer = CPConv2d(8, 6, 3, rank=4, padding=1, groups=2)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(stride=2, padding=(1, 2), dilation=(2, 1), groups=2), id="strided-dilated-groups"),
        pytest.param(dict(padding="same"), id="same-even-kernel"),
        pytest.param(dict(padding=1, padding_mode="reflect"), id="reflect"),
    ],
)
def test_gradcheck_float64(kwargs):
    layer = CPConv2d(4, 4, (2, 3), rank=3, dtype=torch.float64, **kwargs)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())

    def f(x, *params):
        out = torch.func.functional_call(layer, dict(zip([n for n, _ in layer.named_parameters()], params)), (x,))
        return out

    assert torch.autograd.gradcheck(f, (x, *params))


def test_fine_tuning_step_reduces_the_loss():
    layer = CPConv2d(4, 4, 3, rank=3, padding=1)
    target = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(8, 4, 8, 8)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        loss = (layer(x) - target(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_default_init_matches_conv2d_scale():
    torch.manual_seed(0)
    w = CPConv2d(64, 64, 3, rank=16).to_dense_weight().detach()
    target_std = (1 / (3 * 64 * 9)) ** 0.5
    assert 0.5 * target_std < w.std().item() < 2.0 * target_std


def test_backend_is_settable_and_checked():
    layer = CPConv2d(4, 4, 3, rank=2)
    assert layer.backend == "auto"
    layer.backend = "reference"
    assert layer.backend == "reference"
    with pytest.raises(ValueError, match="backend"):
        layer.backend = "cuda"


# Bad input: PyTorch's errors, before any work -----------------------------------------------------
@pytest.mark.parametrize(
    "x, error, match",
    [
        pytest.param(torch.randn(1, 5, 8, 8), RuntimeError, "to have 4 channels, but got 5 channels", id="channels"),
        pytest.param(torch.randn(4, 8), RuntimeError, "Expected 3D \\(unbatched\\) or 4D", id="2d"),
        pytest.param(torch.randn(1, 1, 4, 8, 8), RuntimeError, "Expected 3D \\(unbatched\\) or 4D", id="5d"),
        pytest.param(torch.ones(1, 4, 8, 8, dtype=torch.int64), RuntimeError, "floating point", id="integer"),
        pytest.param(torch.randn(1, 4, 8, 8, dtype=torch.float64), RuntimeError, "should be the same", id="dtype"),
        pytest.param(torch.randn(1, 4, 8, 8, device="meta"), RuntimeError, "same device", id="device"),
        pytest.param(torch.randn(1, 4, 2, 2), RuntimeError, "Kernel size can't be greater", id="too-small"),
    ],
)
def test_bad_input_gets_pytorch_errors(x, error, match):
    layer = CPConv2d(4, 6, 3, rank=2)
    with pytest.raises(error, match=match):
        layer(x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(groups=3), "in_channels must be divisible by groups", id="groups"),
        pytest.param(dict(padding="same", stride=2), "strided convolutions", id="same-strided"),
        pytest.param(dict(padding="full"), "Invalid padding string", id="padding-string"),
        pytest.param(dict(padding_mode="mirror"), "padding_mode", id="padding-mode"),
        pytest.param(dict(rank=0), "rank must be >= 1", id="rank"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = dict(in_channels=4, out_channels=6, kernel_size=3, rank=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        CPConv2d(**args)


def test_input_is_never_modified():
    layer = CPConv2d(4, 6, 3, rank=2, padding=1, padding_mode="reflect")
    x = torch.randn(1, 4, 8, 8)
    before = x.clone()
    layer(x)
    assert torch.equal(x, before)
