"""The GPU plan's measured mode (cpkernels/dispatch/gpu.py), its default: what it times, what it picks, what it
caches, where it stays with the model. No GPU is needed: a fake timer says how long each strategy takes and a fake
``run`` computes each strategy's output (one of them wrong); one test runs a real layer under the interpreter."""
import importlib
import json

import pytest
import torch

from cpkernels import CPConv2d
from cpkernels.core.cost import ConvShape
from cpkernels.core.switches import gpu_plan_mode
from cpkernels.dispatch import gpu
from cpkernels.tools.profile import Case

from .oracle import assert_matches_oracle, oracle_conv2d, random_factors

frontend = importlib.import_module("cpkernels.ops.frontend")

# One CP call: 8 -> 6 channels, 3x3, rank 4, padding 1 on a 2x8x9x9 input. Its five strategies all model
# within 3-12 us on an H100: the model ranks fused-taps first.
RANK, GROUPS, COUT, KERNEL = 4, 1, 6, (3, 3)


@pytest.fixture(autouse=True)
def default_plan(monkeypatch):
    """The plan as a user gets it: no switch set, nothing cached, the package's timer."""
    monkeypatch.delenv("CPKERNELS_GPU_PLAN", raising=False)
    monkeypatch.setattr(gpu, "MEASURE", None)
    monkeypatch.setattr(gpu, "TIMER", None)
    gpu.clear_cache()
    yield
    gpu.clear_cache()


def _args(x, stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1), rank=RANK):
    return (x, rank, GROUPS, COUT, KERNEL, stride, pad, dilation)


class Fake:
    """A fake ``run`` (each strategy's output: the right one, or off by 1 for the ``wrong`` ones) and a fake
    timer (seconds per strategy), counting what each was asked."""

    def __init__(self, seconds: dict, wrong=(), output=None):
        self.seconds, self.wrong = seconds, set(wrong)
        self.output = torch.linspace(-1, 1, 2 * COUT * 81).reshape(2, COUT, 9, 9) if output is None else output
        self.ran, self.timed = [], []

    def run(self, strategy: str) -> torch.Tensor:
        self.ran.append(strategy)
        return self.output + 1.0 if strategy in self.wrong else self.output.clone()

    def timer(self, fn) -> float:
        strategy = fn.args[0]  # the timer gets partial(run, strategy)
        self.timed.append(strategy)
        fn()
        return self.seconds[strategy]


def _modeled(x, rank=RANK) -> gpu.GPUPlan:
    shape = gpu.shape_of_call(x, GROUPS, COUT, KERNEL, (1, 1), (1, 1, 1, 1), (1, 1))
    return gpu.model_plan(shape, rank, x.dtype, gpu.GPUS["h100"], torch.backends.cudnn.allow_tf32)


def test_measure_is_the_default_and_model_keeps_the_model(monkeypatch):
    assert gpu_plan_mode() == "measure" and gpu.measuring()
    monkeypatch.setenv("CPKERNELS_GPU_PLAN", "model")
    assert not gpu.measuring()
    fake = Fake({})
    x = torch.randn(2, 8, 9, 9)
    plan = gpu.choose(*_args(x), run=fake.run, timer=fake.timer)
    assert plan.measured_us is None and plan.chosen == _modeled(x).model_choice
    assert fake.ran == fake.timed == []
    monkeypatch.setenv("CPKERNELS_GPU_PLAN", "benchmark")
    with pytest.raises(ValueError, match=r"CPKERNELS_GPU_PLAN must be one of \('measure', 'model'\), got 'benchmark'"):
        gpu.measuring()


def test_candidates_are_the_models_best_few_with_dense_and_the_reference():
    modeled = {"dense": 9.0, "four-stage": 12.0, "fused-rows": 3.3, "fused-taps": 3.2, "fused-wide": 3.6}
    assert gpu.measured_candidates(modeled, "cp") == ("fused-taps", "fused-rows", "fused-wide", "dense", "four-stage")
    assert gpu.measured_candidates(modeled, "cp", top=1) == ("fused-taps", "dense", "four-stage")
    # dense among the model's best is timed once
    assert gpu.measured_candidates({**modeled, "dense": 1.0}, "cp", top=2) == ("dense", "fused-taps", "four-stage")
    assert gpu.measured_candidates({"dense": 2.0, "three-stage": 1.0, "fused-taps": 3.0}, "tucker2", top=1) == (
        "three-stage", "dense")
    with pytest.raises(ValueError, match="top must be >= 0, got -1"):
        gpu.measured_candidates(modeled, "cp", top=-1)


def test_it_picks_what_the_timer_says_among_the_models_best_few(monkeypatch):
    monkeypatch.setattr(gpu, "MEASURED_TOP", 2)
    x = torch.randn(2, 8, 9, 9)
    modeled = _modeled(x)
    ranked = sorted(modeled.modeled_us, key=modeled.modeled_us.get)
    assert ranked[:2] == ["fused-taps", "fused-wide"] and ranked[2:] == ["fused-rows", "dense", "four-stage"]
    candidates = gpu.measured_candidates(modeled.modeled_us, "cp")
    assert candidates == ("fused-taps", "fused-wide", "dense", "four-stage")
    # The timer says dense, which the model ranks fourth of five.
    fake = Fake({"dense": 1e-6, "four-stage": 4e-6, "fused-wide": 3e-6, "fused-taps": 2e-6})
    plan = gpu.choose(*_args(x), run=fake.run, timer=fake.timer)
    assert plan.chosen == "dense" != plan.model_choice == modeled.model_choice == "fused-taps"
    assert sorted(fake.timed) == sorted(candidates)  # each candidate timed once, the rest never
    assert fake.ran.count("fused-rows") == 0
    assert plan.measured_us == {"dense": 1.0, "four-stage": 4.0, "fused-wide": 3.0, "fused-taps": 2.0}
    assert plan.modeled_us == modeled.modeled_us and plan.refused == {}
    assert plan.as_dict()["measured_us"] == plan.measured_us and plan.as_dict()["refused"] == {}
    assert list(gpu.measured_plans().values()) == [plan]


@pytest.mark.parametrize("fused_s, kept", [
    pytest.param(0.97e-6, "dense", id="3%-faster-stays-dense"),
    pytest.param(0.90e-6, "fused-taps", id="10%-faster-wins"),
])
def test_a_near_tie_with_dense_goes_to_dense(monkeypatch, fused_s, kept):
    x = torch.randn(2, 8, 9, 9)
    fake = Fake({"dense": 1e-6, "four-stage": 4e-6, "fused-wide": 3e-6, "fused-taps": fused_s, "fused-rows": 5e-6})
    assert gpu.choose(*_args(x), run=fake.run, timer=fake.timer).chosen == kept


def test_it_never_picks_a_candidate_that_disagrees_with_the_reference(monkeypatch):
    x = torch.randn(2, 8, 9, 9)
    # fused-taps is the model's choice and the timer's fastest, and computes something else.
    fake = Fake({"dense": 5e-6, "four-stage": 4e-6, "fused-rows": 3e-6, "fused-taps": 1e-6, "fused-wide": 2e-6},
                wrong={"fused-taps"})
    plan = gpu.choose(*_args(x), run=fake.run, timer=fake.timer)
    assert plan.chosen == "fused-wide"  # the fastest of those that agree
    assert set(plan.refused) == {"fused-taps"} and plan.refused["fused-taps"] == pytest.approx(1.0, rel=1e-2)
    assert "fused-taps" not in plan.measured_us and "fused-taps" not in fake.timed
    assert len(fake.timed) == 4
    assert json.loads(json.dumps(plan.as_dict()))["refused"] == plan.refused
    # Without a ``refused`` to write to (the CPU plan's use), a disagreeing candidate is still an error.
    with pytest.raises(RuntimeError, match="fused-taps differs from the four-stage path"):
        gpu.measure(fake.run, ("dense", "fused-taps"), torch.float32, timer=fake.timer)


def test_it_caches_by_the_full_signature(monkeypatch):
    seconds = {"dense": 5e-6, "four-stage": 4e-6, "fused-rows": 3e-6, "fused-taps": 1e-6, "fused-wide": 2e-6,
               "two-stage": 6e-6}
    fake = Fake(seconds)
    x = torch.randn(2, 8, 9, 9)
    plan = gpu.choose(*_args(x), run=fake.run, timer=fake.timer)
    per_decision = len(fake.timed)
    assert per_decision == 5
    assert gpu.choose(*_args(x), run=fake.run, timer=fake.timer) is plan
    assert gpu.choose(*_args(torch.randn(2, 8, 9, 9)), run=fake.run, timer=fake.timer) is plan  # values: no part
    assert len(fake.timed) == per_decision
    variants = [
        lambda: _args(x.to(memory_format=torch.channels_last)),
        lambda: _args(x.double()),
        lambda: _args(x.half()),
        lambda: _args(x, stride=(2, 1)),
        lambda: _args(x, pad=(1, 0, 1, 1)),
        lambda: _args(x, dilation=(1, 2)),
        lambda: _args(torch.randn(3, 8, 9, 9)),
        lambda: _args(x, rank=5),
    ]
    decisions = 1
    for args in variants:
        gpu.choose(*args(), run=fake.run, timer=fake.timer)
        decisions += 1
        assert len(gpu.measured_plans()) == decisions
    # The TF32 switch, and the family, are parts of it too.
    torch.backends.cudnn.allow_tf32 = not torch.backends.cudnn.allow_tf32  # conftest restores it
    gpu.choose(*_args(x), run=fake.run, timer=fake.timer)
    gpu.choose(*_args(x), run=fake.run, timer=fake.timer, family="svd")
    decisions += 2
    assert len(gpu.measured_plans()) == decisions
    # float64 models only dense and four-stage, so timed two; every other decision timed its candidates.
    assert len(fake.timed) > per_decision * (decisions - 3)
    keys = list(gpu.measured_plans())
    assert len(set(keys)) == decisions and all(key[-1] == "measure" for key in keys)
    assert len({key[0] for key in keys}) == 1  # the device is part of the key too (one here)


def test_a_measured_choice_never_answers_the_model_nor_the_reverse(monkeypatch):
    x = torch.randn(2, 8, 9, 9)
    fake = Fake({"dense": 1e-6, "four-stage": 4e-6, "fused-rows": 3e-6, "fused-taps": 2e-6, "fused-wide": 2e-6})
    monkeypatch.setattr(gpu, "MEASURE", False)
    assert gpu.choose(*_args(x), run=fake.run, timer=fake.timer).chosen == "fused-taps"
    monkeypatch.setattr(gpu, "MEASURE", True)
    assert gpu.choose(*_args(x), run=fake.run, timer=fake.timer).chosen == "dense"
    monkeypatch.setattr(gpu, "MEASURE", False)
    assert gpu.choose(*_args(x), run=fake.run, timer=fake.timer).chosen == "fused-taps"
    assert len(fake.timed) == 5


def test_deterministic_algorithms_keep_the_model_unless_measure_is_asked_for(monkeypatch):
    x = torch.randn(2, 8, 9, 9)
    fake = Fake({"dense": 1e-6, "four-stage": 4e-6, "fused-rows": 3e-6, "fused-taps": 2e-6, "fused-wide": 2e-6})
    measured = gpu.choose(*_args(x), run=fake.run, timer=fake.timer)  # an earlier eager measurement
    assert measured.chosen == "dense" and len(fake.timed) == 5
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not gpu.measuring()
        plan = gpu.choose(*_args(x), run=fake.run, timer=fake.timer)
        assert plan.chosen == "fused-taps" and plan.measured_us is None  # the cached measured choice is not used
        fresh = gpu.choose(*_args(x, stride=(2, 2)), run=fake.run, timer=fake.timer)
        assert fresh.measured_us is None and len(fake.timed) == 5
        monkeypatch.setenv("CPKERNELS_GPU_PLAN", "measure")  # asked for explicitly, as the CPU plan does
        assert gpu.choose(*_args(x, stride=(2, 2)), run=fake.run, timer=fake.timer).measured_us is not None
        assert len(fake.timed) > 5
    finally:
        torch.use_deterministic_algorithms(before)


def _capturing(monkeypatch):
    # torch's CPU builds raise on the capture query; the plan asks it only once CUDA is initialised
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


WHERE_TIMING_IS_IMPOSSIBLE = {
    "torch.compile": lambda mp: mp.setattr(torch.compiler, "is_compiling", lambda: True),
    "jit-trace": lambda mp: mp.setattr(torch.jit, "is_tracing", lambda: True),
    "onnx-export": lambda mp: mp.setattr(torch.onnx, "is_in_onnx_export", lambda: True),
    "cuda-graph-capture": _capturing,
}


@pytest.mark.parametrize("where", list(WHERE_TIMING_IS_IMPOSSIBLE))
def test_where_timing_is_impossible_it_takes_a_cached_measured_choice_or_the_models(monkeypatch, where):
    x = torch.randn(2, 8, 9, 9)
    fake = Fake({"dense": 1e-6, "four-stage": 4e-6, "fused-rows": 3e-6, "fused-taps": 2e-6, "fused-wide": 2e-6})
    with monkeypatch.context() as mp:
        WHERE_TIMING_IS_IMPOSSIBLE[where](mp)
        assert gpu.timing_impossible()
        traced_first = gpu.choose(*_args(x), run=fake.run, timer=fake.timer)
        assert traced_first.chosen == "fused-taps" and traced_first.measured_us is None  # the model's
        assert fake.ran == fake.timed == [] and gpu.measured_plans() == {}  # nothing run, nothing kept as measured
    assert not gpu.timing_impossible()
    eager = gpu.choose(*_args(x), run=fake.run, timer=fake.timer)  # the next eager call still measures
    assert eager.chosen == "dense" and len(fake.timed) == 5
    with monkeypatch.context() as mp:
        WHERE_TIMING_IS_IMPOSSIBLE[where](mp)
        assert gpu.choose(*_args(x), run=fake.run, timer=fake.timer) is eager  # what the warm-up measured
        monkeypatch.setattr(gpu, "MEASURE", True)  # even asked for, nothing is timed here
        assert gpu.choose(*_args(x, stride=(2, 2)), run=fake.run, timer=fake.timer).measured_us is None
    assert len(fake.timed) == 5


def test_a_reference_that_is_not_finite_leaves_the_model_and_caches_nothing():
    nan = torch.full((2, COUT, 9, 9), float("nan"))
    fake = Fake({"dense": 1e-6, "four-stage": 4e-6, "fused-rows": 3e-6, "fused-taps": 2e-6, "fused-wide": 2e-6},
                output=nan)
    x = torch.randn(2, 8, 9, 9)
    plan = gpu.choose(*_args(x), run=fake.run, timer=fake.timer)
    assert plan.chosen == "fused-taps" and plan.measured_us == {} and set(plan.refused) == set(plan.modeled_us)
    assert fake.timed == [] and gpu.measured_plans() == {}
    gpu.choose(*_args(x), run=fake.run, timer=fake.timer)
    assert len(fake.ran) == 2 * 6  # measured again: the reference and the five candidates, twice


def test_a_layer_runs_what_the_measured_plan_picked(monkeypatch, device):
    """Through a real CPConv2d (backend="auto"): the plan's candidates run for real (under the interpreter on a
    CPU), the timer is the module's hook, and the layer's output is the chosen strategy's."""
    from cpkernels.kernels import cp_conv2d_fused as fused

    monkeypatch.setattr(frontend, "resolve_backend", lambda backend, x: "gpu-plan")  # what a CUDA tensor gets
    monkeypatch.setattr(gpu, "MEASURED_TOP", 1)
    seconds = {"dense": 3e-6, "four-stage": 2e-6, "fused-taps": 1e-6}
    timed = []
    monkeypatch.setattr(gpu, "TIMER", lambda fn: timed.append(fn.args[0]) or seconds[fn.args[0]])
    f = random_factors(COUT, 8, KERNEL, RANK, device=device)
    bias = torch.randn(COUT, device=device)
    layer = CPConv2d.from_factors(f, bias, padding=1)
    x = torch.randn(2, 8, 9, 9, device=device)
    with torch.no_grad():
        y = layer(x)
        (decided,) = gpu.measured_plans().values()
        assert decided.chosen == "fused-taps" and sorted(timed) == ["dense", "four-stage", "fused-taps"]
        assert fused.best_config()["kernel"] == "taps"  # the last launch: the layer's own call
        assert_matches_oracle(y, oracle_conv2d(x, f, bias, padding=1), torch.float32)
        assert_matches_oracle(layer(x), oracle_conv2d(x, f, bias, padding=1), torch.float32)
        assert len(timed) == 3  # the second call found the decision
        # Traced (torch.compile's view of it): nothing timed, the cached measured choice kept.
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        x2 = torch.randn(1, 8, 7, 7, device=device)
        assert_matches_oracle(layer(x2), oracle_conv2d(x2, f, bias, padding=1), torch.float32)
    assert len(timed) == 3 and len(gpu.measured_plans()) == 1


def test_gpu_bench_rows_record_the_measured_plan_beside_the_model(monkeypatch):
    """bench/gpu_bench.py on fake cases: the planned case decides by the measured plan, and every row of its
    layout records that choice and its times beside the model's."""
    from bench import gpu_bench

    shape = ConvShape(2, 8, 6, (9, 9), padding=1)
    seconds = {"dense": 5e-6, "four-stage": 4e-6, "fused-rows": 3e-6, "fused-taps": 1e-6, "fused-wide": 2e-6}
    fake = Fake(seconds, wrong={"fused-taps"})
    x = torch.randn(2, 8, 9, 9)

    def planned(x_):
        gpu.choose(*_args(x_), run=fake.run, timer=fake.timer)

    def fake_cases(shape, rank, dtype, device, backends):
        return [Case(b, layout, planned if b == "planned" else (lambda x_: None), xs, 1)
                for layout, xs in (("nchw", x), ("channels_last", x.to(memory_format=torch.channels_last)))
                for b in ("dense", "reference", "planned")]

    monkeypatch.setattr(gpu_bench, "build_cases", fake_cases)
    rows = gpu_bench.bench_layer(shape, RANK, torch.float32, "cpu", 1e9)
    assert len(rows) == 6
    for r in rows:
        assert r["planned"] == "fused-taps" and r["measured_choice"] == "fused-wide"
        assert r["refused"] == {"fused-taps": pytest.approx(1.0, rel=1e-2)}
        assert r["plan_measured_us"] == {"dense": 5.0, "four-stage": 4.0, "fused-rows": 3.0, "fused-wide": 2.0}
        assert r["plan_modeled_us"] == _modeled(x).modeled_us
        assert r["modeled_us"] == r["plan_modeled_us"][r["strategy"]]
    assert [r["strategy"] for r in rows if r["backend"] == "planned"] == ["fused-wide", "fused-wide"]
    text = gpu_bench.to_markdown({"device": "cpu", "torch": "t", "triton": None, "cudnn": None, "git_commit": "c"},
                                 1.0, rows)
    assert "| planned (model: fused-taps, measured: fused-wide, refused: fused-taps) | nchw |" in text
    assert "| dense | nchw |" in text and "| 5.0 |" in text  # the dense row with the plan's timing of dense
    # Under the model's mode the rows say no measured plan decided.
    monkeypatch.setattr(gpu, "MEASURE", False)
    rows = gpu_bench.bench_layer(shape, RANK, torch.float32, "cpu", 1e9)
    assert all(r["measured_choice"] is None and r["plan_measured_us"] is None for r in rows)


@pytest.mark.parametrize("warm", [pytest.param(True, id="after-eager-calls"), pytest.param(False, id="cold")])
def test_a_compiled_layer_runs_the_warm_ups_measured_choice_else_the_models(monkeypatch, warm):
    """torch.compile records the plan's choice into the graph when it traces, and times nothing: the measured
    choice an eager call cached for the signature, else the model's. On a cold cache dynamo runs the model's
    arithmetic as it traces (plain Python on the call's shapes), so fullgraph=True compiles either way."""
    cp_op = importlib.import_module("cpkernels.ops.cp_conv2d")
    monkeypatch.setattr(frontend, "resolve_backend", lambda backend, x: "gpu-plan")
    monkeypatch.setattr(gpu, "MEASURED_TOP", 1)
    seconds = {"dense": 1e-6, "four-stage": 2e-6, "fused-taps": 3e-6}  # the timer says dense, the model fused-taps
    timed = []
    monkeypatch.setattr(gpu, "TIMER", lambda fn: timed.append(fn.args[0]) or seconds[fn.args[0]])
    layer = CPConv2d(8, COUT, KERNEL, RANK, padding=1).eval()
    x = torch.randn(2, 8, 9, 9)
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            if warm:
                y = layer(x)
                assert len(timed) == 3
            y_compiled = torch.compile(layer, backend=backend, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    impls = [n.args[-1] for g in graphs for n in g.graph.nodes
             if n.op == "call_function" and "cpkernels" in str(n.target)]
    expected = "dense" if warm else _modeled(x).model_choice
    assert expected == ("dense" if warm else "fused-taps")
    assert impls == [cp_op.STRATEGY_IMPLS[expected]]
    assert len(timed) == (3 if warm else 0)
    assert_matches_oracle(y_compiled, oracle_conv2d(x, layer.factors, layer.bias, padding=1), torch.float32)
    if warm:
        torch.testing.assert_close(y_compiled, y)
