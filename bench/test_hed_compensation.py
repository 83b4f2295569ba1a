"""Smoke test of bench/hed_compensation.py at a tiny size on HED's real weights: a plan, both compensations, a
short distillation and the table."""
import json

from bench import hed_compensation
from cpkernels.tools import hed

from .hed_smoke import skip_without_hed, tiny_settings

skip_without_hed()


def test_plan_compensation_and_distillation_end_to_end(tmp_path, monkeypatch):
    tiny_settings(monkeypatch)
    monkeypatch.setitem(hed_compensation.DISTILL, "crop", (32, 32))
    args = ["--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--budgets", "0.25", "--decompositions",
            "cp", "--steps", "2"]
    assert hed_compensation.main(args) == 0
    (row,) = json.loads((tmp_path / "hed_compensation.json").read_text())["rows"]
    assert row["config"] == "cp-data-0.25"
    for step in ("plan", "compensated", "relu", "distilled"):
        f1 = row[f"f1_{step}"]
        assert set(f1) == set(hed.JUDGING_PHOTOS) and all(0 <= f <= 1 for f in f1.values())
    # every factored conv of HED is read by a ReLU alone: the fit after the ReLU takes them all
    assert {r["fitted"] for r in row["relu_layers"]} == {"after ReLU"}
    assert {r["fitted"] for r in row["compensated_layers"]} == {"conv output"}
    assert [r["name"] for r in row["compensated_layers"]] == [r["name"] for r in row["relu_layers"]]
    assert "| cp | 0.25 |" in (tmp_path / "hed_compensation.md").read_text()


def test_one_fit_at_another_calibration_size(tmp_path, monkeypatch):
    tiny_settings(monkeypatch)
    monkeypatch.setitem(hed_compensation.DISTILL, "crop", (32, 32))
    args = ["--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--budgets", "0.25", "--decompositions",
            "cp", "--steps", "1", "--fits", "relu", "--calibration-size", "64", "96"]
    assert hed_compensation.main(args) == 0
    (row,) = json.loads((tmp_path / "hed_compensation.json").read_text())["rows"]
    assert row["calibration_size"] == [64, 96]
    assert "f1_compensated" not in row and "compensated_layers" not in row
    assert row["distilled_from"] == "relu" and set(row["f1_distilled"]) == set(hed.JUDGING_PHOTOS)
    # conv1_2 at full resolution saw the photo and its mirror at 64x96 (at the plan's 48x64: half the pixels)
    assert row["relu_layers"][0]["name"] == "conv1_2" and row["relu_layers"][0]["pixels"] == 2 * 64 * 96
    assert "| cp | 0.25 | " in (md := (tmp_path / "hed_compensation.md").read_text()) and "| 64x96 | - | - |" in md
    # a run at the plan's size adds its row; the 64x96 row stays, naming its commit
    assert hed_compensation.main([*args[:-2], "48", "64", "--steps", "0"]) == 0
    rows = json.loads((tmp_path / "hed_compensation.json").read_text())["rows"]
    assert [r["calibration_size"] for r in rows] == [[64, 96], [48, 64]] and "commit" in rows[0]
    assert "commit" not in rows[1] and "| 64x96 (commit " in (tmp_path / "hed_compensation.md").read_text()
