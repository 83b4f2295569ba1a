"""Smoke test of bench/digits_compensation.py: both networks end to end at one budget, briefly trained (planning,
compensation, distillation, the table)."""
import json

import pytest

from bench import digits_compensation
from cpkernels.tools.bottleneck import trained_bottleneck_net
from cpkernels.tools.digits import trained_cnn

pytest.importorskip("sklearn", reason="the digits data ship with scikit-learn")


def test_both_networks_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(digits_compensation, "NETWORKS", {
        "cnn": (lambda: trained_cnn(0, epochs=2), "cp", (0.25,)),
        "bottleneck": (lambda: trained_bottleneck_net(0, epochs=2), "cp", (0.5,)),
    })
    for key, value in dict(calibration_batches=4, distill_epochs=1, n_iter_max=2).items():
        monkeypatch.setitem(digits_compensation.SETTINGS, key, value)
    assert digits_compensation.main(["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "digits_compensation.json").read_text())["rows"]
    assert [(r["network"], r["budget"]) for r in rows] == [("cnn", 0.25), ("bottleneck", 0.5)]
    for r in rows:
        assert 0 < r["macs_fraction"] <= r["budget"] + 1e-9 and r["ranks"]
        for step in ("plan", "compensated", "distilled"):
            assert 0 <= r[f"acc_{step}"] <= 100 and r[f"change_{step}"] >= 0
        assert r["plan_s"] > 0 and r["compensate_s"] > 0 and r["distill_s"] > 0
    assert "| cnn (" in (tmp_path / "digits_compensation.md").read_text()
