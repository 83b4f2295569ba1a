"""Smoke test of the ResNet-50 whole-network budget benchmark: a width-8 network on 32x32 images, real numbers."""
import pytest

from bench.resnet50_budget import WITHOUT_1X1, run, to_markdown


def test_resnet50_budget_reports_shares_reachable_fractions_and_times():
    r = run(width=8, size=32, threads=1, repeats=1, n_iter_max=1)
    assert set(r["mac_shares"]) == {"1x1", "3x3", "7x7"} and all(0 < v < 1 for v in r["mac_shares"].values())
    assert sum(r["mac_shares"].values()) == pytest.approx(1.0, abs=1e-12)
    reach = r["reachable"]
    # Without the 1x1 convs a plan cannot go below their share of the MACs; with them it goes far lower.
    assert all(reach[d] >= r["mac_shares"]["1x1"] - 5e-4 for d in WITHOUT_1X1)
    assert 0 < reach["auto"] < min(reach[d] for d in WITHOUT_1X1)
    assert r["network_fraction"] <= 0.5 and r["macs_after"] <= 0.5 * r["macs_before"]
    assert r["dense_ms"] > 0 and r["compressed_ms"] > 0 and len(r["loadavg_before"]) == 3
    assert "Conv MACs per kernel size: 1x1" in to_markdown(r, {"device": "cpu", "torch": "x", "git_commit": "y"})
