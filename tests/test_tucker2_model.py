"""Tucker-2 in model surgery: compress_model, plan_ranks (CP, Tucker-2 or per layer), save/load, ONNX export."""
import io
import warnings

import pytest
import torch
from torch import nn

from cpkernels import CPConv2d, RankPlan, TuckerConv2d, apply_structure, compress_model, plan_ranks
from cpkernels.dispatch.measured import DENSE_MARGIN

from .oracle import assert_matches_oracle


@pytest.fixture(scope="module")
def trained():
    """(model, test images, test labels) of the digits CNN trained here."""
    pytest.importorskip("sklearn")
    from cpkernels.tools.digits import trained_cnn

    model, data = trained_cnn(epochs=8)
    return model, data


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=2), nn.ReLU(), nn.Conv2d(32, 24, (3, 1)))


def test_compress_with_tucker2_reports_it_and_round_trips_through_a_state_dict():
    model = small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressed, report = compress_model(model, 0.3, decomposition="tucker2", input_size=(1, 3, 12, 12), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    layers = [m for m in compressed.modules() if isinstance(m, TuckerConv2d)]
    assert len(layers) == 4
    for row in report.rows:
        assert row["decomposition"] == "tucker2" and isinstance(row["rank"], tuple)
        assert row["params_after"] <= 0.3 * row["params_before"] and row["macs_after"] < row["macs_before"]
        assert row["degeneracy"] is None and 0 < row["weight_error"] < 1
    assert "tucker2" in str(report) and "x" in str(report).splitlines()[2]
    buffer = io.BytesIO()
    torch.save({"structure": report.structure, "state_dict": compressed.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    fresh = apply_structure(small_net(), {k: list(v) for k, v in saved["structure"].items()})  # as JSON keeps it
    fresh.load_state_dict(saved["state_dict"])
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(fresh(x), compressed(x))


def test_auto_takes_the_lower_weight_error_per_layer(trained):
    model, _ = trained
    _, cp = compress_model(model, 0.25, decomposition="cp", progress=False)
    _, tucker = compress_model(model, 0.25, decomposition="tucker2", progress=False)
    _, auto = compress_model(model, 0.25, decomposition="auto", progress=False)
    for a, c, t in zip(auto.rows, cp.rows, tucker.rows):
        if a["skipped"]:
            continue
        assert a["weight_error"] == pytest.approx(min(c["weight_error"], t["weight_error"]))
        assert a["decomposition"] == ("cp" if c["weight_error"] <= t["weight_error"] else "tucker2")


def test_auto_with_target_error_keeps_the_cheaper_form():
    model = small_net()
    _, report = compress_model(model, target_error=0.4, decomposition="auto", input_size=(1, 3, 12, 12),
                               progress=False)
    for row in report.rows:
        if row["skipped"] is None:
            assert row["weight_error"] <= 0.4 + 1e-9


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param(dict(decomposition="pca"), ValueError, "decomposition must be", id="unknown"),
        pytest.param(dict(rank=4, decomposition="auto"), ValueError, "not an int", id="auto-int-rank"),
        pytest.param(dict(rank={"0": (4, 3)}, decomposition="cp"), None, None, id="pair-in-dict-is-tucker"),
    ],
)
def test_decomposition_argument(kwargs, error, match):
    model = small_net()
    if error is None:
        compressed, report = compress_model(model, progress=False, **kwargs)
        assert isinstance(compressed[0], TuckerConv2d) and report.rows[0]["rank"] == (4, 3)
        return
    with pytest.raises(error, match=match):
        compress_model(model, progress=False, **kwargs)


@pytest.mark.parametrize("method", ["weight", "data"])
def test_plan_auto_is_never_worse_than_either_alone(trained, method):
    """Acceptance: on the planner's own objective (summed, sensitivity-weighted error within the budget)."""
    model, data = trained
    kwargs = dict(calibration=[data[0][:256]]) if method == "data" else dict(input_size=(1, 1, 8, 8))
    plans = {d: plan_ranks(model, 0.25, method=method, decomposition=d, progress=False, **kwargs)
             for d in ("cp", "tucker2", "auto")}
    for plan in plans.values():
        assert plan.totals["fraction"] <= 0.25 + 1e-12
    best = min(plans["cp"].totals["error_sum"], plans["tucker2"].totals["error_sum"])
    assert plans["auto"].totals["error_sum"] <= best + 1e-12
    for row in plans["auto"].rows:
        if row["rank"] is not None:
            assert row["decomposition"] == ("tucker2" if isinstance(row["rank"], tuple) else "cp")
    compressed, report = compress_model(model, plans["tucker2"])
    assert [r["decomposition"] for r in report.rows] == [r["decomposition"] for r in plans["tucker2"].rows]
    assert any(isinstance(m, TuckerConv2d) for m in compressed.modules())


def test_tucker2_plan_json_round_trip_and_vbmf(trained):
    model, _ = trained
    plan = plan_ranks(model, 0.3, method="vbmf", decomposition="tucker2", input_size=(1, 1, 8, 8), progress=False)
    assert plan.totals["fraction"] <= 0.3 + 1e-12
    assert all(isinstance(r["vbmf_rank"], tuple) for r in plan.rows if r["considered"])
    loaded = RankPlan.from_json(plan.to_json())
    assert loaded.decomposition == "tucker2" and loaded.structure == plan.structure
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed, _ = compress_model(model, loaded)
    assert sum(isinstance(m, TuckerConv2d) for m in compressed.modules()) == len(plan.structure)
    with pytest.raises(ValueError, match="needs a ladder"):
        plan_ranks(model, 0.3, method="vbmf", decomposition="auto", input_size=(1, 1, 8, 8))


def test_onnx_export_of_a_mixed_model(tmp_path):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    pytest.importorskip("onnxscript", reason="the export extra is not installed")
    import onnxruntime as ort

    from cpkernels import export_onnx

    model = small_net().eval()
    model[2] = TuckerConv2d.from_conv(model[2], (8, 6))
    model[4] = TuckerConv2d.from_conv(model[4], (6, 5))
    model[6] = CPConv2d.from_conv(model[6], 12)
    proto = export_onnx(model, torch.randn(2, 3, 12, 12), tmp_path / "m.onnx", merge_depthwise=True)
    ops = [n.op_type for n in proto.graph.node]
    assert set(ops) <= {"Conv", "Relu", "Pad"} and ops.count("Conv") == 1 + 3 + 3 + 3, ops
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 12, 12)
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = model.double()(x.double())
            model.float()
        assert_matches_oracle(torch.from_numpy(y), expected, torch.float32)


def test_onnx_auto_plan_times_tucker2_layers_too():
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    from cpkernels.export.forms import plan_onnx_forms

    model = small_net().eval()
    model[2] = TuckerConv2d.from_conv(model[2], (8, 6))
    model[6] = CPConv2d.from_conv(model[6], 12)
    plan = plan_onnx_forms(model, (torch.randn(2, 3, 12, 12),), threads=1, repeats=2)
    assert set(plan["forms"]) == {"2", "6"}
    assert set(plan["layers"]["2"]) == {"merged", "dense"}  # one factored form for Tucker-2
    assert set(plan["layers"]["6"]) == {"merged", "two", "dense"}
    ms = plan["ms"]
    best = min(ms, key=ms.get)
    assert min(ms.values()) > 0
    assert plan["chosen"] == (best if ms[best] < (1 - DENSE_MARGIN) * ms["dense"] else "dense")  # ties go to dense
