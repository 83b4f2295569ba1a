"""The Tucker-2 conv: every path against the float64 oracle, the fused kernel NaN-poisoned, the op and the
module's drop-in contract."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

from cpkernels import Tucker2Factors, TuckerConv2d, tucker2_conv2d
from cpkernels.core.conv_args import is_channels_last

from .cases import CONV_CASES, assert_compiles_and_exports, case
from .oracle import assert_matches_oracle, oracle_conv2d, random_tucker2

fused = pytest.importorskip("cpkernels.kernels.cp_conv2d_fused")


def tucker_rank(c, full: bool) -> tuple[int, int]:
    """Full ranks (exact), or about half of each channel mode."""
    cout_g, cin_g = c.cout // c.groups, c.cin // c.groups
    return (cout_g, cin_g) if full else (max(1, cout_g // 2 + 1), max(1, cin_g // 2))


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output the fused kernel allocates starts as NaN."""
    original = fused.new_output
    monkeypatch.setattr(fused, "new_output", lambda shape, x: original(shape, x).fill_(float("nan")))


# On CPU tensors "auto" runs the CPU arrangement; "reference" the three convs; "triton" the fused kernel
# (under the interpreter without a GPU).
@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
@pytest.mark.parametrize("c", CONV_CASES)
def test_full_ranks_reproduce_conv2d(c, backend):
    """Acceptance: Tucker-2 of a conv's weight at full ranks computes that conv, across the CP test grid."""
    conv = nn.Conv2d(c.cin, c.cout, c.kernel_size, groups=c.groups, bias=c.bias, **c.conv_kwargs())
    with pytest.warns(UserWarning, match="saves nothing"):
        layer = TuckerConv2d.from_conv(conv, tucker_rank(c, full=True), backend=backend)
    x = c.make_input(torch.float32, "cpu")
    y = layer(x)
    expected = torch.func.functional_call(
        conv.to(torch.float64), {k: v.to(torch.float64) for k, v in conv.state_dict().items()},
        (x.to(torch.float64),))
    assert_matches_oracle(y, expected, torch.float32)
    assert is_channels_last(y) == is_channels_last(x)


@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:]
)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_dtypes_and_layouts(backend, dtype, layout):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the interpreter has no bf16 arithmetic")
    f = random_tucker2(12, 10, (3, 3), (7, 5), dtype=dtype)
    bias = torch.randn(12, dtype=dtype)
    x = torch.randn(2, 10, 9, 8, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    y = tucker2_conv2d(x, f, bias, padding=1, backend=backend)
    assert_matches_oracle(y, oracle_conv2d(x, f, bias, padding=1), dtype)
    assert is_channels_last(y) == is_channels_last(x)


FUSED_CASES = [
    case("off-block-ranks", 40, 33, (3, 3), 0, size=(7, 9), padding=1),
    case("groups4-stride2", 8, 12, (3, 3), 0, stride=2, groups=4),
    case("dilated-5x5", 6, 10, (5, 5), 0, size=(13, 12), dilation=2, padding=3),
    case("channels-last-1x3", 16, 8, (1, 3), 0, padding=(0, 1), layout="channels_last"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("c", FUSED_CASES)
def test_fused_truncated_ranks_match_oracle(c, dtype):
    f = random_tucker2(c.cout, c.cin, c.kernel_size, tucker_rank(c, full=False), c.groups, dtype=dtype)
    bias = torch.randn(c.cout, dtype=dtype) if c.bias else None
    x = c.make_input(dtype, "cpu")
    y = tucker2_conv2d(x, f, bias, **c.conv_kwargs(), backend="triton")
    assert_matches_oracle(y, oracle_conv2d(x, f, bias, **c.conv_kwargs()), dtype)


def test_fused_ranks_above_one_block_slice_the_rank(monkeypatch):
    """R_out above the interpreter tile's BLOCK_R (32): the sliced path, one program per output block."""
    f = random_tucker2(80, 48, (3, 3), (70, 40))
    x = torch.randn(1, 48, 6, 7)
    y = tucker2_conv2d(x, f, None, padding=1, backend="triton")
    assert fused.best_config()["BLOCK_R"] < 70
    assert_matches_oracle(y, oracle_conv2d(x, f, None, padding=1), torch.float32)


def op_args(x, f, bias, impl, stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1)):
    return (x, f.input, f.core, f.output, bias, list(stride), list(padding), list(dilation), impl)


@pytest.mark.parametrize("impl", ["reference", "cpu", "dense", "triton"])
@pytest.mark.parametrize("padding", [(1, 1, 1, 1), (0, 1, 2, 1)], ids=["symmetric", "asymmetric"])
def test_opcheck(impl, padding):
    f = random_tucker2(6, 8, (3, 3), (3, 2), groups=2)
    f = Tucker2Factors(*(t.requires_grad_() for t in f.as_tuple()))
    x = torch.randn(2, 8, 7, 9, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    torch.library.opcheck(torch.ops.cpkernels.tucker2_conv2d.default, op_args(x, f, bias, impl, (2, 1), padding))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(stride=2, padding=(1, 2), dilation=(2, 1), groups=2), id="strided-dilated-groups"),
        pytest.param(dict(padding="same"), id="same-even-kernel"),
        pytest.param(dict(padding=1, padding_mode="reflect"), id="reflect"),
    ],
)
def test_gradcheck_float64(kwargs):
    layer = TuckerConv2d(4, 4, (2, 3), rank=(2, 2), dtype=torch.float64, **kwargs)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(f, (x, *layer.parameters()))


def test_fused_forward_gradients_equal_the_reference():
    layer = TuckerConv2d(8, 6, 3, rank=(3, 2), padding=1, groups=2)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    grads = {}
    for backend in ("reference", "triton"):
        layer.backend = backend
        grads[backend] = torch.autograd.grad(layer(x).square().sum(), (x, *layer.parameters()))
    for a, b in zip(grads["reference"], grads["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_from_conv_copies_everything_and_leaves_conv_alone():
    conv = nn.Conv2d(8, 12, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, padding_mode="reflect",
                     dtype=torch.float64)
    state = copy.deepcopy(conv.state_dict())
    layer = TuckerConv2d.from_conv(conv, (4, 3))
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(layer, name) == getattr(conv, name), name
    assert torch.equal(layer.bias, conv.bias) and layer.bias is not conv.bias
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert all(torch.equal(conv.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(2, 8, 11, 10, dtype=torch.float64)
    expected = oracle_conv2d(x, layer.factors, layer.bias, conv.stride, conv.padding, conv.dilation, conv.padding_mode)
    assert_matches_oracle(layer(x), expected, torch.float64)


@pytest.mark.parametrize(
    "bad, match",
    [
        pytest.param(nn.ConvTranspose2d(4, 4, 3), "transposed", id="transposed"),
        pytest.param(nn.LazyConv2d(4, 3), "lazy", id="lazy"),
        pytest.param(type("MyConv", (nn.Conv2d,), {})(4, 4, 3), "subclass", id="subclass"),
        pytest.param(nn.Linear(4, 4), "exactly nn.Conv2d", id="linear"),
    ],
)
def test_from_conv_accepts_only_conv2d(bad, match):
    with pytest.raises(TypeError, match=match):
        TuckerConv2d.from_conv(bad, rank=(2, 2))


def test_extra_repr_to_conv2d_and_dense_weight():
    layer = TuckerConv2d(8, 6, 3, rank=(3, 2), stride=2, padding=1, groups=2, bias=False, padding_mode="reflect")
    conv = nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2, bias=False, padding_mode="reflect")
    expected = repr(conv).replace("Conv2d(8, 6, kernel_size=(3, 3),",
                                  "TuckerConv2d(8, 6, kernel_size=(3, 3), rank=(3, 2),")
    assert repr(layer) == expected
    dense = layer.to_conv2d()
    assert type(dense) is nn.Conv2d and torch.equal(dense.weight, layer.to_dense_weight().detach())
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)


def test_state_dict_deepcopy_pickle_and_save():
    layer = TuckerConv2d(8, 6, 3, rank=(3, 2), padding=1, groups=2)
    other = TuckerConv2d(8, 6, 3, rank=(3, 2), padding=1, groups=2)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(1, 8, 7, 7)
    for clone in (other, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(clone(x), layer(x))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), layer(x))


def test_default_initialisation_has_conv2d_scale():
    torch.manual_seed(0)
    layer, conv = TuckerConv2d(64, 64, 3, rank=(64, 64), padding=1), nn.Conv2d(64, 64, 3, padding=1)
    ratio = layer.to_dense_weight().std() / conv.weight.std()
    assert 0.8 < ratio < 1.25


def test_errors_in_pytorch_wording():
    layer = TuckerConv2d(8, 6, 3, rank=(3, 2))
    with pytest.raises(RuntimeError, match="expected input\\[2, 4, 9, 9\\] to have 8 channels"):
        layer(torch.randn(2, 4, 9, 9))
    with pytest.raises(RuntimeError, match="Input type"):
        layer(torch.randn(2, 8, 9, 9, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        layer(torch.randn(1, 8, 2, 2))
    with pytest.raises(ValueError, match="backend"):
        TuckerConv2d(8, 6, 3, rank=(3, 2), backend="cuda")
    with pytest.raises(ValueError, match="divisible by groups"):
        TuckerConv2d(8, 6, 3, rank=(3, 2), groups=4)


def test_autocast_cpu_bf16_runs_in_bf16():
    layer = TuckerConv2d(8, 6, 3, rank=(4, 3), padding=1)
    x = torch.randn(2, 8, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected_dtype = nn.functional.conv2d(x, layer.to_dense_weight()).dtype
    assert y.dtype == expected_dtype == torch.bfloat16
    assert_matches_oracle(y, oracle_conv2d(x, layer.factors, layer.bias, padding=1), torch.bfloat16)


def test_compile_and_export_record_the_custom_op():
    layer = TuckerConv2d(8, 6, 3, rank=(3, 2), padding=1, groups=2, padding_mode="reflect")
    assert_compiles_and_exports(layer, torch.randn(2, 8, 9, 9), torch.ops.cpkernels.tucker2_conv2d.default)


def test_inputs_are_never_modified():
    layer = TuckerConv2d(8, 6, 3, rank=(4, 3), padding=1)
    x = torch.randn(2, 8, 7, 7)
    before = (x.clone(), {k: v.clone() for k, v in layer.state_dict().items()})
    for backend in ("reference", "auto", "triton"):
        layer.backend = backend
        layer(x)
    assert torch.equal(x, before[0])
    assert all(torch.equal(v, before[1][k]) for k, v in layer.state_dict().items())
