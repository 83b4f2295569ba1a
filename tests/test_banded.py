"""The CPU path's banded arrangement (cpkernels/ops/banded.py), CP's and Tucker-2's, against the float64 oracle: every
conv semantic, bands that split the image unevenly, both layouts, NaN-poisoned outputs; and where the CPU plan takes
it."""
import pytest
import torch

from cpkernels import cp_conv2d, tucker2_conv2d
from cpkernels.core.conv_args import is_channels_last
from cpkernels.dispatch import cpu as cpu_dispatch
from cpkernels.ops import banded, cp_arranged, tucker2_arranged

from .cases import CONV_CASES
from .oracle import assert_matches_oracle, oracle_conv2d, random_factors, random_tucker2


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every output the banded arrangement allocates starts as NaN, so an element no band writes fails the oracle."""
    original = banded.new_output
    monkeypatch.setattr(banded, "new_output", lambda shape, x: original(shape, x).fill_(float("nan")))


@pytest.fixture
def banded_calls(monkeypatch, poisoned_outputs):
    """The CPU plan takes the banded arrangement for every call without groups, one output row per band; returns
    the band heights it ran with."""
    monkeypatch.setattr(cpu_dispatch, "dense_is_cheaper", lambda *args: False)
    monkeypatch.setattr(cpu_dispatch, "MEASURE", False)
    monkeypatch.setattr(cpu_dispatch, "PIXEL_MAJOR_MIN_RANK", 1)
    monkeypatch.setattr(cpu_dispatch, "CHUNK_BYTES", 0)
    monkeypatch.setattr(cpu_dispatch, "BAND_BYTES", 1)
    cpu_dispatch.clear_cache()
    ran = []
    for module, name in ((cp_arranged, "cp_conv2d_banded"), (tucker2_arranged, "tucker2_conv2d_banded")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _f=original: ran.append(args[-1]) or _f(*args))
    yield ran
    cpu_dispatch.clear_cache()


@pytest.mark.parametrize("family", ["cp", "tucker2"])
@pytest.mark.parametrize("c", [p for p in CONV_CASES if p.values[0].groups == 1])
def test_banded_matches_oracle(banded_calls, c, family):
    if family == "cp":
        factors, op = random_factors(c.cout, c.cin, c.kernel_size, c.rank), cp_conv2d
    else:
        pair = (max(1, c.cout // 2), max(1, c.cin // 2 + 1))
        factors, op = random_tucker2(c.cout, c.cin, c.kernel_size, pair), tucker2_conv2d
    bias = torch.randn(c.cout) if c.bias else None
    x = c.make_input(torch.float32, "cpu")
    y = op(x, factors, bias, **c.conv_kwargs(), backend="auto")
    assert_matches_oracle(y, oracle_conv2d(x, factors, bias, **c.conv_kwargs()), torch.float32)
    assert is_channels_last(y) == is_channels_last(x)
    assert banded_calls == [1]


# Bands taller than one row, where the last band is shorter or the band covers the whole image, on the
# semantics that move a band's input rows: stride, dilation, padding on one side only, channels_last.
@pytest.mark.parametrize("band_rows", [2, 5, 64])
@pytest.mark.parametrize(
    "layout, stride, padding, dilation",
    [
        pytest.param("nchw", (1, 1), (1, 1, 1, 1), (1, 1), id="same"),
        pytest.param("channels_last", (2, 3), (2, 0, 1, 3), (1, 2), id="channels-last-strided-asymmetric"),
        pytest.param("nchw", (3, 1), (0, 3, 2, 0), (2, 1), id="strided-dilated-asymmetric"),
    ],
)
@pytest.mark.parametrize("family", ["cp", "tucker2"])
def test_band_heights(poisoned_outputs, family, band_rows, layout, stride, padding, dilation):
    bias = torch.randn(7)
    x = torch.randn(2, 5, 13, 12)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if family == "cp":
        factors = random_factors(7, 5, (3, 2), 11)  # a rank off the alignment: padded with zero components
        y = banded.cp_conv2d_banded(x, factors.input, factors.vertical, factors.horizontal, factors.output, bias,
                                    stride, padding, dilation, band_rows)
    else:
        factors = random_tucker2(7, 5, (3, 2), (6, 3))
        y = banded.tucker2_conv2d_banded(x, factors.input, factors.core, factors.output, bias, stride, padding,
                                         dilation, band_rows)
    top, bottom, left, right = padding
    expected = oracle_conv2d(torch.nn.functional.pad(x, (left, right, top, bottom)), factors, bias, stride=stride,
                             dilation=dilation)
    assert_matches_oracle(y, expected, torch.float32)
    assert is_channels_last(y) == is_channels_last(x)


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float64, id="float64"), pytest.param(torch.bfloat16, id="bfloat16")]
)
def test_banded_dtypes(banded_calls, dtype):
    """float64 runs banded in float64; 16-bit inputs run it on their fp32 copies, rounded once."""
    factors = random_factors(6, 8, (3, 3), 9, dtype=dtype)
    bias = torch.randn(6, dtype=dtype)
    x = torch.randn(2, 8, 10, 9, dtype=dtype)
    y = cp_conv2d(x, factors, bias, padding=1, backend="auto")
    assert_matches_oracle(y, oracle_conv2d(x, factors, bias, padding=1), dtype)
    assert banded_calls == [1]


def test_gradients_never_take_the_banded_arrangement(banded_calls):
    """The bands write with out=, which autograd cannot follow: a call that needs gradients runs whole-image stages."""
    factors = random_factors(6, 8, (3, 3), 9, dtype=torch.float64)
    x = torch.randn(2, 8, 10, 9, dtype=torch.float64, requires_grad=True)
    y = cp_conv2d(x, factors, None, padding=1, backend="auto")
    y.sum().backward()
    assert banded_calls == []
    assert_matches_oracle(y.detach(), oracle_conv2d(x.detach(), factors, None, padding=1), torch.float64)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_plan_bands_large_images_at_inference():
    """HED's first convs (one image's rank-R intermediate far above CHUNK_BYTES) run banded at inference, in bands
    whose stage-1 rows take about BAND_BYTES; smaller images, training and grouped layers keep their arrangements."""

    def plan(n, c, hw, rank, groups=1, needs_grad=False, memory_format=torch.contiguous_format, stride=1):
        x = torch.empty(n, c, *hw, device="meta").to(memory_format=memory_format)
        out = (hw[0] // stride, hw[1] // stride)
        return cpu_dispatch.staged_plan(x, rank, groups, c, (3, 3), out, (1, 1), needs_grad)

    conv1_2 = plan(1, 64, (416, 640), 77)
    assert conv1_2.arrangement == "banded"
    row_bytes = 640 * 80 * 4  # rank 77 aligned to 80
    assert conv1_2.chunk == cpu_dispatch.BAND_BYTES // row_bytes
    assert plan(1, 64, (416, 640), 77, memory_format=torch.channels_last).arrangement == "banded"
    assert plan(1, 128, (208, 320), 192, stride=2).chunk == cpu_dispatch.BAND_BYTES // (320 * 192 * 4 * 2)
    assert plan(1, 64, (416, 640), 77, needs_grad=True).arrangement == "pixel-major"
    assert plan(1, 64, (416, 640), 78, groups=2).arrangement == "nchw"
    assert plan(1, 512, (26, 40), 768).arrangement == "pixel-major"  # 3.2 MB: under CHUNK_BYTES


def test_tucker2_plan_bands_large_images_at_inference(monkeypatch):
    """Tucker-2's staged candidate is banded where its R_in intermediate exceeds CHUNK_BYTES, at inference only."""
    monkeypatch.setattr(cpu_dispatch, "MEASURE", False)
    monkeypatch.setattr(cpu_dispatch, "tucker2_dense_is_cheaper", lambda *args: False)
    cpu_dispatch.clear_cache()
    factors = random_tucker2(64, 64, (3, 3), (24, 24))
    big, small = torch.randn(1, 64, 300, 300), torch.randn(1, 64, 30, 30)  # 24 * 300^2 * 4 = 8.6 MB
    plan = tucker2_arranged.tucker2_cpu_plan(big, factors.input, factors.core, factors.output, None, [1, 1],
                                             [1, 1, 1, 1], [1, 1])
    assert plan == cpu_dispatch.Plan("banded", cpu_dispatch.BAND_BYTES // (300 * 24 * 4))
    assert tucker2_arranged.tucker2_cpu_plan(small, factors.input, factors.core, factors.output, None, [1, 1],
                                             [1, 1, 1, 1], [1, 1]).arrangement == tucker2_arranged.STAGES
    with torch.enable_grad():
        grad = tucker2_arranged.tucker2_cpu_plan(big, factors.input.requires_grad_(), factors.core, factors.output,
                                                 None, [1, 1], [1, 1, 1, 1], [1, 1])
    assert grad.arrangement == tucker2_arranged.STAGES
    cpu_dispatch.clear_cache()
