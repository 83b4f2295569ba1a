"""The GPU plan (cpkernels/dispatch/gpu.py): its model, its cache, its measured mode, and the op following it.

No GPU is needed: the model is arithmetic, and the strategies it picks among run on CPU tensors here
(the fused kernels under the Triton interpreter)."""
import importlib
import json

import pytest
import torch

from cpkernels import cp_conv2d
from cpkernels.core.cost import ConvShape
from cpkernels.dispatch import gpu
from cpkernels.dispatch.measured import DENSE_MARGIN
from cpkernels.tools import gpu_plan_tables
from cpkernels.tools.layers import LAYERS, ROOFLINE_LAYERS

from .oracle import assert_matches_oracle, oracle_conv2d, random_factors

op = importlib.import_module("cpkernels.ops.cp_conv2d")  # the module (the package exports the function)
frontend = importlib.import_module("cpkernels.ops.frontend")


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(gpu, "_CACHE", {})
    monkeypatch.setattr(gpu, "MEASURE", None)


def test_unknown_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown GPU 'v100'; known GPUs: h100, h200, a100, l4"):
        gpu.gpu_spec("v100")
    assert gpu.gpu_spec("H100-SXM") is gpu.GPUS["h100"] and gpu.gpu_spec("a100") is gpu.GPUS["a100"]


def test_dense_and_four_stage_costs_by_hand():
    s = ConvShape(2, 8, 6, (10, 10), padding=1)  # 10x10 output, 200 output pixels
    dense = gpu.cost_dense(s, 4, 2)
    weight = 6 * 8 * 9
    assert dense.flops == 2 * (200 * 6 * 8 * 9 + weight * 4)
    assert dense.hbm_bytes == 2 * (200 * 8 + 200 * 6) + 2 * weight * 2
    four = gpu.cost_four_stage(s, 4, torch.float32)
    assert four.flops == 2 * (200 * 8 * 4 + 200 * 4 * 6)
    assert four.hbm_bytes == 4 * (200 * 8 + 200 * 6) + 2 * 4 * 3 * 200 * 4  # three R-channel intermediates
    assert four.launches == 4
    spec = gpu.GPUS["h100"]
    expected = max(four.flops / spec.tensor_flops_tf32, four.hbm_bytes / spec.hbm_bytes_per_s,
                   four.simt_flops / spec.fp32_flops) + 4 * spec.launch_s
    assert four.seconds(spec, torch.float32, tf32=True) == pytest.approx(expected)
    # 16-bit inputs: fp32 intermediates and casts of X and Y; bf16 GEMMs in TF32, fp16 ones in IEEE fp32.
    bf16 = gpu.cost_four_stage(s, 4, torch.bfloat16)
    assert bf16.hbm_bytes == 2 * (200 * 8 + 200 * 6) + 2 * 4 * (200 * 8 + 200 * 6) + 2 * 4 * 3 * 200 * 4
    assert bf16.seconds(spec, torch.bfloat16, tf32=True) == pytest.approx(
        max(bf16.flops / spec.tensor_flops_tf32, bf16.hbm_bytes / spec.hbm_bytes_per_s) + 6 * spec.launch_s)
    fp16 = gpu.cost_four_stage(s, 4, torch.float16)
    assert fp16.flops == 0 and fp16.simt_flops == four.simt_flops + four.flops


def test_fill_counts_idle_sms():
    cost = gpu.Cost(flops=1e12, hbm_bytes=0, programs=33)
    spec = gpu.GPUS["h100"]  # 132 SMs: a quarter of them busy
    assert cost.seconds(spec, torch.bfloat16, True) == pytest.approx(4 * 1e12 / spec.tensor_flops_16bit + spec.launch_s)


def _every_layer_and_rank():
    return [(layer, rank) for layer in LAYERS + ROOFLINE_LAYERS for rank in layer.ranks()]


@pytest.mark.parametrize("name", list(gpu.GPUS))
def test_plan_never_slower_than_dense_or_four_stage(name):
    """The target of the plan, on the model, for every layer of the shared list at every rank of the list."""
    spec = gpu.GPUS[name]
    for layer, rank in _every_layer_and_rank():
        for dtype in (torch.bfloat16, torch.float32):
            plan = gpu.model_plan(layer.shape, rank, dtype, spec)
            assert set(plan.modeled_us) <= set(gpu.STRATEGIES)
            assert {"dense", "four-stage", "fused-taps", "fused-wide"} <= set(plan.modeled_us)
            chosen = plan.modeled_us[plan.chosen]
            assert chosen <= min(plan.modeled_us["dense"], plan.modeled_us["four-stage"])


def test_rows_kernel_is_a_candidate_only_where_it_runs():
    spec = gpu.GPUS["h100"]
    s = ConvShape(8, 64, 64, (28, 28))
    assert "fused-rows" in gpu.model_plan(s, 64, torch.bfloat16, spec).modeled_us
    assert "fused-rows" not in gpu.model_plan(s, 192, torch.bfloat16, spec).modeled_us
    assert "fused-rows" not in gpu.model_plan(ConvShape(8, 64, 64, (28, 28), (5, 5), padding=2), 64,
                                              torch.bfloat16, spec).modeled_us
    assert set(gpu.model_plan(s, 64, torch.float64, spec).modeled_us) == {"dense", "four-stage"}


def test_plans_pick_what_the_model_says_where_it_is_clear():
    spec = gpu.GPUS["h100"]
    # A rank well past the channels: CP does more work than the dense conv, which wins.
    assert gpu.model_plan(ConvShape(32, 64, 64, (224, 224)), 256, torch.bfloat16, spec).chosen == "dense"
    # 256 channels at R = C/4: the fused kernels move X + Y only and win.
    assert gpu.model_plan(ConvShape(32, 256, 256, (56, 56)), 64, torch.bfloat16, spec).chosen.startswith("fused")


def _call(x, f, stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1)):
    return (x, f.rank, f.groups, f.out_channels, f.kernel_size, stride, pad, dilation)


def test_cache_is_keyed_on_what_changes_the_choice(monkeypatch):
    calls = []
    original = gpu.model_plan
    monkeypatch.setattr(gpu, "model_plan", lambda *a, **k: calls.append(a) or original(*a, **k))
    f = random_factors(6, 8, (3, 3), 4)
    x = torch.randn(2, 8, 9, 9)
    gpu.choose(*_call(x, f))
    gpu.choose(*_call(x, f))
    assert len(calls) == 1
    variants = [
        _call(x.to(memory_format=torch.channels_last), f),
        _call(x.half(), f),
        _call(x, f, stride=(2, 1)),
        _call(x, f, pad=(1, 0, 1, 1)),
        _call(x, f, dilation=(1, 2)),
        _call(torch.randn(3, 8, 9, 9), f),
        _call(x, random_factors(6, 8, (3, 3), 5)),
    ]
    for args in variants:
        gpu.choose(*args)
    assert len(calls) == 1 + len(variants)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
def test_measured_mode_times_its_candidates_and_changes_no_result(monkeypatch, dtype):
    monkeypatch.setattr(gpu, "MEASURE", True)
    f = random_factors(6, 8, (3, 3), 4, dtype=dtype)
    bias = torch.randn(6, dtype=dtype)
    x = torch.randn(2, 8, 9, 9, dtype=dtype)
    outputs = {}

    def run(strategy):
        impl = op.STRATEGY_IMPLS[strategy]
        y = op._cp_conv2d_op(x, f.input, f.vertical, f.horizontal, f.output, bias, [1, 1], [1, 1, 1, 1], [1, 1], impl)
        outputs.setdefault(strategy, y)
        return y

    plan = gpu.choose(*_call(x, f), run=run)
    # here the model's best three are the three fused kernels: with dense and the reference, every strategy
    assert set(plan.measured_us) == set(gpu.measured_candidates(plan.modeled_us, "cp")) == set(outputs)
    assert set(outputs) == set(plan.modeled_us) and plan.refused == {}
    best = min(plan.measured_us, key=plan.measured_us.get)  # the fastest, unless a near tie with dense
    assert plan.chosen == (best if plan.measured_us[best] < (1 - DENSE_MARGIN) * plan.measured_us["dense"] else "dense")
    expected = oracle_conv2d(x, f, bias, padding=1)
    for y in outputs.values():
        assert_matches_oracle(y, expected, dtype)
    assert gpu.choose(*_call(x, f), run=run) is plan  # cached: measured once


def test_measured_mode_refuses_a_wrong_candidate(monkeypatch):
    x = torch.randn(1, 8, 5, 5)

    def run(strategy):
        return x + (1.0 if strategy == "fused-taps" else 0.0)

    with pytest.raises(RuntimeError, match="fused-taps differs from the four-stage path"):
        gpu.measure(run, ("dense", "fused-taps"), torch.float32, timer=lambda fn: 1.0)


@pytest.mark.parametrize("strategy", list(gpu.STRATEGIES))
def test_auto_follows_the_plan(monkeypatch, strategy):
    """What backend="auto" runs on a CUDA tensor: each strategy the plan may pick, through the op."""
    monkeypatch.setattr(frontend, "resolve_backend", lambda backend, x: "gpu-plan")
    monkeypatch.setattr(gpu, "choose", lambda *a, **k: gpu.GPUPlan("test", strategy))
    ran = []
    original = op.IMPLS.copy()
    for name, fn in original.items():
        monkeypatch.setitem(op.IMPLS, name, lambda *a, _n=name, _f=fn: ran.append(_n) or _f(*a))
    from cpkernels.kernels import cp_conv2d_fused as fused

    f = random_factors(6, 8, (3, 3), 4)
    bias = torch.randn(6)
    x = torch.randn(2, 8, 9, 9)
    y = cp_conv2d(x, f, bias, padding=1, backend="auto")
    assert_matches_oracle(y, oracle_conv2d(x, f, bias, padding=1), torch.float32)
    impl = op.STRATEGY_IMPLS[strategy]
    if impl in op.FUSED_IMPLS:
        assert ran == [] and fused.best_config()["kernel"] == op.FUSED_IMPLS[impl]
    else:
        assert ran == [impl]


def test_profiler_models_a_named_gpu_on_a_cpu(tmp_path, capsys):
    from cpkernels.tools import profile

    out = tmp_path / "plan.json"
    profile.main(["--cin", "512", "--cout", "512", "--size", "28", "--batch", "32", "--kernel", "3", "--rank", "512",
                  "--dtype", "bfloat16", "--gpu", "h100", "--json", str(out), "--device", "cpu"])
    data = json.loads(out.read_text())["gpu_plan"]
    assert data["gpu"] == "NVIDIA H100 SXM"
    assert data["chosen"] in data["modeled_us"]
    assert set(data["modeled_us"]) == {"dense", "four-stage", "fused-taps", "fused-wide"}
    assert "GPU plan on NVIDIA H100 SXM" in capsys.readouterr().out
    profile.main(["--layer", "vgg16-conv4_2", "--rank", "128", "--dtype", "bfloat16", "--gpu", "a100",
                  "--json", str(out), "--device", "cpu"])
    assert "fused-rows" in json.loads(out.read_text())["gpu_plan"]["modeled_us"]


def test_profiler_rejects_an_unknown_gpu(capsys):
    from cpkernels.tools import profile

    with pytest.raises(SystemExit):
        profile.main(["--gpu", "v100", "--device", "cpu"])
    assert "unknown GPU 'v100'; known GPUs: h100, h200, a100, l4" in capsys.readouterr().err


def test_docs_show_the_current_model():
    """docs/kernel.md's plan tables are the model's output, not a copy that drifts from it."""
    from pathlib import Path

    docs = (Path(__file__).parent.parent / "docs" / "kernel.md").read_text()
    assert gpu_plan_tables.layer_table(gpu.GPUS["h100"]) in docs
    assert gpu_plan_tables.per_pixel_table(gpu.GPUS["h100"]) in docs


@pytest.mark.parametrize("family, rank", [("cp", 8), ("tucker2", (6, 5)), ("svd", 8)])
def test_the_model_plan_traces_with_fullgraph(family, rank):
    """A compiled call whose signature has no plan yet runs the model inside dynamo's trace: it must trace without
    a graph break (fullgraph=True) and choose what the model chooses eagerly."""
    kernel = (1, 1) if family == "svd" else (3, 3)
    padding = (0, 0, 0, 0) if family == "svd" else (1, 1, 1, 1)

    def plan(x):
        return gpu.choose(x, rank, 1, 16, kernel, (1, 1), padding, (1, 1), spec=gpu.GPUS["h100"], family=family)

    x = torch.randn(2, 16, 12, 12)
    expected = plan(x).chosen
    gpu.clear_cache()
    strategies = sorted(plan(x).modeled_us)
    gpu.clear_cache()

    def f(x):
        return x * (1.0 + strategies.index(plan(x).chosen))

    torch._dynamo.reset()
    try:
        y = torch.compile(f, fullgraph=True, backend="eager")(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(y, x * (1.0 + strategies.index(expected)))
