"""BatchNorm folding before decomposition: the folded network computes what the eval-mode network computes,
bad input is refused before any work, and the input model is never modified."""
import pytest
import torch
from torch import nn

from cpkernels import RankPlan, compress_model, plan_ranks
from cpkernels.compression.batchnorm import batchnorm_pairs, fold_batchnorm


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # statistics and affine terms far from the identity, so folding is visible
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return bn


class Residual(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> bn2, plus a 1x1 shortcut whose output is also read unnormalised."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, padding=1, bias=False), _bn(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), _bn(8)
        self.short, self.bn_short = nn.Conv2d(4, 8, 1), _bn(8)

    def forward(self, x):
        s = self.short(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return y + self.bn_short(s) + s  # the shortcut's conv output feeds two users: it must stay unfolded


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), _bn(8), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.body(x)
        return self.body(-x)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make, pairs", [
    pytest.param(Residual, [("conv1", "bn1"), ("conv2", "bn2")], id="traced"),
    pytest.param(Untraceable, [("body.0", "body.1")], id="sequential-fallback"),
])
def test_folding_keeps_the_eval_output_and_leaves_the_input_model_alone(make, pairs):
    model = make().double().eval()
    before = _state(model)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    folded, found = fold_batchnorm(model)
    assert found == pairs == batchnorm_pairs(model)
    for conv_name, bn_name in pairs:
        assert isinstance(folded.get_submodule(bn_name), nn.Identity)
        assert type(folded.get_submodule(conv_name)) is nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(isinstance(model.get_submodule(b), nn.BatchNorm2d) for _, b in pairs)


def test_a_model_in_training_mode_is_refused_untouched():
    model = Residual().train()
    before = _state(model)
    with pytest.raises(RuntimeError, match="eval mode"):
        fold_batchnorm(model)
    with pytest.raises(RuntimeError, match="eval mode"):
        compress_model(model, rank=0.5, fold_batchnorm=True, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_batchnorm_that_two_convs_feed_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(4, 8, 3), nn.Conv2d(4, 8, 3), _bn(8)

        def forward(self, x):
            return self.bn(self.a(x)) + self.bn(self.b(x))

    with pytest.raises(ValueError, match="'bn' is fed by 2 calls"):
        fold_batchnorm(Shared().eval())


@pytest.mark.parametrize("planned", [pytest.param(False, id="rank"), pytest.param(True, id="plan")])
def test_compress_model_folds_first(planned):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), _bn(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          _bn(16)).eval()
    before = _state(model)
    x = torch.randn(2, 8, 12, 12)
    if planned:
        plan = RankPlan.from_json(plan_ranks(model, 0.5, input_size=(1, 8, 12, 12), fold_batchnorm=True,
                                             progress=False).to_json())
        assert plan.fold_batchnorm
        compressed, report = compress_model(model, plan)
    else:
        compressed, report = compress_model(model, rank=16, fold_batchnorm=True, progress=False)
    assert isinstance(compressed[1], nn.Identity) and isinstance(compressed[4], nn.Identity)
    assert any(r["rank"] is not None for r in report.rows) and (planned or all(r["rank"] for r in report.rows))
    folded, _ = fold_batchnorm(model)
    with torch.no_grad():  # the factored layers approximate the folded convs, not the convs before the BatchNorm
        err = (compressed(x) - folded(x)).norm() / folded(x).norm()
    assert err < 0.5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
