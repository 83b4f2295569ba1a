"""A factored layer memoises its argument checks, backend and CPU plan per call signature
(:func:`cpkernels.ops.frontend.layer_conv2d`). Its calls must give what the unmemoised functional op gives on
the same factors, bit for bit, after every event that changes what the memo holds, and bad input must still fail
with PyTorch's errors."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from cpkernels import CPConv2d, SVDConv2d, TuckerConv2d, cp_conv2d, svd_conv2d, tucker2_conv2d
from cpkernels.dispatch import cpu, gpu
from cpkernels.ops import frontend

FAMILIES = {
    "cp": (lambda **k: CPConv2d(6, 8, 3, rank=3, padding=1, **k), cp_conv2d),
    "tucker2": (lambda **k: TuckerConv2d(6, 8, 3, rank=(3, 2), padding=1, **k), tucker2_conv2d),
    "svd": (lambda **k: SVDConv2d(6, 8, 1, rank=3, **k), svd_conv2d),
}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def unmemoised(layer, functional, x):
    """The layer's call without its memo: the functional op works everything out on every call."""
    return functional(x, layer.factors, layer.bias, layer.stride, layer.padding, layer.dilation, layer.padding_mode,
                      layer.backend)


def assert_same_call(layer, functional, x):
    """The memoised call (run twice: filling the memo, then from it) equals the unmemoised one, exactly."""
    expected = unmemoised(layer, functional, x)
    for _ in range(2):
        y = layer(x)
        assert y.dtype == expected.dtype and y.shape == expected.shape
        assert y.is_contiguous(memory_format=torch.channels_last) == expected.is_contiguous(
            memory_format=torch.channels_last)
        assert torch.equal(y, expected)
    return y


@pytest.fixture
def memoise_counter(monkeypatch):
    """How many times a layer worked a call signature out."""
    calls = []
    original = frontend._memoise
    monkeypatch.setattr(frontend, "_memoise", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    return calls


def test_a_signature_is_worked_out_once(family, memoise_counter):
    make, functional = family
    layer = make()
    x = torch.randn(2, 6, 7, 7)
    for _ in range(3):
        layer(x)
    assert len(memoise_counter) == 1 and len(layer._call_memo) == 1


def test_every_invalidating_event(family, memoise_counter):
    make, functional = family
    layer = make()
    x = torch.randn(2, 6, 7, 7)

    def worked_out_anew(event):
        before = len(memoise_counter)
        event()
        y = assert_same_call(layer, functional, x)
        assert len(memoise_counter) == before + 1
        return y

    assert_same_call(layer, functional, x)
    other = make()
    y = worked_out_anew(lambda: layer.load_state_dict(other.state_dict()))  # new values in the same tensors
    assert torch.equal(y, other(x))
    worked_out_anew(lambda: layer.load_state_dict(make().state_dict(), assign=True))  # new tensors
    name = next(iter(layer.factor_shapes()))
    worked_out_anew(lambda: setattr(layer, name, nn.Parameter(torch.randn_like(getattr(layer, name)))))
    worked_out_anew(lambda: setattr(layer, "bias", nn.Parameter(torch.randn(8))))

    with torch.no_grad():
        before = layer(x)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    opt.step()  # in place: the same tensor objects, nothing to work out anew
    with torch.no_grad():
        after = assert_same_call(layer, functional, x)
    assert not torch.equal(before, after)

    layer.to(torch.float64)
    assert_same_call(layer, functional, x.double())
    with pytest.raises(RuntimeError, match=r"Input type \(torch.float32\) and weight type \(torch.float64\) should "):
        layer(x)  # the float32 signature worked out before .to() must not skip the dtype check
    worked_out_anew(lambda: layer.to(torch.float32))

    for new in (torch.randn(1, 6, 9, 5), torch.randn(6, 7, 7), x.to(memory_format=torch.channels_last),
                x[:, :, 1:, :-1]):  # a new shape, unbatched, channels_last, a strided view
        before = len(memoise_counter)
        assert_same_call(layer, functional, new)
        assert len(memoise_counter) == before + 1


def test_switching_grad_mode_and_requires_grad(family):
    make, functional = family
    layer = make()
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        assert not assert_same_call(layer, functional, x).requires_grad
    y = assert_same_call(layer, functional, x)
    assert y.requires_grad
    grads = torch.autograd.grad(layer(x).sum(), list(layer.parameters()))
    expected = torch.autograd.grad(unmemoised(layer, functional, x).sum(), list(layer.parameters()))
    for g, e in zip(grads, expected):
        assert torch.equal(g, e)
    with torch.inference_mode():
        assert_same_call(layer, functional, x)
    layer.requires_grad_(False)
    assert not assert_same_call(layer, functional, x).requires_grad
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(layer(xg).sum(), xg)
    (ex,) = torch.autograd.grad(unmemoised(layer, functional, xg).sum(), xg)
    assert torch.equal(gx, ex)


def test_changed_conv_arguments_and_backend(family, memoise_counter):
    # The memo's key leaves the conv arguments out: assigning one must clear it.
    make, functional = family
    layer = make(bias=False)
    x = torch.randn(2, 6, 7, 7)
    assert_same_call(layer, functional, x)
    for change in (lambda: setattr(layer, "stride", (2, 1)),
                   lambda: setattr(layer, "padding", (1, 2)),
                   lambda: setattr(layer, "padding_mode", "reflect"),
                   lambda: setattr(layer, "dilation", (1, 2)),
                   lambda: setattr(layer, "backend", "reference")):
        before = len(memoise_counter)
        change()
        assert not layer._call_memo
        assert_same_call(layer, functional, x)
        assert len(memoise_counter) == before + 1
    layer.padding = [1, 1]  # unhashable, and could change in place: never memoised, still computed
    assert_same_call(layer, functional, x)
    assert not layer._call_memo
    layer.padding[0] = 0
    assert_same_call(layer, functional, x)


@pytest.mark.parametrize("bad, error, match", [
    pytest.param(lambda layer: setattr(layer, "padding", (-1, 0)), ValueError, "negative padding", id="padding"),
    pytest.param(lambda layer: setattr(layer, "stride", (0, 1)), RuntimeError, "non-positive stride", id="stride"),
    pytest.param(lambda layer: setattr(layer, "dilation", (0, 1)), RuntimeError, "dilation should be greater",
                 id="dilation"),
    pytest.param(lambda layer: setattr(layer, "padding_mode", "mirror"), ValueError, "padding_mode must be one of",
                 id="padding-mode"),
    pytest.param(lambda layer: layer.to(torch.float64), RuntimeError, "should be the same", id="dtype"),
    pytest.param(lambda layer: layer.to("meta"), RuntimeError, "same device", id="device"),
    pytest.param(lambda layer: setattr(layer, "bias", nn.Parameter(torch.randn(3))), RuntimeError,
                 "expected bias to be 1-dimensional with 8 elements", id="bias"),
])
def test_bad_input_after_a_good_call_of_the_same_signature(family, bad, error, match):
    make, _ = family
    layer = make()
    x = torch.randn(2, 6, 7, 7)
    layer(x)
    bad(layer)
    for _ in range(2):  # a failing call memoises nothing
        with pytest.raises(error, match=match):
            layer(x)


@pytest.mark.parametrize("x, match", [
    pytest.param(torch.randn(1, 5, 7, 7), "to have 6 channels, but got 5 channels", id="channels"),
    pytest.param(torch.ones(1, 6, 7, 7, dtype=torch.int64), "floating point", id="integer"),
    pytest.param(torch.randn(1, 1, 6, 7, 7), r"Expected 3D \(unbatched\) or 4D", id="5d"),
])
def test_bad_input_fails_every_time(family, x, match):
    make, _ = family
    layer = make()
    layer(torch.randn(1, 6, 7, 7))
    for _ in range(2):
        with pytest.raises(RuntimeError, match=match):
            layer(x)
    with pytest.raises(TypeError, match="input must be a Tensor"):
        layer(x.numpy())


def test_autocast_takes_the_unmemoised_path(family):
    make, functional = family
    layer = make()
    x = torch.randn(2, 6, 7, 7)
    layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected = unmemoised(layer, functional, x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    assert_same_call(layer, functional, x)


def test_a_parametrized_factor_is_followed(family):
    make, functional = family
    layer = make()
    x = torch.randn(2, 6, 7, 7)
    layer(x)

    class Doubled(nn.Module):
        def forward(self, t):
            return 2 * t

    parametrize.register_parametrization(layer, "output_factor", Doubled())
    assert_same_call(layer, functional, x)


def test_copies_start_afresh_and_compute_the_same(family):
    make, functional = family
    layer = make()
    x = torch.randn(2, 6, 7, 7)
    y = layer(x)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin._call_memo == {}
        assert torch.equal(assert_same_call(twin, functional, x), y)


def test_the_memo_stays_small(family):
    make, _ = family
    layer = make()
    for size in range(4, 4 + 3 * frontend.MEMO_SIZE):
        layer(torch.randn(1, 6, size, size))
    assert 0 < len(layer._call_memo) <= frontend.MEMO_SIZE


def test_cpu_plan_switches_are_read_at_call_time(monkeypatch):
    """A memoised CPU plan goes with the plan's cache and with a changed switch."""
    layer = CPConv2d(6, 8, 3, rank=3, padding=1)
    x = torch.randn(2, 6, 7, 7)
    layer(x)
    assert cpu.measured_plans() == {}  # the tests' cost rule: nothing timed
    monkeypatch.setattr(cpu, "MEASURE", True)
    layer(x)
    assert len(cpu.measured_plans()) == 1  # the switch was seen
    cpu.clear_cache()
    layer(x)
    assert len(cpu.measured_plans()) == 1  # measured again after the cache was cleared
    monkeypatch.setattr(cpu, "MEASURE", None)
    monkeypatch.setenv("CPKERNELS_CPU_PLAN", "fastest")
    with pytest.raises(ValueError, match="CPKERNELS_CPU_PLAN must be one of"):
        layer(x)


@pytest.fixture
def gpu_plan_calls(monkeypatch):
    """A CPU layer sent down the GPU plan's path (what backend="auto" takes on a CUDA tensor), with each
    :func:`gpu.choose` recorded; the plan's answer is ``answer["plan"]`` (a measured choice by default)."""
    monkeypatch.setattr(frontend, "resolve_backend", lambda backend, x: "gpu-plan")
    answer = {"plan": gpu.GPUPlan("test", "four-stage", measured_us={"four-stage": 1.0, "dense": 2.0})}
    calls = []
    monkeypatch.setattr(gpu, "choose", lambda *a, **k: calls.append(k.get("run")) or answer["plan"])
    return calls, answer


def test_a_settled_gpu_choice_is_kept_until_the_plan_changes(monkeypatch, gpu_plan_calls):
    calls, _ = gpu_plan_calls
    layer = CPConv2d(6, 8, 3, rank=3, padding=1)
    x = torch.randn(2, 6, 7, 7)
    expected = unmemoised(layer, cp_conv2d, x)
    assert len(calls) == 1  # the functional op asks on every call
    for _ in range(3):
        assert torch.equal(layer(x), expected)
    assert len(calls) == 2  # the layer asked once, with a run to time by
    assert calls[-1] is not None
    events = [  # the tests' gpu.MEASURE is False (conftest)
        lambda: gpu.clear_cache(),
        lambda: monkeypatch.setattr(gpu, "MEASURE", True),
        lambda: monkeypatch.setattr(gpu, "MEASURE", None),
        lambda: monkeypatch.setenv("CPKERNELS_GPU_PLAN", "model"),
        lambda: monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", not torch.backends.cudnn.allow_tf32),
        lambda: torch.use_deterministic_algorithms(True),
    ]
    try:
        for event in events:
            before = len(calls)
            event()
            layer(x)
            layer(x)
            assert len(calls) == before + 1, event
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_choice_still_to_be_measured_is_asked_for_again(monkeypatch, gpu_plan_calls):
    """While the plan measures, the model's stand-in (no timing was possible, or no candidate agreed) is not
    kept: the next call asks the plan again, which then measures."""
    calls, answer = gpu_plan_calls
    monkeypatch.setattr(gpu, "MEASURE", True)
    answer["plan"] = gpu.GPUPlan("test", "four-stage")  # no times
    layer = CPConv2d(6, 8, 3, rank=3, padding=1)
    x = torch.randn(2, 6, 7, 7)
    for _ in range(3):
        layer(x)
    assert len(calls) == 3
    monkeypatch.setattr(gpu, "MEASURE", False)  # the model decides: its choice is settled
    for _ in range(3):
        layer(x)
    assert len(calls) == 4


def test_graph_capture_after_eager_calls_sees_the_custom_op(family):
    make, functional = family
    layer = make().eval()
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        y = layer(x)
    exported = torch.export.export(layer, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("cpkernels.") for t in targets), targets
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), y)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("cpkernels" in t for t in targets), targets
    torch._dynamo.reset()


@pytest.mark.parametrize("dynamo", [pytest.param(True, id="dynamo"), pytest.param(False, id="legacy")])
def test_onnx_export_after_eager_calls_gives_standard_convs(family, dynamo, tmp_path):
    onnx = pytest.importorskip("onnx", reason="the export extra is not installed")
    pytest.importorskip("onnxscript", reason="the export extra is not installed")
    from cpkernels.export.onnx import check_standard_graph

    make, _ = family
    layer = make().eval()
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        layer(x)
        layer(x)
    torch.onnx.export(layer, (x,), str(tmp_path / "layer.onnx"), dynamo=dynamo, opset_version=18, verbose=False)
    check_standard_graph(onnx.load(str(tmp_path / "layer.onnx")))
