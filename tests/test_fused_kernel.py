"""The fused Triton kernel against the float64 oracle (under TRITON_INTERPRET=1 without a GPU)."""
import pytest
import torch

from cpkernels import CPConv2d, CPFactors, cp_conv2d
from cpkernels.core.conv_args import is_channels_last

from .cases import CONV_CASES, case
from .oracle import assert_matches_oracle, oracle_conv2d, random_factors

fused = pytest.importorskip("cpkernels.kernels.cp_conv2d_fused")


@pytest.fixture(params=["auto", "taps", "wide"], ids=["rows-where-it-applies", "taps-kernel", "wide-kernel"])
def kernel(request, monkeypatch):
    """Every parity case runs three times: as dispatched (the rows kernel for 3x3, vertical stride 1),
    through the general taps kernel, and through the wide kernel (which runs any shape)."""
    monkeypatch.setattr(fused, "DEFAULT_KERNEL", request.param)
    return request.param


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output the kernel allocates starts as NaN, so an element it fails to write shows up."""
    original = fused.new_output

    def nan_output(shape, x):
        return original(shape, x).fill_(float("nan"))

    monkeypatch.setattr(fused, "new_output", nan_output)


def run_case(c, dtype, device, **op_kwargs):
    factors = random_factors(c.cout, c.cin, c.kernel_size, c.rank, c.groups, dtype=dtype, device=device)
    bias = torch.randn(c.cout, dtype=dtype, device=device) if c.bias else None
    x = c.make_input(dtype, device)
    y = cp_conv2d(x, factors, bias, **c.conv_kwargs(), backend="triton", **op_kwargs)
    assert_matches_oracle(y, oracle_conv2d(x, factors, bias, **c.conv_kwargs()), dtype)
    assert is_channels_last(y) == is_channels_last(x)
    return y


@pytest.mark.parametrize("c", CONV_CASES)
def test_fused_fp32_matches_oracle(c, device, kernel):
    run_case(c, torch.float32, device)


FP16_CASES = [
    case("fp16-basic", 8, 6, (3, 3), 4, padding=1),
    case("fp16-stride2-dilation2", 16, 12, (3, 3), 8, size=(15, 13), stride=2, dilation=2, padding=2),
    case("fp16-same-even", 8, 6, (2, 4), 4, padding="same"),
    case("fp16-groups2-no-bias", 8, 6, (3, 3), 4, padding=1, groups=2, bias=False),
    case("fp16-channels-last-off-block", 40, 33, (3, 3), 36, size=(7, 9), padding=1, layout="channels_last"),
    case("fp16-5x5", 3, 2, (5, 5), 2, size=(12, 12), padding=2),
]


@pytest.mark.parametrize("c", FP16_CASES)
def test_fused_fp16_matches_oracle(c, device, kernel):
    run_case(c, torch.float16, device)


# Ranks past 128 (trained networks run R = 0.5-1.25 C): what "auto" sends to the wide kernel. Off-block
# sizes everywhere, groups, stride 2, both layouts, odd kernels, dilation.
WIDE_CASES = [
    case("r129-off-block", 20, 13, (3, 3), 129, size=(7, 10), padding=1),
    case("r200-stride2-channels-last", 24, 33, (3, 3), 200, size=(9, 12), stride=2, padding=1,
         layout="channels_last"),
    case("r160-groups2-no-bias", 16, 12, (3, 3), 160, size=(6, 9), padding=1, groups=2, bias=False),
    case("r640-5x3-dilated", 12, 10, (5, 3), 640, size=(9, 11), dilation=(1, 2), padding=(2, 2)),
    case("r300-same-even-strided-view", 10, 7, (2, 4), 300, size=(7, 9), padding="same", layout="strided"),
    case("r257-stride-per-axis-batch1", 9, 17, (3, 3), 257, size=(11, 8), batch=1, stride=(2, 1), padding=1),
]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("c", WIDE_CASES)
def test_wide_ranks_match_oracle(c, dtype, device):
    run_case(c, dtype, device)
    assert fused.best_config()["kernel"] == "wide"


def cancelling_factors(cout, cin, kernel_size, rank, delta=0.04, dtype=torch.float64) -> CPFactors:
    """Pairs of rank-one terms that nearly cancel (the second of each pair has ``H * (1 + delta)``), as
    in trained layers at R ~ C, only more so."""
    f = random_factors(cout, cin, kernel_size, rank // 2, dtype=dtype)
    return CPFactors(torch.cat([f.output, -f.output], -1), torch.cat([f.input, f.input], -1),
                     torch.cat([f.vertical, f.vertical], -1), torch.cat([f.horizontal, f.horizontal * (1 + delta)], -1))


def test_wide_kernel_keeps_the_intermediate_exact(device):
    """The wide kernel feeds the rank-R intermediate to the output GEMM unrounded (hi + lo halves in
    16-bit): with terms that cancel more than trained layers' do (40-80x), its fp16 output stays within 2x
    the dense fp16 conv's error. The four-stage path, which rounds its intermediates to fp16, does not:
    the test can tell."""
    factors = cancelling_factors(12, 16, (3, 3), 144).to(device=device, dtype=torch.float16)
    assert factors.cancellation() > 40
    x = torch.randn(2, 16, 9, 10, device=device).half()
    exact = oracle_conv2d(x, factors, padding=1)  # the same fp16 inputs and factors, float64 maths

    def err(y):
        return ((y.double() - exact).norm() / exact.norm()).item()

    # The dense conv of the weight rounded to fp16 (fp32 accumulation, as cuDNN's), rounded to fp16.
    weight = factors.to(torch.float64).to_dense().half()
    dense = torch.nn.functional.conv2d(x.float(), weight.float(), padding=1).half()
    wide = fused.cp_conv2d_fused(x, factors.input, factors.vertical, factors.horizontal, factors.output, None,
                                 (1, 1), (1, 1, 1, 1), (1, 1), kernel="wide")
    four_stage = cp_conv2d(x, factors, padding=1, backend="reference")
    assert err(wide) <= 2 * err(dense), (err(wide), err(dense))
    assert err(four_stage) > 2 * err(dense), (err(four_stage), err(dense))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter has no bf16 arithmetic")
@pytest.mark.parametrize("c", FP16_CASES)
def test_fused_bf16_matches_oracle(c, device):
    run_case(c, torch.bfloat16, device)


@pytest.mark.parametrize("which", ["rows", "taps"])
@pytest.mark.parametrize(
    "force_int64", [pytest.param(False, id="int32-offsets"), pytest.param(True, id="int64-offsets")]
)
def test_offset_width_paths_agree(force_int64, which, device):
    factors = random_factors(12, 10, (3, 3), 6, device=device)
    bias = torch.randn(12, device=device)
    x = torch.randn(2, 10, 9, 7, device=device)
    out = torch.full((2, 12, 9, 7), float("nan"), device=device)
    fused.cp_conv2d_fused(
        x, factors.input, factors.vertical, factors.horizontal, factors.output, bias,
        (1, 1), (1, 1, 1, 1), (1, 1), out=out, force_int64=force_int64, kernel=which,
    )
    assert_matches_oracle(out, oracle_conv2d(x, factors, bias, padding=1), torch.float32)


def test_rows_kernel_refuses_shapes_it_cannot_run():
    factors = random_factors(6, 8, (3, 3), 4)
    args = (torch.randn(1, 8, 9, 9), factors.input, factors.vertical, factors.horizontal, factors.output, None)
    with pytest.raises(ValueError, match="rows kernel needs"):
        fused.cp_conv2d_fused(*args, (3, 1), (1, 1, 1, 1), (1, 1), kernel="rows")
    with pytest.raises(ValueError, match="kernel must be"):
        fused.cp_conv2d_fused(*args, (1, 1), (1, 1, 1, 1), (1, 1), kernel="winograd")


def test_int64_switch_is_taken_past_int32():
    big = torch.empty((2**31,), device="meta")
    small = torch.empty((2**31 - 1,), device="meta")
    assert fused.needs_int64(small, big)
    assert not fused.needs_int64(small, None)


def test_fused_float64_takes_the_reference_path(device):
    """The kernel accumulates in fp32: float64 must not silently lose precision."""
    factors = random_factors(6, 8, (3, 3), 4, dtype=torch.float64, device=device)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64, device=device)
    y = cp_conv2d(x, factors, padding=1, backend="triton")
    assert_matches_oracle(y, oracle_conv2d(x, factors, padding=1), torch.float64)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    factors = random_factors(6, 8, (3, 3), 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cp_conv2d(torch.randn(1, 8, 5, 5), factors, backend="triton")


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(padding=1), id="pad1-bias"),
        pytest.param(dict(padding="same", kernel_size=(2, 4), groups=2, bias=False), id="same-even-groups2-no-bias"),
        pytest.param(dict(stride=2, kernel_size=(3, 1), dilation=(2, 1)), id="stride2-dilated"),
    ],
)
def test_module_gradients_through_fused_forward(device, kwargs):
    """Eager fused forward (autograd.Function, reference backward) against the reference path's own autograd."""
    kwargs = {"kernel_size": 3, **kwargs}
    conv = CPConv2d(8, 6, rank=4, device=device, backend="triton", **kwargs)
    ref = CPConv2d(8, 6, rank=4, device=device, backend="reference", **kwargs)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 7, 7, device=device, requires_grad=True)
    grads = []
    for m in (conv, ref):
        x.grad = None
        m.zero_grad()
        m(x).square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_latest_launch_is_reported(device):
    factors = random_factors(6, 8, (3, 3), 4, device=device)
    x = torch.randn(1, 8, 9, 9, device=device)
    cp_conv2d(x, factors, padding=1, backend="triton")
    assert fused.best_config()["kernel"] == "rows"
    cp_conv2d(x, factors, padding=1, stride=3, backend="triton")
    assert fused.best_config()["kernel"] == "taps" and "BLOCK_P" in fused.best_config()


def _every_tile():
    """One param per tile of every tile table: (kernel, tile, dtype the table is for)."""
    params = []
    for kernel, tiles in (("taps", fused.TAPS_TILES), ("rows", fused.ROWS_TILES), ("wide", fused.WIDE_TILES)):
        for table, dtype in ((tiles.tiles_16bit + tiles.tiles_16bit_sm90, torch.float16),
                             (tiles.tiles_fp32, torch.float32)):
            for tile in table:
                name = "-".join(f"{n}{v}" for n, v in zip(tiles.names + ("w", "s"), tile))
                params.append(pytest.param(kernel, tile, dtype, id=f"{kernel}-{str(dtype)[6:]}-{name}"))
    return params


@pytest.mark.parametrize("kernel_name, tile, dtype", _every_tile())
def test_every_tile_matches_oracle(monkeypatch, device, kernel_name, tile, dtype):
    """Each tile the autotuner may pick, alone, on a problem that is off its blocks in every dimension:
    two channel blocks (the second partly masked), two output-channel blocks, several programs, and for
    the taps kernel both rank paths (rank under BLOCK_R, and over it)."""
    import triton

    tiles = {"taps": fused.TAPS_TILES, "rows": fused.ROWS_TILES, "wide": fused.WIDE_TILES}[kernel_name]
    autotuner = {"taps": fused.cp_conv2d_taps_kernel, "rows": fused.cp_conv2d_rows_kernel,
                 "wide": fused.cp_conv2d_wide_kernel}[kernel_name]
    blocks = dict(zip(tiles.names, tile[:-2]))
    monkeypatch.setattr(tiles, "for_dtype", lambda *_: (tile,))
    monkeypatch.setattr(autotuner, "configs", [triton.Config(blocks, num_warps=tile[-2], num_stages=tile[-1])])
    monkeypatch.setattr(autotuner, "cache", {})  # no best config remembered from another test
    monkeypatch.setattr(fused, "DEFAULT_KERNEL", kernel_name)
    cin, cout = blocks["BLOCK_C"] + 5, blocks["BLOCK_O"] + 3
    if kernel_name == "taps":
        ranks, size = (blocks["BLOCK_R"] - 3, blocks["BLOCK_R"] + 5), (9, 11)
    elif kernel_name == "rows":
        ranks, size = (blocks["BLOCK_R"] - 3,), (blocks["ROWS"] + 3, blocks["BLOCK_W"] + 5)
    else:  # two rank slices, two bands (the second partial), two strips, several stage-1 tiles
        ranks, size = (blocks["BLOCK_R"] + 5,), (blocks["ROWS"] + 3, blocks["BLOCK_W"] + 5)
    for rank in ranks:
        c = case("tile", cin, cout, (3, 3), rank, size=size, padding=1, batch=2 if kernel_name == "taps" else 1)
        run_case(c.values[0], dtype, device)
    assert fused.best_config() == {"kernel": kernel_name, **blocks, "num_warps": tile[-2], "num_stages": tile[-1]}


def test_autotune_switch(monkeypatch):
    """CPKERNELS_AUTOTUNE=0 keeps the first fitting tile; by default every fitting tile is timed."""
    import triton

    tiles = fused.TAPS_TILES
    monkeypatch.setattr(tiles, "for_dtype", lambda *_: tiles.tiles_16bit)
    configs = [triton.Config(dict(zip(tiles.names, t[:-2])), num_warps=t[-2], num_stages=t[-1])
               for t in tiles.tiles_16bit]
    big = {"x_ptr": torch.empty(1, dtype=torch.float16), "RANK": 200, "C_OUT_G": 256, "C_IN_G": 256}
    assert tiles.prune(configs, big) == configs
    monkeypatch.setenv("CPKERNELS_AUTOTUNE", "0")
    assert tiles.prune(configs, big) == configs[:1]
    narrow = {**big, "C_IN_G": 16}  # the first tile's BLOCK_C = 32 is wider than 16 channels
    assert [tiles.tile_of(c) for c in tiles.prune(configs, narrow)] == [(64, 16, 32, 128, 8, 2)]
