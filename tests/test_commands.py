"""``cpkernels plan`` and ``cpkernels compress`` on a model given as ``file.py:function``, and the demo."""
import json
import textwrap

import pytest
import torch

from cpkernels import CPConv2d, RankPlan, apply_structure
from cpkernels.__main__ import main
from cpkernels.compression import network_timing
from cpkernels.compression import ranks as rank_plans
from cpkernels.core.conv_args import is_channels_last

MODEL_FILE = textwrap.dedent("""
    import torch
    from torch import nn

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1))

    def calibration():
        g = torch.Generator().manual_seed(1)
        return [torch.randn(4, 3, 12, 12, generator=g) for _ in range(2)]
""")


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODEL_FILE)
    return path


def test_plan_then_compress_then_load_into_a_fresh_model(model_file, tmp_path, capsys):
    plan_path, out_path = tmp_path / "plan.json", tmp_path / "cp.pt"
    assert main(["plan", f"{model_file}:net", "--budget", "0.3", "--input-size", "1,3,12,12",
                 "--out", str(plan_path)]) == 0
    plan = RankPlan.from_json(plan_path.read_text())
    assert plan.budget == 0.3 and plan.totals["fraction"] <= 0.3 and "budget 0.3" in capsys.readouterr().out
    assert main(["compress", f"{model_file}:net", "--plan", str(plan_path), "--out", str(out_path)]) == 0
    saved = torch.load(out_path)
    assert saved["structure"] == plan.structure and json.loads(saved["plan"])["budget"] == 0.3

    namespace = {}
    exec(MODEL_FILE, namespace)
    fresh = apply_structure(namespace["net"](), saved["structure"])
    fresh.load_state_dict(saved["state_dict"])
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        dense = namespace["net"]()(x)
        assert (fresh(x) - dense).norm() < dense.norm()  # the compressed model, loaded, runs and approximates


def test_a_latency_plan_times_in_channels_last_when_asked(model_file, tmp_path, monkeypatch):
    seen = []

    def clock(layer, x):  # a fake clock that records the layouts it was given; every factored form wins
        seen.append(is_channels_last(x))
        return 100.0 if type(layer) is torch.nn.Conv2d else 1.0
    monkeypatch.setattr(rank_plans, "_time_layer", clock)
    monkeypatch.setattr(rank_plans, "_LATENCY_US", {})
    plan_path = tmp_path / "plan.json"
    assert main(["plan", f"{model_file}:net", "--budget", "0.5", "--metric", "latency", "--input-size", "1,3,12,12",
                 "--channels-last", "--out", str(plan_path)]) == 0
    assert RankPlan.from_json(plan_path.read_text()).memory_format == "channels_last"
    assert seen and all(seen)


def test_compress_keeps_the_convs_that_are_faster_dense_here(model_file, tmp_path, monkeypatch, capsys):
    """``--keep-dense-where-faster`` times a MAC plan's convs at ``--input-size`` (in channels_last when asked)
    and keeps the conv where the factored form is slower: on a fake clock, every planned conv."""
    seen = []

    def clock(layer, x):
        seen.append(is_channels_last(x))
        return 100.0 if type(layer) is torch.nn.Conv2d else 1000.0
    monkeypatch.setattr(rank_plans, "_time_layer", clock)
    monkeypatch.setattr(rank_plans, "_LATENCY_US", {})
    out = tmp_path / "cp.pt"
    args = ["compress", f"{model_file}:net", "--budget", "0.3", "--input-size", "1,3,12,12", "--out", str(out)]
    assert main(args) == 0 and not seen and torch.load(out)["structure"]  # a conv is factored
    assert main(args + ["--keep-dense-where-faster", "--channels-last"]) == 0
    assert torch.load(out)["structure"] == {} and seen and all(seen)
    assert "dense: rank" in capsys.readouterr().out
    seen.clear()
    monkeypatch.setattr(network_timing, "seconds_in_forward", lambda forwards, modules, repeats: {
        which: {name: 1.0 if which == "dense" else 10.0 for name in named} for which, named in modules.items()})
    assert main(args + ["--keep-dense-where-faster", "network"]) == 0
    assert torch.load(out)["structure"] == {} and not seen  # timed in the network only
    assert "dense: in the network, rank" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compress", f"{model_file}:net", "--budget", "0.3", "--keep-dense-where-faster", "--out", str(out)])
    assert "--keep-dense-where-faster needs --input-size" in capsys.readouterr().err


def test_compress_with_a_budget_and_data_calibration(model_file, tmp_path):
    out = tmp_path / "cp.pt"
    assert main(["compress", f"{model_file}:net", "--budget", "0.3", "--method", "data",
                 "--calibration", f"{model_file}:calibration", "--out", str(out)]) == 0
    assert json.loads(torch.load(out)["plan"])["method"] == "data"


def test_saved_model_file_and_calibration_tensor(model_file, tmp_path):
    namespace = {}
    exec(MODEL_FILE, namespace)
    torch.save(namespace["net"](), tmp_path / "net.pt")
    torch.save(torch.randn(10, 3, 12, 12), tmp_path / "calib.pt")
    assert main(["plan", str(tmp_path / "net.pt"), "--budget", "0.4", "--method", "data", "--calibration",
                 str(tmp_path / "calib.pt"), "--calibration-batch", "4", "--out", str(tmp_path / "p.json")]) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["plan", "nosuchmodule:net", "--budget", "0.3", "--out", "p.json"], "cannot import",
                     id="unknown-module"),
        pytest.param(["plan", "{file}:nosuch", "--budget", "0.3", "--out", "p.json"], "has no attribute",
                     id="unknown-function"),
        pytest.param(["plan", "{file}:net", "--budget", "1.5", "--input-size", "1,3,12,12", "--out", "p.json"],
                     "budget must be a fraction", id="bad-budget"),
        pytest.param(["plan", "{file}:net", "--budget", "0.3", "--method", "data", "--out", "p.json"],
                     "needs calibration", id="data-without-calibration"),
    ],
)
def test_bad_command_lines_are_clear_errors(model_file, tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        main([a.replace("{file}", str(model_file)) for a in args])


def test_compress_needs_a_plan_or_a_budget(model_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", f"{model_file}:net", "--out", str(tmp_path / "x.pt")])
    assert "either --plan or --budget" in capsys.readouterr().err


def test_demo_trains_plans_and_compresses():
    pytest.importorskip("sklearn")
    from cpkernels.tools import demo_digits as demo

    assert [(r["values_dense"], r["values_cp"]) for r in demo.prelude()] == [(150, 30), (1728, 1168)]
    r = demo.run(epochs=3, finetune_epochs=1, timing_copies=1)
    assert r["plan"].totals["fraction"] <= 0.25 and r["plan"].method == "data"
    assert 0 <= r["acc_compressed"] <= 100 and r["dense_ms"] > 0 and r["compressed_ms"] > 0
    assert r["params_compressed"] < r["params_dense"]


@pytest.mark.parametrize("align", [None, 1, 8])
def test_export_what_compress_wrote(model_file, tmp_path, align):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    pytest.importorskip("onnxscript", reason="the export extra is not installed")
    onnx = pytest.importorskip("onnx", reason="the export extra is not installed")
    import onnxruntime as ort

    cp, onnx_path = tmp_path / "cp.pt", tmp_path / "cp.onnx"
    assert main(["compress", f"{model_file}:net", "--budget", "0.3", "--input-size", "1,3,12,12",
                 "--out", str(cp)]) == 0
    flags = [] if align is None else ["--align-ranks", str(align)]
    assert main(["export", f"{model_file}:net", str(cp), "--input-size", "2,3,12,12", "--out", str(onnx_path),
                 *flags]) == 0
    namespace = {}
    exec(MODEL_FILE, namespace)
    saved = torch.load(cp)
    model = apply_structure(namespace["net"](), saved["structure"])
    model.load_state_dict(saved["state_dict"])
    # each CP layer's depthwise conv runs over its rank, padded to the multiple (16 by default)
    multiple = 16 if align is None else align
    ranks = [m.rank for m in model.modules() if isinstance(m, CPConv2d)]
    proto = onnx.load(str(onnx_path))
    initializers = {t.name: list(t.dims) for t in proto.graph.initializer}
    depthwise = [initializers[n.input[1]][0] for n in proto.graph.node if n.op_type == "Conv"
                 and next(a.i for a in n.attribute if a.name == "group") > 1]
    assert ranks and depthwise == [-(-r // multiple) * multiple for r in ranks]
    x = torch.randn(5, 3, 12, 12)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]),
                                   model(x), rtol=1e-4, atol=1e-5)


def test_export_refuses_a_bad_rank_multiple(model_file, tmp_path):
    with pytest.raises(SystemExit, match="--align-ranks must be >= 1"):
        main(["export", f"{model_file}:net", str(tmp_path / "cp.pt"), "--input-size", "1,3,12,12",
              "--out", str(tmp_path / "x.onnx"), "--align-ranks", "0"])


def test_export_refuses_a_file_compress_did_not_write(model_file, tmp_path):
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not a file written by cpkernels compress"):
        main(["export", f"{model_file}:net", str(tmp_path / "other.pt"), "--input-size", "1,3,12,12",
              "--out", str(tmp_path / "x.onnx")])
