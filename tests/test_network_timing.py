"""``compress_model(..., keep_dense_where_faster="network")`` (cpkernels/compression/network_timing.py): the convs
put back where the factored layer was not faster inside the network's forward, on a fake timer that says which."""
import pytest
import torch
from torch import nn

import cpkernels
from cpkernels import compress_model, plan_ranks
from cpkernels.compression import network_timing
from cpkernels.core.conv_args import is_channels_last
from cpkernels.dispatch.measured import DENSE_MARGIN


class Net(nn.Module):
    """Three 3x3 convs, the last one shared under two names, a BatchNorm between (its statistics must not move)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.bn, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 32, 3, padding=1)
        self.c_again = self.c

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.bn(self.a(x)))))
        return self.c_again(torch.relu(self.c(x)))


def fake_timer(factored_seconds, seen):
    """A stand-in for ``seconds_in_forward``: runs each forward pass once, checks that every module it is to time
    is the one called there (so the pass has put that form in place), records the first input's layout, and
    says each dense conv took 1 s and each factored layer ``factored_seconds[name]``."""
    def timer(forwards, modules, repeats):
        result = {}
        for which, forward in forwards.items():
            called = set()
            hooks = [m.register_forward_pre_hook(lambda m, args, name=name: called.add(name) or
                                                 seen.append(is_channels_last(args[0])))
                     for name, m in modules[which].items()]
            forward()
            for h in hooks:
                h.remove()
            assert called == set(modules[which]), which
            result[which] = {name: 1.0 if which == "dense" else factored_seconds[name] for name in modules[which]}
        return result
    return timer


@pytest.mark.parametrize(
    "by_plan, factored_seconds",
    [
        # b: faster, but within the margin
        pytest.param(False, {"a": 0.5, "b": 1.0 - DENSE_MARGIN / 2, "c": 2.0}, id="ranks"),
        pytest.param(True, {"b": 0.5, "c": 2.0}, id="mac-plan"),
    ],
)
def test_the_convs_slower_factored_in_the_network_are_put_back(monkeypatch, by_plan, factored_seconds):
    model = Net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    monkeypatch.setattr(network_timing, "seconds_in_forward", fake_timer(factored_seconds, seen))
    rank = plan_ranks(model.eval(), 0.3, input_size=(2, 3, 16, 16), progress=False) if by_plan else 6
    model.train()
    assert not by_plan or set(rank.structure) == set(factored_seconds), rank.structure  # each factored is judged
    compressed, report = compress_model(model, rank, input_size=(2, 3, 16, 16), keep_dense_where_faster="network",
                                        memory_format=None if by_plan else torch.channels_last, progress=False)
    assert seen and all(seen) != by_plan  # the random input in the given layout (the plan's: NCHW)
    back = {name for name, s in factored_seconds.items() if not s < (1 - DENSE_MARGIN) * 1.0}
    assert back and back != set(factored_seconds)  # both outcomes are checked
    rows = {r["name"]: r for r in report.rows}
    for name in factored_seconds:
        layer, row = compressed.get_submodule(name), rows[name]
        if name not in back:
            assert isinstance(layer, cpkernels.CPConv2d) and row["skipped"] is None and row["rank"] is not None
            continue
        assert type(layer) is nn.Conv2d and torch.equal(layer.weight, model.get_submodule(name).weight), name
        assert row["rank"] is None and row["macs_after"] == row["macs_before"] is not None, row
        assert row["params_after"] == row["params_before"], row
        assert row["skipped"].startswith("dense: in the network, rank ") and row["skipped"].endswith(
            f"against the dense conv's 1,000,000.0 µs on cpu, network input 2x3x16x16"
            f"{'' if by_plan else ' channels_last'}")
    assert compressed.c_again is compressed.c  # the shared conv is put back under both names
    assert compressed.training and compressed.bn.training  # the modes are put back
    assert torch.equal(compressed.bn.running_mean, model.bn.running_mean)  # no forward in training mode
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input model untouched
    assert all(type(model.get_submodule(n)) is nn.Conv2d for n in "abc")


def test_the_network_check_times_the_example_inputs_given(monkeypatch):
    seen = []
    monkeypatch.setattr(network_timing, "seconds_in_forward", fake_timer({"a": 0.5, "b": 0.5, "c": 0.5}, seen))
    x = torch.randn(1, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    compressed, report = compress_model(Net().eval(), 6, example_inputs=(x,), keep_dense_where_faster="network",
                                        progress=False)
    assert all(isinstance(compressed.get_submodule(n), cpkernels.CPConv2d) for n in "abc")
    assert seen and all(seen) and all(r["skipped"] is None for r in report.rows)


def test_the_network_check_runs_the_real_timer_without_changing_the_model_state():
    """The real timer on a small network: whatever it keeps, each conv is either factored or the original in the
    report's terms, BatchNorm's statistics do not move and the modes are put back."""
    model = Net().train()
    compressed, report = compress_model(model, 6, input_size=(1, 3, 12, 12), keep_dense_where_faster="network",
                                        progress=False)
    assert compressed.training and torch.equal(compressed.bn.running_mean, model.bn.running_mean)
    assert torch.equal(compressed.bn.num_batches_tracked, model.bn.num_batches_tracked)
    for row in report.rows:
        layer = compressed.get_submodule(row["name"])
        assert (type(layer) is nn.Conv2d) == (row["rank"] is None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"keep_dense_where_faster": "network"}, "keep_dense_where_faster='network' needs input_size",
                     id="network-without-inputs"),
        pytest.param({"keep_dense_where_faster": "fast", "input_size": (1, 3, 8, 8)},
                     "keep_dense_where_faster must be True, False or 'network', got 'fast'", id="unknown-mode"),
    ],
)
def test_bad_keep_dense_arguments_are_refused_before_any_work(monkeypatch, kwargs, message):
    def no_timing(*args):
        raise AssertionError("timed before the arguments were checked")
    monkeypatch.setattr(network_timing, "seconds_in_forward", no_timing)
    with pytest.raises(ValueError, match=message):
        compress_model(Net(), 6, progress=False, **kwargs)
