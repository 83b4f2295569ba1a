"""plan_ranks: a budget over the whole network, an exact knapsack over per-layer error curves, and
compress_model applying the plan without decomposing again."""
import pytest
import torch
from torch import nn

import cpkernels
from cpkernels import RankPlan, compress_model, plan_ranks
from cpkernels.plans import ranks as rank_plans

from .oracle import random_factors


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 24, (3, 1), padding=(1, 0)))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("budget", [0.15, 0.25, 0.5])
def test_budget_holds_and_the_model_is_untouched(metric, budget):
    model = small_net()
    before = _state(model)
    plan = plan_ranks(model, budget, metric=metric, input_size=(1, 3, 16, 16), progress=False)
    t = plan.totals
    assert t["fraction"] <= budget + 1e-12
    assert t["fraction"] >= budget - 0.1  # the ladder is coarse; the knapsack fills most of the budget
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for row in plan.rows:
        assert row["cost_after"] <= row["cost_before"]
        if row["rank"] is not None:
            assert row["name"] in plan.factors and 0 <= row["error"] < 1


def test_knapsack_is_exact_on_a_small_case():
    """Brute force over every combination agrees with the dynamic programme."""
    import itertools

    options = [[(10.0, 0.0), (4.0, 0.3), (2.0, 0.5)], [(20.0, 0.0), (9.0, 0.2), (5.0, 0.6)], [(6.0, 0.0), (3.0, 0.1)]]
    capacity = 0.5 * (10 + 20 + 6)
    best = min((sum(o[k][1] for o, k in zip(options, ks)), ks)
               for ks in itertools.product(*(range(len(o)) for o in options))
               if sum(o[k][0] for o, k in zip(options, ks)) <= capacity)
    assert tuple(rank_plans._knapsack(options, capacity)) == best[1]


def test_a_layer_of_exact_rank_r_is_planned_at_r_or_below():
    model = small_net()
    exact = random_factors(32, 32, (3, 3), 5, dtype=torch.float32)
    with torch.no_grad():
        model[4].weight.copy_(exact.to_dense())
    plan = plan_ranks(model, 0.5, input_size=(1, 3, 16, 16), progress=False, n_iter_max=60)
    row = next(r for r in plan.rows if r["name"] == "4")
    assert row["rank"] is not None and row["rank"] <= 5 and row["error"] < 1e-5


def test_rank_multiple_rounds_up():
    plan = plan_ranks(small_net(), 0.3, input_size=(1, 3, 16, 16), rank_multiple=8, progress=False)
    assert all(r["rank"] % 8 == 0 for r in plan.rows if r["rank"] is not None)


def test_plan_then_compress_decomposes_nothing_again(monkeypatch):
    model = small_net()
    plan = plan_ranks(model, 0.25, input_size=(1, 3, 16, 16), progress=False)
    calls = []
    original = cpkernels.module.decompose_conv
    monkeypatch.setattr(cpkernels.module, "decompose_conv", lambda *a, **k: calls.append(a) or original(*a, **k))
    before = _state(model)
    out, report = compress_model(model, plan)
    assert calls == []
    assert report.structure == plan.structure
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert out(x).shape == model(x).shape


def test_json_round_trip_and_applying_a_loaded_plan(tmp_path):
    model = small_net()
    plan = plan_ranks(model, 0.25, metric="params", progress=False)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    loaded = RankPlan.from_json(path.read_text())
    assert loaded.rows == plan.rows and loaded.metric == "params" and loaded.budget == 0.25
    assert loaded.factors == {}  # decompositions are not serialised: applying it decomposes at its ranks
    out, report = compress_model(model, loaded)
    assert report.structure == plan.structure
    assert "total" in str(plan) and "budget 0.25" in str(plan)


def test_a_plan_from_another_model_is_refused():
    plan = plan_ranks(small_net(), 0.25, metric="params", progress=False)
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="made for another model"):
        compress_model(other, plan)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(budget=0), "budget must be a fraction", id="budget-0"),
        pytest.param(dict(budget=1.5), "budget must be a fraction", id="budget-1.5"),
        pytest.param(dict(budget="half"), "budget must be a fraction", id="budget-str"),
        pytest.param(dict(metric="flops"), "metric must be one of", id="unknown-metric"),
        pytest.param(dict(method="magic"), "method must be one of", id="unknown-method"),
        pytest.param(dict(metric="macs"), "needs input_size or example_inputs", id="macs-without-input"),
        pytest.param(dict(metric="params", rank_multiple=0), "rank_multiple", id="rank-multiple-0"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_the_model_alone(kwargs, match):
    model = small_net()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        plan_ranks(model, **{"budget": 0.25, **kwargs})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
