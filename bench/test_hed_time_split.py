"""Smoke test of bench/hed_time_split.py at a tiny size on HED's real weights: the parts add up to the total, every
conv is clocked, and the ceiling follows from the parts."""
import json

import pytest
import torch
from torch import nn

from bench import hed_time_split

from .hed_smoke import skip_without_hed, tiny_settings

skip_without_hed()


def test_the_parts_add_up_to_the_total(tmp_path, monkeypatch):
    tiny_settings(monkeypatch)
    args = ["--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--configs", "cp-data-0.25", "--runs", "2"]
    assert hed_time_split.main(args) == 0
    data = json.loads((tmp_path / "hed_time_split.json").read_text())
    dense, cp = data["rows"]
    assert (dense["model"], cp["model"]) == ("dense", "cp-data-0.25")
    for row in data["rows"]:
        # 13 3x3 convs, 5 side outputs and the fusion, each clocked
        assert len(row["convs_ms"]) == 19 and all(v > 0 for v in row["convs_ms"].values())
        assert row["rest_ms"] > 0 and row["budget_convs_ms"] < row["total_ms"]
        assert row["ceiling"] == pytest.approx(dense["total_ms"] / (row["total_ms"] - row["budget_convs_ms"]))
    assert dense["speedup"] == 1.0 and dense["ceiling"] > 1.0
    text = (tmp_path / "hed_time_split.md").read_text()
    assert "| dense | " in text and "| cp-data-0.25 | " in text and "| conv1_2 | " in text


def test_each_model_in_each_memory_format(tmp_path, monkeypatch):
    tiny_settings(monkeypatch)
    args = ["--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--configs", "cp-data-0.25", "--runs", "1",
            "--memory-formats", "contiguous_format", "channels_last"]
    assert hed_time_split.main(args) == 0
    rows = json.loads((tmp_path / "hed_time_split.json").read_text())["rows"]
    assert [(r["model"], r["memory_format"]) for r in rows] == [
        ("dense", "contiguous_format"), ("cp-data-0.25", "contiguous_format"),
        ("dense (channels_last)", "channels_last"), ("cp-data-0.25 (channels_last)", "channels_last")]
    dense, cp, dense_cl, cp_cl = rows
    assert dense["speedup_same_format"] == dense_cl["speedup_same_format"] == 1.0
    assert cp_cl["speedup_same_format"] == pytest.approx(dense_cl["total_ms"] / cp_cl["total_ms"])
    assert cp_cl["speedup"] == pytest.approx(dense["total_ms"] / cp_cl["total_ms"])
    # every conv of the channels_last rows was clocked on its own calls
    assert all(v > 0 for v in cp_cl["convs_ms"].values()) and len(cp_cl["convs_ms"]) == 19


def test_the_clock_reads_each_call_and_is_removed():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU(), nn.Conv2d(1, 1, 1))
    clock = hed_time_split.ConvClock(model)
    model(torch.randn(1, 1, 4, 4))
    assert set(clock.spent) == {"0", "2"} and all(s > 0 for s in clock.spent.values())
    clock.reset()
    assert set(clock.spent.values()) == {0.0}
    clock.remove()
    model(torch.randn(1, 1, 4, 4))
    assert set(clock.spent.values()) == {0.0}


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.side1 = nn.Conv2d(2, 1, 1)

    def forward(self, x):
        return torch.sigmoid(self.side1(torch.relu(self.conv1(x))))


def test_one_call_splits_into_budget_head_and_rest():
    model = _Tiny()
    clock = hed_time_split.ConvClock(model)
    split = hed_time_split.split_once(model, clock, torch.randn(1, 1, 8, 8))
    assert split["budget_convs"] == split["convs"]["conv1"] > 0  # a 3x3 conv: the budget's
    assert split["head_convs"] == split["convs"]["side1"] > 0  # hed.HEAD_PATTERNS: the head's
    assert split["rest"] > 0
    assert split["budget_convs"] + split["head_convs"] + split["rest"] == pytest.approx(split["total"], abs=1e-12)
