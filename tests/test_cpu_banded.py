"""The CPU path's banded arrangement (cpkernels/ops/cp_banded.py) against the float64 oracle: every conv semantic,
bands that split the image unevenly, both layouts, NaN-poisoned outputs; and where the CPU plan takes it."""
import pytest
import torch

from cpkernels import cp_conv2d
from cpkernels.core.conv_args import is_channels_last
from cpkernels.dispatch import cpu as cpu_dispatch
from cpkernels.ops import cp_arranged, cp_banded

from .cases import CONV_CASES
from .oracle import assert_matches_oracle, oracle_conv2d, random_factors


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every output the banded arrangement allocates starts as NaN, so an element no band writes fails the oracle."""
    original = cp_banded.new_output
    monkeypatch.setattr(cp_banded, "new_output", lambda shape, x: original(shape, x).fill_(float("nan")))


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
    original = cp_arranged.cp_conv2d_banded
    monkeypatch.setattr(cp_arranged, "cp_conv2d_banded", lambda *args: ran.append(args[-1]) or original(*args))
    yield ran
    cpu_dispatch.clear_cache()


@pytest.mark.parametrize("c", [p for p in CONV_CASES if p.values[0].groups == 1])
def test_banded_matches_oracle(banded_calls, c):
    factors = random_factors(c.cout, c.cin, c.kernel_size, c.rank)
    bias = torch.randn(c.cout) if c.bias else None
    x = c.make_input(torch.float32, "cpu")
    y = cp_conv2d(x, factors, bias, **c.conv_kwargs(), backend="auto")
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
def test_band_heights(poisoned_outputs, band_rows, layout, stride, padding, dilation):
    factors = random_factors(7, 5, (3, 2), 11)  # a rank off the alignment: padded with zero components
    bias = torch.randn(7)
    x = torch.randn(2, 5, 13, 12)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    y = cp_banded.cp_conv2d_banded(x, factors.input, factors.vertical, factors.horizontal, factors.output, bias, stride,
                                   padding, dilation, band_rows)
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
