"""The SVD family of 1x1 convs: the layer on every path against the float64 oracle, its drop-in contract, the
truncated SVD (optimal, whitened, guarded), and the family in compress_model and the GPU plan. No kernel of
this family allocates its output (two GEMMs in PyTorch), so there is nothing to poison here."""
import copy
import dataclasses
import io

import pytest
import torch
from torch import nn

from cpkernels import SVDConv2d, SVDFactors, compress_model, decompose_conv, decompose_svd, svd_conv2d
from cpkernels.compression.families import FAMILIES, family_for
from cpkernels.core.conv_args import is_channels_last
from cpkernels.core.cost import ConvShape
from cpkernels.decompositions.svd import singular_triplets, truncated
from cpkernels.dispatch import gpu

from .cases import CONV_CASES, assert_compiles_and_exports
from .oracle import TOLERANCE, assert_matches_oracle, oracle_conv2d

# The conv test grid with every kernel made 1x1: strides, paddings (string ones too), dilations, groups,
# padding modes, layouts, unbatched inputs.
POINTWISE_CASES = [pytest.param(dataclasses.replace(p.values[0], kernel_size=(1, 1)), id=p.id) for p in CONV_CASES]


def random_svd(cout, cin, rank, groups=1, dtype=torch.float32) -> SVDFactors:
    """Fresh random factors, the output O(1) for unit-variance inputs."""
    std = (1.0 / ((cin // groups) * rank)) ** 0.25
    return SVDFactors(torch.randn(groups, cout // groups, rank, dtype=torch.float64) * std,
                      torch.randn(groups, cin // groups, rank, dtype=torch.float64) * std).to(dtype)


def full_rank_layer(conv: nn.Conv2d, backend: str) -> SVDConv2d:
    """The exact SVD of the conv's weight at full rank (which saves nothing, so decompose_svd refuses it)."""
    w = conv.weight.detach()
    full = min(conv.in_channels, conv.out_channels) // conv.groups
    factors = truncated(*singular_triplets(w, conv.groups), full).to(w.dtype)
    return FAMILIES["svd"].from_factors(factors, conv, backend)


# "reference": the two convs; "auto" on CPU tensors: the CPU path's two GEMMs; "triton": what it forces on a
# GPU (the two convs: there is no kernel), skipped without triton as elsewhere.
@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
@pytest.mark.parametrize("c", POINTWISE_CASES)
def test_full_rank_reproduces_conv2d(c, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    conv = nn.Conv2d(c.cin, c.cout, 1, groups=c.groups, bias=c.bias, **c.conv_kwargs())
    layer = full_rank_layer(conv, backend)
    x = c.make_input(torch.float32, "cpu")
    expected = torch.func.functional_call(
        conv.to(torch.float64), {k: v.to(torch.float64) for k, v in conv.state_dict().items()}, (x.to(torch.float64),))
    y = layer(x)
    assert_matches_oracle(y, expected, torch.float32)
    assert is_channels_last(y) == is_channels_last(x)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_dtypes_layouts_strides_and_groups(backend, dtype, layout):
    f = random_svd(12, 10, 3, groups=2, dtype=dtype)
    bias = torch.randn(12, dtype=dtype)
    x = torch.randn(2, 10, 9, 8, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    y = svd_conv2d(x, f, bias, stride=(2, 1), padding=(1, 0), backend=backend)
    assert_matches_oracle(y, oracle_conv2d(x, f, bias, stride=(2, 1), padding=(1, 0)), dtype)
    assert is_channels_last(y) == is_channels_last(x)


@pytest.mark.parametrize("impl", ["reference", "cpu", "dense"])
@pytest.mark.parametrize("padding", [(1, 1, 1, 1), (0, 1, 2, 1)], ids=["symmetric", "asymmetric"])
def test_opcheck(impl, padding):
    f = random_svd(6, 8, 2, groups=2)
    f = SVDFactors(*(t.requires_grad_() for t in f.as_tuple()))
    x = torch.randn(2, 8, 7, 9, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    torch.library.opcheck(torch.ops.cpkernels.svd_conv2d.default,
                          (x, f.input, f.output, bias, [2, 1], list(padding), [1, 1], impl))


@pytest.mark.parametrize("kwargs", [dict(stride=2, padding=(1, 2), groups=2), dict(padding=1, padding_mode="reflect")],
                         ids=["strided-groups", "reflect"])
def test_gradcheck_float64(kwargs):
    layer = SVDConv2d(4, 6, 1, rank=1, dtype=torch.float64, **kwargs)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(f, (x, *layer.parameters()))


def test_compile_and_export_record_the_custom_op():
    layer = SVDConv2d(8, 6, 1, rank=2, stride=2, padding=1, groups=2)
    assert_compiles_and_exports(layer, torch.randn(2, 8, 9, 9), torch.ops.cpkernels.svd_conv2d.default)


def test_onnx_export_writes_two_convs(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from cpkernels import export_onnx

    layer = SVDConv2d(16, 24, 1, rank=4, stride=2, padding=1).eval()
    x = torch.randn(1, 16, 9, 9)
    proto = export_onnx(nn.Sequential(layer), x, tmp_path / "svd.onnx", merge_depthwise=True)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2


def test_from_conv_copies_everything_and_leaves_conv_alone():
    conv = nn.Conv2d(8, 12, 1, stride=(2, 1), padding=(1, 2), groups=2, padding_mode="reflect", dtype=torch.float64)
    state = copy.deepcopy(conv.state_dict())
    layer = SVDConv2d.from_conv(conv, 2)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(layer, name) == getattr(conv, name), name
    assert torch.equal(layer.bias, conv.bias) and layer.bias is not conv.bias
    assert all(torch.equal(conv.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(2, 8, 11, 10, dtype=torch.float64)
    expected = oracle_conv2d(x, layer.factors, layer.bias, conv.stride, conv.padding, conv.dilation, conv.padding_mode)
    assert_matches_oracle(layer(x), expected, torch.float64)


def test_repr_to_conv2d_state_dict_and_save():
    layer = SVDConv2d(8, 6, 1, rank=1, stride=2, groups=2, bias=False)
    conv = nn.Conv2d(8, 6, 1, stride=2, groups=2, bias=False)
    assert repr(layer) == repr(conv).replace("Conv2d(8, 6, kernel_size=(1, 1),", "SVDConv2d(8, 6, kernel_size=(1, 1), rank=1,")
    dense = layer.to_conv2d()
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=TOLERANCE[torch.float32] * 10)
    other = SVDConv2d(8, 6, 1, rank=1, stride=2, groups=2, bias=False)
    other.load_state_dict(layer.state_dict())
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for clone in (other, torch.load(buffer, weights_only=False)):
        assert torch.equal(clone(x), layer(x))


def test_default_initialisation_has_conv2d_scale():
    torch.manual_seed(0)
    ratio = SVDConv2d(256, 256, 1, rank=64).to_dense_weight().std() / nn.Conv2d(256, 256, 1).weight.std()
    assert 0.8 < ratio < 1.25


# --------------------------------------------------------------------------------------------------
# The decomposition
# --------------------------------------------------------------------------------------------------
def test_truncated_svd_is_the_eckart_young_optimum_and_beats_cp_als():
    """At equal rank the SVD's error is the tail of the singular values; CP-ALS (a rank-R CP of a 1x1 weight is a
    rank-R matrix factorisation) never does better, does worse in a few iterations, and equals it when it
    converges on a weight with well-separated singular values."""
    torch.manual_seed(1)
    w = torch.randn(48, 32, 1, 1, dtype=torch.float64)
    s = torch.linalg.svdvals(w[:, :, 0, 0])
    for r in (2, 6, 12):
        svd_error = decompose_svd(w, r).relative_error(w)
        assert svd_error == pytest.approx(float(s[r:].norm() / s.norm()), rel=1e-12)
        quick = decompose_conv(w, r, n_iter_max=2, init="random", random_state=0).relative_error(w)
        assert svd_error < quick - 1e-6
    u, _, vh = torch.linalg.svd(torch.randn(48, 32, dtype=torch.float64), full_matrices=False)
    separated = (u * (2.0 ** -torch.arange(32.0, dtype=torch.float64)) @ vh)[:, :, None, None]
    svd_error = decompose_svd(separated, 4).relative_error(separated)
    als_error = decompose_conv(separated, 4, n_iter_max=500, tol=1e-14).relative_error(separated)
    assert svd_error - 1e-12 <= als_error <= svd_error + 1e-9


def test_whitened_svd_beats_the_plain_svd_on_the_calibration_output_error():
    torch.manual_seed(2)
    conv = nn.Conv2d(24, 32, 1, dtype=torch.float64)
    mixing = torch.randn(24, 24, dtype=torch.float64) * torch.logspace(0, -2, 24, dtype=torch.float64)
    x = (torch.randn(4000, 24, dtype=torch.float64) @ mixing)  # correlated channels of unequal power
    covariance = x.T @ x / x.shape[0]

    def output_error(f):
        f = f.detach()
        e = (conv.weight.detach()[:, :, 0, 0] - f.to_dense()[:, :, 0, 0]) @ x.T
        return float(e.norm() / (conv.weight.detach()[:, :, 0, 0] @ x.T).norm())

    for r in (2, 5, 9):
        plain = output_error(decompose_svd(conv.weight, r))
        whitened = output_error(decompose_svd(conv.weight, r, input_covariance=covariance))
        assert whitened < plain, (r, whitened, plain)
    scaled = decompose_svd(conv.weight, 3, input_covariance=2.0 * torch.eye(24, dtype=torch.float64))
    assert torch.equal(scaled.to_dense(), decompose_svd(conv.weight, 3).to_dense())  # white inputs: the plain SVD


def test_rank_policies_and_target_error():
    torch.manual_seed(3)
    w = torch.randn(40, 60, 1, 1)
    assert decompose_svd(w, 0.5).rank == int(0.5 * 40 * 60 // 100)  # r (Cin + Cout) <= half of Cin Cout
    f = decompose_svd(w, target_error=0.6)
    assert f.relative_error(w) <= 0.6 < decompose_svd(w, f.rank - 1).relative_error(w)
    zero = decompose_svd(torch.zeros(8, 16, 1, 1), target_error=0.1)
    assert zero.rank == 1 and torch.equal(zero.to_dense(), torch.zeros(8, 16, 1, 1))


@pytest.mark.parametrize(
    "weight, kwargs, error, match",
    [
        pytest.param(torch.randn(16, 16, 1, 1), dict(rank=8), ValueError, "saves nothing", id="saves-nothing"),
        pytest.param(torch.randn(16, 8, 1, 1), dict(rank=9), ValueError, "must lie in", id="above-full"),
        pytest.param(torch.randn(16, 16, 3, 3), dict(rank=2), ValueError, "1x1 convs", id="3x3"),
        pytest.param(torch.full((16, 16, 1, 1), float("nan")), dict(rank=2), ValueError, "NaN", id="nan"),
        pytest.param(torch.randn(16, 16, 1, 1), dict(rank=2.0 + 1), ValueError, "fractional", id="fraction-3"),
        pytest.param(torch.randn(16, 16, 1, 1), dict(rank=(2, 2)), TypeError, "int >= 1", id="pair"),
        pytest.param(torch.randn(16, 16, 1, 1), dict(), ValueError, "needs a rank", id="no-rank"),
    ],
)
def test_bad_input_is_refused_before_any_work(weight, kwargs, error, match):
    before = weight.clone()
    with pytest.raises(error, match=match):
        decompose_svd(weight, **kwargs)
    assert torch.equal(weight, before) or torch.isnan(weight).all()


def test_from_conv_at_a_rank_that_saves_nothing_leaves_the_conv_alone():
    conv = nn.Conv2d(12, 12, 1)
    state = copy.deepcopy(conv.state_dict())
    with pytest.raises(ValueError, match=r"saves only below Cin\*Cout/\(Cin\+Cout\) = 6.00"):
        SVDConv2d.from_conv(conv, 6)
    assert all(torch.equal(conv.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="is a 1x1 conv"):
        SVDConv2d(8, 8, 3, rank=2)


# --------------------------------------------------------------------------------------------------
# The family in the model passes and the GPU plan
# --------------------------------------------------------------------------------------------------
def test_an_int_rank_is_the_svd_on_a_1x1_conv_and_cp_elsewhere():
    assert family_for(nn.Conv2d(8, 8, 1), 3).name == "svd"
    assert family_for(nn.Conv2d(8, 8, 3), 3).name == "cp"
    assert family_for(nn.Conv2d(8, 8, 3), (3, 2)).name == "tucker2"
    with pytest.raises(TypeError, match="rank of no decomposition family of a 1x1 conv"):
        family_for(nn.Conv2d(8, 8, 1), (3, 2))


class Bottleneck(nn.Module):
    def __init__(self):
        super().__init__()
        self.reduce, self.conv, self.expand = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 32, 1)
        self.stem = nn.Conv2d(3, 32, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return x + self.expand(torch.relu(self.conv(torch.relu(self.reduce(x)))))


def test_compress_model_factors_1x1_convs_under_auto_and_leaves_them_under_cp():
    torch.manual_seed(4)
    model = Bottleneck().eval()
    state = copy.deepcopy(model.state_dict())
    out, report = compress_model(model, rank=0.3, decomposition="auto", input_size=(1, 3, 8, 8), progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    rows = {r["name"]: r for r in report.rows}
    for name in ("reduce", "expand"):
        assert isinstance(out.get_submodule(name), SVDConv2d) and rows[name]["decomposition"] == "svd"
        assert rows[name]["macs_after"] == 8 * 8 * rows[name]["rank"] * 40
    assert not isinstance(out.conv, SVDConv2d)
    _, cp_report = compress_model(model, rank=2, input_size=(1, 3, 8, 8), progress=False)
    assert {r["name"]: r["skipped"] for r in cp_report.rows}["reduce"].startswith("1x1 conv: decomposition='cp'")
    named, named_report = compress_model(model, rank={"reduce": 2}, progress=False)
    assert isinstance(named.reduce, SVDConv2d) and named.reduce.rank == 2
    fresh = Bottleneck()
    from cpkernels import apply_structure

    apply_structure(fresh, named_report.structure).load_state_dict(named.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh(x), named(x))


def test_the_gpu_plan_models_two_gemms_or_dense():
    """A compute-bound 1x1 conv (2048 channels) runs as two GEMMs at a low rank; a memory-bound one (256
    channels at 56x56, where the intermediate's bytes cost more than the MACs saved) stays dense."""
    wide = gpu.model_plan(ConvShape(64, 2048, 2048, (14, 14), (1, 1), padding=0), 64, torch.float16,
                          gpu.GPUS["h100"], family="svd")
    assert set(wide.modeled_us) == set(gpu.SVD_STRATEGIES) and wide.chosen == "two-stage"
    shape = ConvShape(8, 256, 256, (56, 56), (1, 1), padding=0)
    assert gpu.model_plan(shape, 16, torch.float16, gpu.GPUS["h100"], family="svd").chosen == "dense"
    with pytest.raises(ValueError, match="family must be one of"):
        gpu.model_plan(shape, 16, torch.float16, gpu.GPUS["h100"], family="svd2")
