"""ONNX export: standard ops only, ONNX Runtime matching eager PyTorch at other batch sizes, over the
conv cases every other path is tested on."""
import json
import sys

import pytest
import torch
from torch import nn

import cpkernels
from cpkernels import CPConv2d, SVDConv2d, TuckerConv2d

from .cases import CONV_CASES
from .oracle import assert_matches_oracle, oracle_conv2d

onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime, onnxscript) is not installed")
ort = pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime, onnxscript) is not installed")
pytest.importorskip("onnxscript", reason="the export extra (onnx, onnxruntime, onnxscript) is not installed")

from cpkernels.dispatch.measured import DENSE_MARGIN  # noqa: E402
from cpkernels.export import forms as onnx_plans  # noqa: E402
from cpkernels.export.onnx import ALIGN_RANKS, check_standard_graph, export_onnx  # noqa: E402

# Input layouts are PyTorch's business; an ONNX graph takes a plain batch, whose size varies below.
EXPORT_CASES = [c for c in CONV_CASES if c.values[0].layout == "nchw" and c.values[0].batch == 2]


def _layer(c) -> CPConv2d:
    torch.manual_seed(0)
    return CPConv2d(c.cin, c.cout, c.kernel_size, c.rank, groups=c.groups, bias=c.bias, **c.conv_kwargs()).eval()


def _run(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def _op_types(proto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize("c", EXPORT_CASES)
def test_onnx_runtime_matches_eager_at_other_batch_sizes(c, tmp_path):
    layer = _layer(c)
    proto = export_onnx(layer, c.make_input(torch.float32, "cpu"), tmp_path / "layer.onnx", merge_depthwise=True)
    ops = _op_types(proto)
    assert ops.count("Conv") == 3 and set(ops) <= {"Conv", "Pad"}, ops
    assert ops.count("Pad") <= 1
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    groups = [next(a.i for a in n.attribute if a.name == "group") for n in convs]
    # 1x1, depthwise over the rank (padded with zero channels to ALIGN_RANKS without groups), 1x1
    rank = -(-c.rank // ALIGN_RANKS) * ALIGN_RANKS if c.groups == 1 else c.rank
    assert groups == [c.groups, c.groups * rank, c.groups]
    for batch in (1, 3, 7):
        x = torch.randn(batch, c.cin, *c.size)
        y = _run(tmp_path / "layer.onnx", x)
        with torch.no_grad():
            torch.testing.assert_close(y, layer(x), rtol=0, atol=2e-5 * max(1.0, layer(x).abs().max().item()))
        assert_matches_oracle(y, oracle_conv2d(x, layer.factors.detach(), layer.bias, **c.conv_kwargs()),
                              torch.float32)


LEGACY_CASES = [p for p in EXPORT_CASES if p.id in ("pad1", "stride2", "same-even-kernel", "reflect", "groups2")]


@pytest.mark.parametrize("c", LEGACY_CASES)
@pytest.mark.parametrize("merge", [pytest.param(True, id="merged"), pytest.param(False, id="two-depthwise")])
def test_legacy_exporter_and_unmerged_depthwise(c, merge, tmp_path):
    layer = _layer(c)
    proto = export_onnx(layer, c.make_input(torch.float32, "cpu"), tmp_path / "layer.onnx", dynamo=False,
                        merge_depthwise=merge)
    assert _op_types(proto).count("Conv") == (3 if merge else 4)
    x = torch.randn(3, c.cin, *c.size)
    assert_matches_oracle(_run(tmp_path / "layer.onnx", x),
                          oracle_conv2d(x, layer.factors.detach(), layer.bias, **c.conv_kwargs()), torch.float32)


def _conv_weight_shapes(proto) -> list[list[int]]:
    initializers = {t.name: list(t.dims) for t in proto.graph.initializer}
    return [initializers[n.input[1]] for n in proto.graph.node if n.op_type == "Conv"]


ALIGN_CASES = {  # layer, then its Conv weights' shapes with the ranks as they are and padded to 16
    "cp": (lambda: CPConv2d(8, 12, 3, rank=5, padding=1),
           [[5, 8, 1, 1], [5, 1, 3, 3], [12, 5, 1, 1]], [[16, 8, 1, 1], [16, 1, 3, 3], [12, 16, 1, 1]]),
    "tucker2": (lambda: TuckerConv2d(8, 12, 3, rank=(5, 3), padding=1),  # (R_out, R_in)
                [[3, 8, 1, 1], [5, 3, 3, 3], [12, 5, 1, 1]], [[16, 8, 1, 1], [16, 16, 3, 3], [12, 16, 1, 1]]),
    "svd": (lambda: SVDConv2d(8, 12, 1, rank=5, stride=2),
            [[5, 8, 1, 1], [12, 5, 1, 1]], [[16, 8, 1, 1], [12, 16, 1, 1]]),
}


@pytest.mark.parametrize("family", list(ALIGN_CASES))
@pytest.mark.parametrize("align", [1, 16])
def test_ranks_padded_with_zero_channels_keep_the_output(family, align, tmp_path):
    make, shapes, padded = ALIGN_CASES[family]
    torch.manual_seed(0)
    layer = make().eval()
    x = torch.randn(2, 8, 9, 10)
    proto = export_onnx(layer, x, tmp_path / "layer.onnx", merge_depthwise=True, align_ranks=align)
    assert _conv_weight_shapes(proto) == (padded if align == 16 else shapes)
    x = torch.randn(3, 8, 9, 10)
    assert_matches_oracle(_run(tmp_path / "layer.onnx", x),
                          oracle_conv2d(x, layer.factors.detach(), layer.bias.detach(), layer.stride, layer.padding),
                          torch.float32)


def test_grouped_layers_keep_their_ranks(tmp_path):
    layer = CPConv2d(8, 12, 3, rank=5, padding=1, groups=2).eval()
    proto = export_onnx(layer, torch.randn(1, 8, 9, 10), tmp_path / "layer.onnx", merge_depthwise=True)
    assert _conv_weight_shapes(proto) == [[10, 4, 1, 1], [10, 1, 3, 3], [12, 5, 1, 1]]


def _compressed_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))
    return cpkernels.compress_model(net, rank=0.5, n_iter_max=10, progress=False)[0]


@pytest.mark.parametrize("dynamo", [pytest.param(True, id="dynamo"), pytest.param(False, id="legacy")])
def test_the_standard_export_call_gives_standard_convs(dynamo, tmp_path):
    """``torch.onnx.export`` itself, without the helper: default-domain ops, conv weights as initializers."""
    net = _compressed_net().eval()
    x = torch.randn(2, 3, 10, 10)
    kwargs = (dict(dynamic_shapes=({0: torch.export.Dim("batch")},)) if dynamo
              else dict(input_names=["x"], dynamic_axes={"x": {0: "batch"}}))
    torch.onnx.export(net, (x,), str(tmp_path / "net.onnx"), dynamo=dynamo, opset_version=18, verbose=False, **kwargs)
    proto = onnx.load(str(tmp_path / "net.onnx"))
    check_standard_graph(proto)
    onnx.checker.check_model(proto, full_check=True)
    x = torch.randn(5, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(_run(tmp_path / "net.onnx", x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dynamo", [pytest.param(True, id="dynamo"), pytest.param(False, id="legacy")])
def test_without_the_export_branch_the_custom_op_refuses_to_export(dynamo, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules["cpkernels.ops.frontend"], "exporting_to_onnx", lambda: False)
    with pytest.raises(Exception, match="cpkernels::cp_conv2d reached the ONNX exporter"):
        export_onnx(_compressed_net(), torch.randn(2, 3, 10, 10), tmp_path / "net.onnx", dynamo=dynamo)


@pytest.mark.parametrize("fastest, forms, convs", [
    pytest.param("per-layer", {"0": "dense", "3": "two"}, 1 + 4, id="per-layer"),
    pytest.param("dense", {"0": "dense", "3": "dense"}, 2, id="all-dense"),
    pytest.param("merged", {"0": "merged", "3": "merged"}, 6, id="all-merged"),
])
def test_auto_writes_the_fastest_whole_model(fastest, forms, convs, tmp_path, monkeypatch):
    """A fake clock: alone, layer "0" is fastest dense and layer "3" with two depthwise convs; the
    whole model is fastest as ``fastest``."""
    clock = {3: {"merged": 2.0, "two": 3.0, "dense": 1.0}, 16: {"merged": 2.0, "two": 1.0, "dense": 3.0}}
    candidates = {"merged": ("merged", "merged"), "two": ("two", "two"), "dense": ("dense", "dense"),
                  "per-layer": ("dense", "two")}

    def fake_model_ms(model, example_inputs, threads, repeats):
        written = tuple(m.form for m in model.modules() if isinstance(m, onnx_plans._Form))
        return 1.0 if written == candidates[fastest] else 2.0

    monkeypatch.setattr(onnx_plans, "time_form", lambda layer, form, x, threads, repeats: clock[x.shape[1]][form])
    monkeypatch.setattr(onnx_plans, "_whole_models_ms", lambda models, *args: {
        candidate: fake_model_ms(m, *args) for candidate, m in models.items()})
    net = _compressed_net()
    x = torch.randn(2, 3, 10, 10)
    proto = export_onnx(net, x, tmp_path / "net.onnx")
    plan = json.loads(next(p.value for p in proto.metadata_props if p.key == "cpkernels.forms"))
    assert plan["chosen"] == fastest and plan["forms"] == forms
    assert _op_types(proto).count("Conv") == convs
    with torch.no_grad():
        torch.testing.assert_close(_run(tmp_path / "net.onnx", x), net.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("merged_ms, chosen", [
    pytest.param(0.97, "dense", id="3%-faster-stays-dense"), pytest.param(0.9, "merged", id="10%-faster-wins")])
def test_auto_keeps_every_layer_dense_unless_a_form_wins_by_the_margin(merged_ms, chosen, tmp_path, monkeypatch):
    """A fake clock: alone and whole, "merged" is the fastest form, by 3 % or by 10 % over dense."""
    clock = {"merged": merged_ms, "two": 1.5, "dense": 1.0}
    monkeypatch.setattr(onnx_plans, "time_form", lambda layer, form, x, threads, repeats: clock[form])

    def fake_model_ms(model, example_inputs, threads, repeats):
        written = {m.form for m in model.modules() if isinstance(m, onnx_plans._Form)}
        return clock[written.pop()] if len(written) == 1 else 2.0

    monkeypatch.setattr(onnx_plans, "_whole_models_ms", lambda models, *args: {
        candidate: fake_model_ms(m, *args) for candidate, m in models.items()})
    plan = onnx_plans.plan_onnx_forms(_compressed_net(), (torch.randn(2, 3, 10, 10),), threads=1, repeats=1)
    assert plan["chosen"] == chosen and set(plan["forms"].values()) == {chosen}
    assert plan["ms"]["merged"] == merged_ms and plan["ms"]["dense"] == 1.0


def test_auto_measures_on_this_machine(tmp_path):
    plan = onnx_plans.plan_onnx_forms(_compressed_net(), (torch.randn(2, 3, 10, 10),), threads=1, repeats=2)
    assert set(plan["layers"]) == set(plan["forms"]) == {"0", "3"}
    ms = plan["ms"]
    assert set(ms) == set(onnx_plans.CANDIDATES) and min(ms.values()) > 0
    best = min(ms, key=ms.get)
    assert plan["chosen"] == (best if ms[best] < (1 - DENSE_MARGIN) * ms["dense"] else "dense")


def test_export_leaves_the_model_as_it_was(tmp_path):
    net = _compressed_net().train()
    net[1].eval()  # mixed flags: each one must come back as it was
    before = {k: v.clone() for k, v in net.state_dict().items()}
    export_onnx(net, torch.randn(2, 3, 10, 10), tmp_path / "net.onnx")
    assert [m.training for m in net.modules()] == [m is not net[1] for m in net.modules()]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_bad_example_inputs_are_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        export_onnx(_compressed_net(), [[1, 2]], tmp_path / "net.onnx")


@pytest.mark.parametrize("align", [0, 2.0, True])
def test_bad_align_ranks_is_a_clear_error(align, tmp_path):
    with pytest.raises(ValueError, match="align_ranks must be an int >= 1"):
        export_onnx(_compressed_net(), torch.randn(1, 3, 10, 10), tmp_path / "net.onnx", align_ranks=align)
    assert not (tmp_path / "net.onnx").exists()
