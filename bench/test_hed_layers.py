"""Smoke test of bench/hed_layers.py: two of HED's convs (one the configuration keeps dense) at a tiny size, one
thread and one round, on HED's real weights: every form and stage timed, the JSON's and the table's structure, and
the checks that stop it."""
import json

import pytest

from bench import hed_layers
from cpkernels.dispatch import cpu as cpu_dispatch
from cpkernels.ops.cp_arranged import merged_depthwise_weight

from .hed_smoke import skip_without_hed

skip_without_hed(photos=False)

LAYERS = ["conv1_1", "conv2_2"]  # conv1_1 is kept dense at cp-data-0.25
ARGS = ["--size", "32", "48", "--threads", "1", "--runs", "1", "--layers", *LAYERS]


def test_layers_and_stages(tmp_path):
    assert hed_layers.main(["--out", str(tmp_path), *ARGS]) == 0
    data = json.loads((tmp_path / "hed_layers.json").read_text())
    rows = {r["name"]: r for r in data["layers"]}
    assert list(rows) == LAYERS
    kept, factored = rows["conv1_1"], rows["conv2_2"]
    assert kept["rank"] is None and list(kept["forms"]) == ["dense"] and kept["stages"] == {}
    assert factored["rank"] == 192 and factored["input"] == [1, 128, 16, 24]
    assert set(factored["forms"]) <= set(hed_layers.FORMS)
    assert {"dense", "cp", "staged", "tucker2"} <= set(factored["forms"])
    assert set(factored["compile"]) == {"compiled", "compiled-arranged"}
    for form, entry in factored["compile"].items():  # compiled and timed, or the failure recorded
        assert entry["seconds"] > 0 and (form in factored["forms"]) == (entry["error"] is None)
    assert all(e["ms"] > 0 and e["gmacs"] > 0 for e in factored["forms"].values())
    assert factored["staged"]["arrangement"] == "pixel-major"  # rank >= 16, NCHW, no groups
    assert factored["plan"]["arrangement"] in ("pixel-major", "dense-weight")
    assert set(factored["stages"]) == {"weights", "stage1", "depthwise", "stage4"}
    assert all(e["ms"] > 0 for e in factored["stages"].values())
    for stage in ("stage1", "depthwise", "stage4"):
        assert factored["stages"][stage]["gmacs"] > 0
    assert factored["allocation"]["ms"] > 0 and factored["allocation"]["bytes"] == 4 * 16 * 24 * (192 + 192 + 128)
    assert sum(factored["stages"][s]["macs"] for s in ("stage1", "depthwise", "stage4")) == \
        factored["forms"]["staged"]["macs"]
    r_out, r_in = factored["tucker2_rank"]
    assert r_out == r_in  # 128 -> 128: the pair in the channels' ratio
    network = data["network"]
    assert network["ms"]["dense"] == pytest.approx(kept["forms"]["dense"]["ms"] + factored["forms"]["dense"]["ms"])
    assert set(network["stage_share"]) == {"weights", "stage1", "depthwise", "stage4", "rest"}
    markdown = (tmp_path / "hed_layers.md").read_text()
    assert "| conv2_2 | 16x24 | 128->128 | 192 | " in markdown
    assert "| conv1_1 | 32x48 | 3->64 | - | dense (kept) |" in markdown
    assert "Share of the whole-image stages' time" in markdown


def test_a_banded_layer_breaks_down_the_whole_image_stages(tmp_path, monkeypatch):
    # the plan bands an image whose rank-R intermediate exceeds CHUNK_BYTES: here every image
    monkeypatch.setattr(cpu_dispatch, "CHUNK_BYTES", 0)
    cpu_dispatch.clear_cache()
    assert hed_layers.main(["--out", str(tmp_path), *ARGS[:-2], "conv2_2", "--no-compile"]) == 0
    cpu_dispatch.clear_cache()
    row = json.loads((tmp_path / "hed_layers.json").read_text())["layers"][0]
    assert row["staged"]["arrangement"] == "banded" and row["staged"]["stages_of"] == "pixel-major"
    assert {"staged", "pixel-major"} <= set(row["forms"])
    assert sum(row["stages"][s]["macs"] for s in ("stage1", "depthwise", "stage4")) == \
        row["forms"]["pixel-major"]["macs"]
    assert "| conv2_2 | pixel-major | " in (tmp_path / "hed_layers.md").read_text()


def test_stages_checked_against_the_arranged_path(monkeypatch):
    # a stage that no longer computes what the library's arrangement does stops the profile
    monkeypatch.setattr(hed_layers, "merged_depthwise_weight", lambda v, h: 2 * merged_depthwise_weight(v, h))
    with pytest.raises(AssertionError, match="do not compute the arranged path"):
        hed_layers.main([*ARGS[:-2], "conv2_2", "--no-compile"])


def test_unknown_layer_and_configuration():
    with pytest.raises(SystemExit):
        hed_layers.main([*ARGS[:-2], "conv9_9"])
    with pytest.raises(ValueError, match="no row 'cp-data-0.3'"):
        hed_layers.main([*ARGS, "--config", "cp-data-0.3"])
    with pytest.raises(ValueError, match="Tucker-2 ranks"):
        hed_layers.main([*ARGS, "--config", "tucker2-data-0.25"])
