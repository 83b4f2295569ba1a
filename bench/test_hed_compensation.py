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
