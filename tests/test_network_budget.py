"""plan_ranks' budget over the whole network: convs left dense count at their full cost, the plan shows both
fractions, the old meaning stays as budget_over="considered", and an unreachable budget is refused before any
work with the smallest reachable fraction."""
import json

import pytest
import torch
from torch import nn

from cpkernels import RankPlan, compress_model, plan_ranks
from cpkernels.compression import ranks as rank_plans
from cpkernels.compression.families import FAMILIES
from cpkernels.core.cost import ConvShape


def bottleneck_net() -> nn.Module:
    """A 1-in-channel first conv (never factored: one input channel), then a bottleneck: 1x1 -> 3x3 -> 1x1."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 32, 1))


def dense_macs_of_every_conv(model, x) -> dict[str, int]:
    """Counted from the outputs the convs produce (nothing of the package's cost model)."""
    macs = {}

    def hook(name):
        def record(m, args, y):
            macs[name] = y.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return macs


@pytest.mark.parametrize("decomposition", ["auto", "cp"])
def test_a_whole_network_budget_of_half_is_met_on_the_total_conv_macs(decomposition):
    model = bottleneck_net()
    x = torch.randn(1, 1, 12, 12)
    dense = dense_macs_of_every_conv(model, x)
    plan = plan_ranks(model, 0.5, input_size=tuple(x.shape), decomposition=decomposition, progress=False)
    rows = {r["name"]: r for r in plan.rows}
    assert not rows["0"]["considered"] and rows["0"]["cost_before"] == dense["0"]  # kept dense, counted in full
    assert {n: r["cost_before"] for n, r in rows.items()} == dense
    after = sum(r["cost_after"] for r in plan.rows)
    assert after <= 0.5 * sum(dense.values())
    assert plan.totals["network_fraction"] == pytest.approx(after / sum(dense.values()), rel=1e-12)
    assert plan.totals["fraction"] == plan.totals["network_fraction"]
    considered = [r for r in plan.rows if r["considered"]]
    assert plan.totals["considered_fraction"] == pytest.approx(
        sum(r["cost_after"] for r in considered) / sum(r["cost_before"] for r in considered), rel=1e-12)
    if decomposition == "auto":
        assert {rows[n]["decomposition"] for n in ("2", "6") if rows[n]["rank"] is not None} <= {"svd"}
    else:
        assert rows["2"]["reason"].startswith("1x1 conv")
    compressed, report = compress_model(model, plan)
    assert sum(r["macs_after"] for r in report.rows) == after


def test_the_old_meaning_is_budget_over_considered():
    model = bottleneck_net()
    """The dense first conv and 1x1 convs hold about 11 % of the MACs: 0.05 of the network is out of reach, 0.05 of
    the considered 3x3 conv is not."""
    plan = plan_ranks(model, 0.05, input_size=(1, 1, 12, 12), budget_over="considered", progress=False)
    t = plan.totals
    assert t["considered_fraction"] <= 0.05 < t["network_fraction"]
    assert t["fraction"] == t["considered_fraction"]
    with pytest.raises(ValueError, match="smallest reachable fraction"):
        plan_ranks(model, 0.05, input_size=(1, 1, 12, 12), progress=False)


def test_the_printout_and_json_show_both_fractions():
    model = bottleneck_net()
    plan = plan_ranks(model, 0.6, input_size=(1, 1, 12, 12), decomposition="auto", progress=False)
    t = plan.totals
    text = str(plan).splitlines()[-1]
    assert f"{t['network_fraction']:.3f} of the network's macs" in text
    assert f"{t['considered_fraction']:.3f} of the convs considered" in text and "of the network)" in text
    data = json.loads(plan.to_json())
    assert data["budget_over"] == "network" and data["totals"]["network_fraction"] == t["network_fraction"]
    again = RankPlan.from_json(plan.to_json())
    assert again.budget_over == "network" and again.structure == plan.structure
    assert again.totals == pytest.approx(t)
    del data["budget_over"]  # a plan written before whole-network budgets: its budget was over the considered convs
    assert RankPlan.from_json(json.dumps(data)).budget_over == "considered"


def test_an_unreachable_whole_network_budget_is_refused_before_any_work(monkeypatch):
    """Under decomposition="cp" the 1x1 convs and the first conv stay dense: the message gives the smallest
    fraction the 3x3 conv's cheapest rung reaches, and no decomposition runs."""
    model = bottleneck_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 1, 12, 12)
    dense = dense_macs_of_every_conv(model, x)
    shape = ConvShape.of_conv(model[4], (12, 12))
    cp = FAMILIES["cp"]
    cheapest = min(cp.ladder(model[4], shape.dense_macs(), lambda r: cp.macs(shape, r), 1, (0.02,), 1.5))
    least = sum(dense.values()) - dense["4"] + cp.macs(shape, cheapest)
    monkeypatch.setattr(rank_plans, "_build_ladder", lambda *a, **k: pytest.fail("decomposed before refusing"))
    with pytest.raises(ValueError, match=rf"smallest reachable fraction is {least / sum(dense.values()):.3f} of the "
                                         r"whole network's macs \(the convs left dense keep"):
        plan_ranks(model, 0.11, input_size=tuple(x.shape), ladder=(0.02,), progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="budget_over must be one of"):
        plan_ranks(model, 0.3, input_size=tuple(x.shape), budget_over="layers", progress=False)
