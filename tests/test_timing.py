"""The package's one timer (cpkernels.core.timing): what it calls and what it returns, on a fake clock."""
import pytest
import torch

from cpkernels.core import timing


class FakeClock:
    """perf_counter that moves only when the timed function runs: each call takes the next of ``durations``."""

    def __init__(self, durations):
        self.now, self.calls, self.durations = 0.0, 0, list(durations)

    def perf_counter(self):
        return self.now

    def fn(self):
        self.now += self.durations[min(self.calls, len(self.durations) - 1)]
        self.calls += 1


@pytest.fixture
def clock(monkeypatch):
    def make(durations):
        fake = FakeClock(durations)
        monkeypatch.setattr(timing.time, "perf_counter", fake.perf_counter)
        return fake
    return make


def test_the_median_of_the_calls_after_the_warm_up(clock):
    fake = clock([8.0, 0.5, 0.125, 0.375, 0.25, 0.4375])  # the warm-up's 8 s is not counted; sums exact in binary
    assert timing.median_seconds(fake.fn, repeats=5) == 0.375
    assert fake.calls == 6


# durations exact in binary, so that the sums meet the budget where arithmetic says
@pytest.mark.parametrize("duration, calls", [(0.25, 1 + timing.MIN_REPEATS), (0.0625, 1 + 5), (0.015625, 1 + 10)])
def test_a_time_budget_stops_after_three_calls_at_least(clock, duration, calls):
    fake = clock([duration])
    assert timing.median_seconds(fake.fn, repeats=10, budget_s=0.3) == duration
    assert fake.calls == calls


def test_no_budget_takes_every_repeat(clock):
    fake = clock([1.0])
    timing.median_seconds(fake.fn, repeats=7)
    assert fake.calls == 8


def test_a_negative_budget_is_refused_before_any_call(clock):
    fake = clock([1.0])
    with pytest.raises(ValueError, match="budget_s must be >= 0"):
        timing.median_seconds(fake.fn, budget_s=-1.0)
    assert fake.calls == 0


class Tick(torch.nn.Module):
    """A module whose call takes ``cost`` seconds on the fake clock, ``extra`` more after each call."""

    def __init__(self, clock, cost, extra=0.0):
        super().__init__()
        self.clock, self.cost, self.extra = clock, cost, extra

    def forward(self, x):
        self.clock.now += self.cost
        self.cost += self.extra
        return x


def test_seconds_in_forward_times_each_module_inside_its_forward_pass(clock):
    """Each named module's own calls in each forward pass (a module called twice in a pass: the sum), the median
    over the rounds after one warm-up pass each; the time between the modules is not counted, the passes take
    turns, and no hook is left behind."""
    fake = clock([0.0])
    a, b, between = Tick(fake, 1.0, extra=1.0), Tick(fake, 0.5), Tick(fake, 100.0)
    order = []

    def first():
        order.append("first")
        a(b(between(a(None))))

    def second():
        order.append("second")
        b(None)

    seconds = timing.seconds_in_forward({"first": first, "second": second},
                                        {"first": {"a": a, "b": b}, "second": {"b": b}}, repeats=3)
    # a's calls cost 1, 2 (warm-up), then 3+4, 5+6, 7+8: median 11; b's always 0.5
    assert seconds == {"first": {"a": 11.0, "b": 0.5}, "second": {"b": 0.5}}
    assert order == ["first", "second"] * 4
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in (a, b, between))


def test_seconds_in_forward_refuses_a_module_its_pass_does_not_call_or_named_twice(clock):
    fake = clock([0.0])
    a, b = Tick(fake, 1.0), Tick(fake, 1.0)
    with pytest.raises(ValueError, match="'b' was not called by the forward pass it is timed in"):
        timing.seconds_in_forward({"f": lambda: a(None)}, {"f": {"a": a, "b": b}}, repeats=1)
    with pytest.raises(ValueError, match="a module is named twice"):
        timing.seconds_in_forward({"f": lambda: a(None)}, {"f": {"a": a, "also a": a}}, repeats=1)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in (a, b))
