"""The CPU plan's measured mode (cpkernels/dispatch/cpu.py, the default): it times the dense conv against the
staged arrangement once per call signature, keeps the faster, refuses a candidate that disagrees with the
reference stages, and changes no result. The cost rule's own choices are tested in tests/test_reference.py."""
import pytest
import torch

from cpkernels import cp_conv2d, tucker2_conv2d
from cpkernels.dispatch import cpu as cpu_dispatch
from cpkernels.dispatch import measured as measured_mod
from cpkernels.ops import cp_arranged as cpu_ops
from cpkernels.ops import tucker2_arranged

from .oracle import assert_matches_oracle, oracle_conv2d, random_factors, random_tucker2


@pytest.fixture
def measured(monkeypatch):
    monkeypatch.setattr(cpu_dispatch, "MEASURE", True)
    cpu_dispatch.clear_cache()
    yield
    cpu_dispatch.clear_cache()


def favouring(monkeypatch, winner: str) -> list:
    """Replace the CPU timer by one under which ``winner`` is the fastest candidate; returns the list of the
    candidates it timed."""
    timed = []

    def timer(calls, repeats, warmup=True):
        timed.extend(calls)
        return {name: 1e-3 if name == winner else 2e-3 for name in calls}

    monkeypatch.setattr(measured_mod, "interleaved_median_seconds", timer)
    return timed


def spy(monkeypatch, module, name: str) -> list:
    """Record each call of ``module.name``."""
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kw: calls.append(name) or original(*args, **kw))
    return calls


@pytest.mark.parametrize("winner", [pytest.param("dense-weight", id="dense"), pytest.param("pixel-major", id="staged")])
def test_measured_mode_runs_the_faster_candidate_and_changes_no_result(monkeypatch, measured, winner):
    timed = favouring(monkeypatch, winner)
    dense_calls = spy(monkeypatch, cpu_ops, "cp_conv2d_dense_weight")
    factors = random_factors(24, 20, (3, 3), 24)
    bias = torch.randn(24)
    x = torch.randn(2, 20, 11, 13)
    y = cp_conv2d(x, factors, bias, padding=1)
    assert_matches_oracle(y, oracle_conv2d(x, factors, bias, padding=1), torch.float32)
    assert sorted(timed) == ["dense-weight", "pixel-major"]
    (decision,) = cpu_dispatch.measured_plans().values()
    assert decision.plan.arrangement == winner
    assert set(decision.measured_us) == {"dense-weight", "pixel-major"}

    # The same signature again: no new timing, the kept candidate runs, on fresh input.
    dense_calls.clear()
    x2 = torch.randn(2, 20, 11, 13)
    y2 = cp_conv2d(x2, factors, bias, padding=1)
    assert_matches_oracle(y2, oracle_conv2d(x2, factors, bias, padding=1), torch.float32)
    assert len(timed) == 2
    assert bool(dense_calls) == (winner == "dense-weight")


@pytest.mark.parametrize("staged_us, kept", [
    pytest.param(960.0, "dense-weight", id="4%-faster-stays-dense"),
    pytest.param(940.0, "pixel-major", id="6%-faster-is-staged"),
    pytest.param(1010.0, "dense-weight", id="slower-stays-dense"),
])
def test_measured_mode_keeps_dense_unless_the_staged_form_wins_by_the_margin(monkeypatch, measured, staged_us, kept):
    """A near tie goes to dense: timing noise must not swap a dense conv for a slower factored one."""
    assert measured_mod.DENSE_MARGIN == 0.05
    times = {"dense-weight": 1000e-6, "pixel-major": staged_us * 1e-6}
    monkeypatch.setattr(measured_mod, "interleaved_median_seconds", lambda calls, *a, **k: {n: times[n] for n in calls})
    factors = random_factors(24, 20, (3, 3), 24)
    x = torch.randn(2, 20, 11, 13)
    y = cp_conv2d(x, factors, None, padding=1)
    assert_matches_oracle(y, oracle_conv2d(x, factors, None, padding=1), torch.float32)
    (decision,) = cpu_dispatch.measured_plans().values()
    assert decision.plan.arrangement == kept
    assert decision.measured_us == {"dense-weight": 1000.0, "pixel-major": staged_us}


def test_model_mode_never_times(monkeypatch):
    monkeypatch.setattr(cpu_dispatch, "MEASURE", False)
    monkeypatch.setattr(measured_mod, "interleaved_median_seconds", lambda *a, **k: pytest.fail("timed in model mode"))
    factors = random_factors(8, 6, (3, 3), 4)
    x = torch.randn(2, 6, 9, 9)
    assert_matches_oracle(cp_conv2d(x, factors, padding=1), oracle_conv2d(x, factors, padding=1), torch.float32)
    assert not cpu_dispatch.measured_plans()


def test_measured_mode_refuses_a_candidate_that_disagrees(monkeypatch, measured):
    favouring(monkeypatch, "dense-weight")
    monkeypatch.setattr(cpu_ops, "cp_conv2d_dense_weight", lambda x, *rest: torch.zeros(2, 8, 9, 9))
    factors = random_factors(8, 6, (3, 3), 4)
    with pytest.raises(RuntimeError, match="dense-weight differs from the reference path"):
        cp_conv2d(torch.randn(2, 6, 9, 9), factors, padding=1)
    assert not cpu_dispatch.measured_plans()


@pytest.mark.parametrize("winner", [pytest.param("dense-weight", id="dense"), pytest.param("nchw", id="staged")])
def test_measured_mode_keeps_gradients(monkeypatch, measured, winner):
    """Timing runs without autograd; the call itself then runs the kept candidate with it."""
    favouring(monkeypatch, winner)
    factors = random_factors(8, 6, (3, 5), 3, groups=2, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (torch.randn(2, 6, 9, 10, dtype=torch.float64),
                                                   *factors.as_tuple(), torch.randn(8, dtype=torch.float64))]

    def grads(backend):
        x, *rest = leaves
        y = cp_conv2d(x, type(factors)(*rest[:4]), rest[4], stride=(2, 1), padding=(1, 2), backend=backend)
        return torch.autograd.grad((y * y).sum(), leaves)

    got, expected = grads("auto"), grads("reference")
    (decision,) = cpu_dispatch.measured_plans().values()
    assert decision.plan.arrangement == winner
    for g, e in zip(got, expected):
        assert_matches_oracle(g, e, torch.float64)


def test_measured_mode_picks_dense_where_cp_cannot_win(measured):
    """On this machine, with its real timer: a layer ranked at 36x its channels does 9x the dense conv's MACs
    and moves more bytes; the measured mode runs dense there. (At 9x its channels, 2.4x the MACs, a loaded
    2-core machine once timed the stages faster: the margin must be beyond what load can move.)"""
    factors = random_factors(16, 16, (3, 3), 576)
    x = torch.randn(2, 16, 40, 40)
    y = cp_conv2d(x, factors, padding=1)
    assert_matches_oracle(y, oracle_conv2d(x, factors, padding=1), torch.float32)
    (decision,) = cpu_dispatch.measured_plans().values()
    assert decision.plan.arrangement == "dense-weight", decision.measured_us


@pytest.mark.parametrize("winner", [pytest.param("dense-weight", id="dense"), pytest.param("stages", id="staged")])
def test_measured_mode_for_tucker2(monkeypatch, measured, winner):
    favouring(monkeypatch, winner)
    dense_calls = spy(monkeypatch, tucker2_arranged, "tucker2_conv2d_dense_weight")
    factors = random_tucker2(12, 10, (3, 3), (6, 5))
    bias = torch.randn(12)
    x = torch.randn(2, 10, 9, 11)
    y = tucker2_conv2d(x, factors, bias, stride=2, padding=(1, 0))
    assert_matches_oracle(y, oracle_conv2d(x, factors, bias, stride=2, padding=(1, 0)), torch.float32)
    (decision,) = cpu_dispatch.measured_plans().values()
    assert decision.plan.arrangement == winner
    dense_calls.clear()
    tucker2_conv2d(x, factors, bias, stride=2, padding=(1, 0))
    assert bool(dense_calls) == (winner == "dense-weight")


def test_call_key_covers_what_changes_the_choice():
    x = torch.empty(2, 8, 9, 9)
    args = (4, 1, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    key = cpu_dispatch.call_key(x, *args, False)
    assert key != cpu_dispatch.call_key(x, *args, True)  # gradients wanted
    assert key != cpu_dispatch.call_key(x.double(), *args, False)
    assert key != cpu_dispatch.call_key(x.to(memory_format=torch.channels_last), *args, False)
    assert key != cpu_dispatch.call_key(torch.empty(3, 8, 9, 9), *args, False)
    assert key != cpu_dispatch.call_key(x, (4, 4), *args[1:], False)  # a Tucker-2 layer of the same dimensions
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert key != cpu_dispatch.call_key(x, *args, False)
    finally:
        torch.set_num_threads(threads)


def test_plan_mode_switch(monkeypatch):
    monkeypatch.setattr(cpu_dispatch, "MEASURE", None)
    monkeypatch.delenv("CPKERNELS_CPU_PLAN", raising=False)
    assert cpu_dispatch.measuring()  # the default
    monkeypatch.setenv("CPKERNELS_CPU_PLAN", "model")
    assert not cpu_dispatch.measuring()
    monkeypatch.setenv("CPKERNELS_CPU_PLAN", "fastest")
    with pytest.raises(ValueError, match="CPKERNELS_CPU_PLAN must be one of"):
        cpu_dispatch.measuring()


def test_deterministic_algorithms_turn_the_default_measuring_off(monkeypatch):
    monkeypatch.setattr(cpu_dispatch, "MEASURE", None)
    monkeypatch.delenv("CPKERNELS_CPU_PLAN", raising=False)
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert not cpu_dispatch.measuring()
        monkeypatch.setenv("CPKERNELS_CPU_PLAN", "measure")  # asked for by name: measured all the same
        assert cpu_dispatch.measuring()
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


# The dense arrangement reuses its reconstructed weight between calls that need no gradient.
def _dense_call(factors, x, bias=None):
    from cpkernels.ops.reference import cp_conv2d_dense_weight

    return cp_conv2d_dense_weight(x, factors.input, factors.vertical, factors.horizontal, factors.output, bias,
                                  (1, 1), (1, 1, 1, 1), (1, 1))


def test_dense_weight_is_reused_until_a_factor_changes(monkeypatch):
    from cpkernels.ops import reference

    builds = spy(monkeypatch, reference, "reconstruct")
    factors = random_factors(8, 6, (3, 3), 5)
    bias = torch.randn(8)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 6, 7, 7)
            assert_matches_oracle(_dense_call(factors, x, bias), oracle_conv2d(x, factors, bias, padding=1),
                                  torch.float32)
        assert len(builds) == 1
        factors.vertical.mul_(-2.0)  # in place: the version counter moves
        x = torch.randn(2, 6, 7, 7)
        assert_matches_oracle(_dense_call(factors, x, bias), oracle_conv2d(x, factors, bias, padding=1),
                              torch.float32)
        assert len(builds) == 2
        other = type(factors)(factors.output.clone(), *factors.as_tuple()[1:])  # a new tensor, equal values
        _dense_call(other, x)
        assert len(builds) == 3


def test_dense_weight_is_rebuilt_for_gradients_and_forgotten_with_its_factors(monkeypatch):
    import gc

    from cpkernels.ops import reference

    builds = spy(monkeypatch, reference, "reconstruct")
    factors = random_factors(8, 6, (3, 3), 5)
    leaves = type(factors)(*(f.clone().requires_grad_() for f in factors.as_tuple()))
    x = torch.randn(2, 6, 7, 7)
    for _ in range(2):
        y = _dense_call(leaves, x)
        (g,) = torch.autograd.grad(y.sum(), [leaves.output])
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert len(builds) == 2
    with torch.no_grad():
        _dense_call(leaves, x)
    entries = len(reference._DENSE_WEIGHTS)
    del leaves, y  # y's graph holds the leaves
    gc.collect()
    assert len(reference._DENSE_WEIGHTS) == entries - 1


def test_dense_weight_kept_in_inference_mode_serves_a_later_input_gradient():
    """A weight first built under ``inference_mode`` is a plain tensor: a later call whose input wants a
    gradient (frozen factors) can save it for backward."""
    factors = random_factors(8, 6, (3, 3), 5)
    x = torch.randn(2, 6, 7, 7)
    with torch.inference_mode():
        _dense_call(factors, x)
    xg = x.clone().requires_grad_()
    y = _dense_call(factors, xg)
    (g,) = torch.autograd.grad(y.sum(), [xg])
    expected = oracle_conv2d(xg.double(), factors, padding=1)
    (g64,) = torch.autograd.grad(expected.sum(), [xg])
    assert_matches_oracle(g, g64.double(), torch.float32)


def test_cpu_candidates_take_turns_after_their_checks():
    """Without a timer, the CPU candidates are timed round by round (a load change lands on all alike), after each
    has run once for the check, which is also its warm-up."""
    calls = []

    def run(name):
        calls.append(name)
        return torch.ones(3)

    times = measured_mod.measure(run, ("dense", "staged"), torch.float32, reference="reference")
    assert calls == ["reference", "dense", "staged"] + ["dense", "staged"] * measured_mod.CPU_REPEATS
    assert set(times) == {"dense", "staged"} and all(t > 0 for t in times.values())
