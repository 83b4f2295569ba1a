"""Smoke test of bench/hed_latency_plan.py at a tiny size on HED's real weights: a latency plan and a MAC plan end
to end (planning by a fake clock, compression, F1, the interleaved timing and the table)."""
import json

import pytest

from bench import hed_latency_plan
from cpkernels.compression import ranks
from cpkernels.core.conv_args import is_channels_last
from cpkernels.tools import hed

from .hed_smoke import skip_without_hed, tiny_settings

skip_without_hed()


def _parameters_times_pixels(layer, x) -> float:
    return float(sum(p.numel() for p in layer.parameters()) * x.shape[-2] * x.shape[-1])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_a_latency_plan_and_a_mac_plan_end_to_end(tmp_path, monkeypatch, channels_last):
    # The plan's clock is faked (about the MACs): at this size, on two busy cores, real timings found no candidate
    # faster than dense by the margin, and no budget could be met. The timing of the whole networks stays real.
    layouts = []

    def clock(layer, x):
        layouts.append(is_channels_last(x))
        return _parameters_times_pixels(layer, x)
    monkeypatch.setattr(ranks, "_LATENCY_US", {})
    monkeypatch.setattr(ranks, "_time_layer", clock)
    monkeypatch.setitem(hed_latency_plan.SETTINGS, "memory_format", "contiguous_format")  # main() sets it
    tiny_settings(monkeypatch, calibration_size=(32, 48))
    monkeypatch.setitem(hed_latency_plan.SETTINGS, "ladder", (0.3, 0.1))
    monkeypatch.setitem(hed_latency_plan.SETTINGS, "runs", 1)
    args = ["--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--budgets", "0.9", "--macs",
            "cp-uniform-0.25"] + (["--channels-last"] if channels_last else [])
    assert hed_latency_plan.main(args) == 0
    assert layouts and all(layout == channels_last for layout in layouts)  # every candidate timed in that layout
    data = json.loads((tmp_path / "hed_latency_plan.json").read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == ["latency-0.9", "cp-uniform-0.25"]
    latency = rows["latency-0.9"]
    assert 0 < latency["time_fraction"] <= 0.9 and 0 < latency["macs_fraction"] <= 1
    assert set(latency["ranks"]) == set(hed.CONV_NAMES) and sum(latency["forms"].values()) == len(hed.CONV_NAMES)
    assert set(latency["forms"]) <= {"cp", "tucker2", "dense"} and latency["ranks"]["conv1_1"] is None  # skip_first
    for r in rows.values():
        assert all(0 <= f <= 1 for f in r["f1"].values()) and set(r["f1"]) == set(hed.JUDGING_PHOTOS)
        assert r["plan_s"] > 0 and r["dense_ms"] > 0 and r["compressed_ms"] > 0
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["compressed_ms"])
    table = (tmp_path / "hed_latency_plan.md").read_text()
    assert f"Planned and timed on {'channels_last' if channels_last else 'contiguous_format'} inputs" in table
    assert "| latency, auto | 0.9 |" in table and "| cp-uniform (MACs) | 0.25 |" in table
    with pytest.raises(SystemExit, match="a budget is a fraction"):
        hed_latency_plan.main(["--budgets", "1.5"])
