"""Smoke test of the ONNX Runtime benchmark: both networks, one fraction, small images."""
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime, onnxscript) is not installed")
pytest.importorskip("onnxscript", reason="the export extra (onnx, onnxruntime, onnxscript) is not installed")

# after the skips: the benchmark needs the export extra
from bench import onnx_speed  # noqa: E402
from bench.onnx_speed import NETWORKS, cp_structure, run, to_markdown  # noqa: E402


def test_onnx_speed_rows_are_complete_and_the_exports_match_eager():
    rows = run(fractions=(0.25,), size=32, repeats=1, merge_both=True, keep_dense=True)
    assert {(r["network"], r["merge_depthwise"]) for r in rows} == {
        (n, m) for n in ("resnet18", "vgg16") for m in ("auto", True, False)}
    for r in rows:
        assert r["ort_dense_ms"] > 0 and r["ort_cp_ms"] > 0
        assert r["onnx_vs_eager_rel_diff"] < 1e-4
        assert all(rank % 8 == 0 for rank in r["ranks"])
        auto = r["merge_depthwise"] == "auto"
        assert (r["eager_kept_ms"] > 0) if auto else r["eager_kept_ms"] is None
        assert r["factored"] + len(r["kept_dense"]) == len(cp_structure(NETWORKS[r["network"]](), 0.25, 8))

    class Args:
        threads, batch, size, repeats, rank_multiple, channels_last = 2, 1, 32, 1, 8, False

    assert "ORT speed-up" in to_markdown(rows, {"device": "cpu", "torch": "x"}, Args)
    assert "eager kept speed-up" in to_markdown(rows, {"device": "cpu", "torch": "x"}, Args)


def test_eager_runs_on_channels_last_inputs_when_asked(monkeypatch):
    formats = []

    def kept(model, structure, shape, memory_format):  # what the keep-dense timing was asked for
        formats.append(memory_format)
        return {}
    monkeypatch.setattr(onnx_speed, "convs_kept_dense", kept)
    rows = run(networks=("resnet18",), fractions=(0.25,), size=32, repeats=1, keep_dense=True, channels_last=True)
    assert formats == [torch.channels_last] and rows[0]["eager_cp_ms"] > 0

    class Args:
        threads, batch, size, repeats, rank_multiple, channels_last = 2, 1, 32, 1, 8, True

    assert "eager PyTorch on channels_last inputs" in to_markdown(rows, {"device": "cpu", "torch": "x"}, Args)
