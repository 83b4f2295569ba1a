"""The package's one timer (cpkernels.core.timing): what it calls and what it returns, on a fake clock."""
import pytest

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
