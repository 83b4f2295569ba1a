"""Every autotune config compiles for real GPUs (no GPU needed): no spills, tensor cores on 16-bit."""
import pytest

aot = pytest.importorskip("cpkernels.tools.aot")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_config_compiles_without_spills(arch):
    from cpkernels.kernels import rows as rows_k
    from cpkernels.kernels import taps as taps_k
    from cpkernels.kernels import wide as wide_k

    rows = aot.compile_report(arch)
    # x4: whole-rank and sliced paths, each on CP factors and on folded (Tucker-2) tap weights
    taps = 4 * (2 * len(taps_k.TILES_16BIT) + len(taps_k.TILES_FP32))
    rows_kernel = 2 * (2 * len(rows_k.ROWS_TILES_16BIT) + len(rows_k.ROWS_TILES_FP32))  # x2: vertical stride 1, 2
    hopper_only = wide_k.WIDE_TILES_16BIT_SM90 if arch == "sm_90" else ()
    wide = 2 * (len(wide_k.WIDE_TILES_16BIT) + len(hopper_only)) + len(wide_k.WIDE_TILES_FP32)
    assert len(rows) == taps + rows_kernel + wide
    for row in rows:
        assert set(row) == set(aot.REPORT_KEYS)
        assert row["spill_bytes"] == 0, row
        assert 0 < row["registers"] <= 255, row
        if row["dtype"] in ("fp16", "bf16"):
            assert row["tensor_cores"], row
    assert "| config |" in aot.format_table(rows)
