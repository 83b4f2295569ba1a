"""Smoke test of bench/hed_methods.py: two configurations end to end at a tiny size (planning, the cache, F1,
interleaved timing, the table and the plot), on HED's real weights."""
import json

import pytest

from bench import hed_methods
from cpkernels.tools import hed

from .hed_smoke import skip_without_hed, tiny_settings

pytest.importorskip("matplotlib", reason="the plot needs matplotlib")
skip_without_hed()


def test_two_configurations_end_to_end(tmp_path, monkeypatch):
    tiny_settings(monkeypatch, runs=1)
    args = ["--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--only", "cp-data-0.25", "cp-uniform-0.0625"]
    assert hed_methods.main(args) == 0
    data = json.loads((tmp_path / "hed_methods.json").read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == {"cp-data-0.25", "cp-uniform-0.0625"}
    for r in rows.values():
        assert 0 < r["macs_fraction"] <= float(r["config"].split("-")[-1]) + 1e-9
        assert all(0 <= f <= 1 for f in r["f1"].values()) and set(r["f1"]) == set(hed.JUDGING_PHOTOS)
        assert r["dense_ms"] > 0 and r["compressed_ms"] > 0
    assert set(rows["cp-data-0.25"]["ranks"]) == set(hed.CONV_NAMES)
    assert (tmp_path / "hed_methods.png").stat().st_size > 0
    assert "| cp | data | 0.25 |" in (tmp_path / "hed_methods.md").read_text()
    # the second run reads the cache (the same models, so the same F1) and keeps the row it did not rerun
    assert hed_methods.main(args[:4] + ["--only", "cp-data-0.25", "--no-time"]) == 0
    again = {r["config"]: r for r in json.loads((tmp_path / "hed_methods.json").read_text())["rows"]}
    assert list(again) == ["cp-uniform-0.0625", "cp-data-0.25"]  # the table's order
    assert again["cp-data-0.25"]["f1"] == rows["cp-data-0.25"]["f1"]
    assert again["cp-data-0.25"]["plan_s"] == rows["cp-data-0.25"]["plan_s"]
    assert "speedup" not in again["cp-data-0.25"] and again["cp-uniform-0.0625"] == rows["cp-uniform-0.0625"]
    # rows measured on another machine are refused, before any work
    data = json.loads((tmp_path / "hed_methods.json").read_text())
    data["environment"]["device"] = "another CPU (64 cores)"
    (tmp_path / "hed_methods.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="measured on another CPU"):
        hed_methods.main(args[:4] + ["--only", "cp-data-0.25", "--no-time"])
