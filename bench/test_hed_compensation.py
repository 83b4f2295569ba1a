"""Smoke test of bench/hed_compensation.py at a tiny size on HED's real weights: a plan, both compensations, a
short distillation and the table."""
import json

import torch

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
    assert row["distill"]["inputs"] == "photos" and row["distill"]["target"] == "tanh:0.5"
    assert not row["compensated_cached"] and not row["relu_cached"]


def test_a_second_run_starts_from_the_cached_compensation(tmp_path, monkeypatch):
    tiny_settings(monkeypatch)
    monkeypatch.setitem(hed_compensation.DISTILL, "crop", (32, 32))
    args = ["--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--budgets", "0.25", "--decompositions",
            "cp", "--fits", "relu"]
    assert hed_compensation.main([*args, "--steps", "0"]) == 0
    (first,) = json.loads((tmp_path / "hed_compensation.json").read_text())["rows"]
    assert (tmp_path / "cache" / "cp-data-0.25-relu-48x64.pt").exists() and not first["relu_cached"]
    assert hed_compensation.main([*args, "--steps", "2", "--distill-inputs", "crops", "--distill-target", "prob"]) == 0
    (second,) = json.loads((tmp_path / "hed_compensation.json").read_text())["rows"]
    # the compensated model, its seconds and its report are the first run's; the distillation is this run's
    assert second["relu_cached"] and second["f1_relu"] == first["f1_relu"] and second["relu_s"] == first["relu_s"]
    assert second["relu_layers"] == first["relu_layers"]
    assert second["distill"]["inputs"] == "crops" and set(second["f1_distilled"]) == set(hed.JUDGING_PHOTOS)
    md = (tmp_path / "hed_compensation.md").read_text()
    assert " (cached) |" in md and "random 32x32 crops" in md and "the fused probability" in md
    # a row read back from the file (its crop size a JSON list) under a run of the same recipe names no recipe of its
    # own; under another recipe it does
    assert hed_compensation.main([*args, "--steps", "2", "--distill-inputs", "crops", "--distill-target", "prob",
                                  "--calibration-size", "32", "48"]) == 0
    assert "(2 steps of" not in (tmp_path / "hed_compensation.md").read_text()
    assert hed_compensation.main([*args, "--steps", "2", "--calibration-size", "32", "48"]) == 0
    md = (tmp_path / "hed_compensation.md").read_text()
    assert md.count("(2 steps of 1 random 32x32 crops of the calibration photos a step") == 1


def test_distillation_inputs_are_whole_photos_in_a_seeded_order():
    photos = [torch.full((1, 3, 4, 4), float(k)) for k in range(5)]
    o = dict(hed_compensation.DISTILL, steps=7, batch=2, inputs="photos")
    batches = hed_compensation.distill_inputs(photos, o)
    assert len(batches) == 7 and all(b.shape == (2, 3, 4, 4) for b in batches)
    seen = [int(b[k, 0, 0, 0]) for b in batches for k in range(2)]
    assert sorted(seen[:5]) == [0, 1, 2, 3, 4] and seen[5:10] == seen[:5]  # every photo once per pass, then again
    assert seen == [int(b[k, 0, 0, 0]) for b in hed_compensation.distill_inputs(photos, o) for k in range(2)]
    assert seen != [int(b[k, 0, 0, 0]) for b in hed_compensation.distill_inputs(photos, dict(o, seed=1))
                    for k in range(2)]


def test_distill_targets_see_hed_through_its_logits():
    net = hed.HED().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        sides = net.side_outputs(x)
        assert torch.equal(hed_compensation.DistillTarget(net, "prob")(x), net(x))
        assert torch.equal(hed_compensation.DistillTarget(net, "tanh:0.5")(x), torch.tanh(sides[-1] / 0.5))
        assert torch.equal(hed_compensation.DistillTarget(net, "sides")(x), torch.cat(sides, 1))


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
