"""A residual network of bottleneck blocks (1x1 -> 3x3 -> 1x1, BatchNorm after each conv, a strided 1x1 shortcut
conv) trained on the digits: a whole-network budget met on its total conv MACs, BatchNorm folding exact in eval
mode, the output error at equal MACs with and without folding, and folding refused on a model in training mode."""
import copy

import pytest
import torch
from torch import nn

from cpkernels import CPConv2d, SVDConv2d, TuckerConv2d, compress_model, plan_ranks
from cpkernels.compression.batchnorm import fold_batchnorm
from cpkernels.tools.bottleneck import Bottleneck, trained_bottleneck_net
from cpkernels.tools.digits import accuracy, output_change
from tests.oracle import TOLERANCE
from tests.test_network_budget import dense_macs_of_every_conv

INPUT = (1, 1, 8, 8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The module runs on one thread: on a loaded two-core machine OpenMP's barriers cost far more than the second
    core gives (3 epochs of training took 8 s on one thread and 185 s on two, at a load average of 10), and one
    thread trains the same weights run after run on a given CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread):
    """(model, data): the digits bottleneck network, trained once."""
    pytest.importorskip("sklearn")
    model, data = trained_bottleneck_net(seed=0, epochs=8)
    assert accuracy(model, data[2], data[3]) > 95.0  # it learnt the digits (98.67 % here)
    return model, data


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def factored_macs(model, x) -> dict[str, int]:
    """MACs of every factored layer, counted from the shapes of its input and output and its factors' ranks
    (stage by stage: CP's Cin->R at the input's pixels, kh x 1 at the output's rows and the input's columns,
    1 x kw and R->Cout at the output's pixels; Tucker-2's Cin->R_in, R_in->R_out kh x kw, R_out->Cout; the SVD's
    Cin->R and R->Cout at the output's pixels)."""
    macs = {}

    def hook(name):
        def record(m, args, y):
            (n, cin, h, w), (_, cout, oh, ow) = args[0].shape, y.shape
            (kh, kw), g = m.kernel_size, m.groups
            if isinstance(m, SVDConv2d):
                macs[name] = n * oh * ow * m.rank * (cin + cout)
            elif isinstance(m, TuckerConv2d):
                r_out, r_in = m.rank
                macs[name] = n * (h * w * cin * r_in + oh * ow * g * r_out * r_in * kh * kw + oh * ow * r_out * cout)
            else:
                r = m.rank * g
                macs[name] = n * (h * w * (cin // g) * r + oh * w * kh * r + oh * ow * (kw + cout // g) * r)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (CPConv2d, TuckerConv2d, SVDConv2d))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return macs


def test_the_network_has_the_bottleneck_shape(trained):
    model, _ = trained
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 3
    kernels = [(m.conv1.kernel_size, m.conv2.kernel_size, m.conv3.kernel_size) for m in blocks]
    assert kernels == [((1, 1), (3, 3), (1, 1))] * 3
    strided = [m for m in blocks if m.conv2.stride == (2, 2)]
    shortcut = strided[0].shortcut[0]
    assert len(strided) == 1 and shortcut.stride == (2, 2) and shortcut.kernel_size == (1, 1)
    assert all(isinstance(m.bn1, nn.BatchNorm2d) and isinstance(m.bn3, nn.BatchNorm2d) for m in blocks)


def test_a_whole_network_budget_of_half_is_met_on_the_total_conv_macs(trained):
    model, _ = trained
    x = torch.zeros(INPUT)
    dense = dense_macs_of_every_conv(model, x)
    plan = plan_ranks(model, 0.5, decomposition="auto", input_size=INPUT, n_iter_max=10, progress=False)
    compressed, _ = compress_model(model, plan)
    factored = factored_macs(compressed, x)
    left_dense = dense_macs_of_every_conv(compressed, x)
    assert set(factored) | set(left_dense) == set(dense) and not set(factored) & set(left_dense)
    assert all(left_dense[n] == dense[n] for n in left_dense)
    assert sum(factored.values()) + sum(left_dense.values()) <= 0.5 * sum(dense.values())
    assert "0" in left_dense  # the stem (one input channel) stays dense and still counts
    rows = {r["name"]: r for r in plan.rows}
    pointwise = [n for n in dense if rows[n]["shape"][2:] == (1, 1)]
    svd = [n for n in pointwise if rows[n]["decomposition"] == "svd"]
    assert svd and all(isinstance(compressed.get_submodule(n), SVDConv2d) for n in svd)
    assert all(factored[n] == rows[n]["cost_after"] for n in factored)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_folding_keeps_the_eval_output_bit_close_and_the_model_untouched(trained, dtype):
    model, data = trained
    model = copy.deepcopy(model).to(dtype)
    before = _state(model)
    folded, pairs = fold_batchnorm(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(c for c, _ in pairs) == sorted(convs)  # every conv has its own BatchNorm here
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = data[2].to(dtype)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(folded(x), expected, rtol=0, atol=TOLERANCE[dtype] * expected.abs().max().item())
    assert _unchanged(model, before) and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(pairs)


def test_the_output_error_at_equal_macs_with_and_without_folding(trained):
    """Measured on a 2-core Intel Xeon VM (AVX-512, torch 2.13.0+cpu, one thread, load average 8 on 2 cores), the
    relative change of the logits on the 450 test images, without folding -> with, seeds 0 / 1 / 2 (seed 0 is the
    fixture's):

    - ``plan_ranks(0.75, decomposition="auto", method="data")`` (0.747 of the conv MACs either way):
      0.3154 -> 0.3122, 0.3683 -> 0.3718, 0.3580 -> 0.3712; at 0.9 (0.889): 0.0527 -> 0.0551,
      0.0575 -> 0.0652, 0.0572 -> 0.0626; at 0.6 both wreck the network (logits moved 0.94-1.13).
    - ``compress_model(rank=0.9, decomposition="auto")`` (0.905 of the conv MACs, the same ranks either way):
      0.6483 -> 0.5918, 0.5372 -> 0.5194, 0.6353 -> 0.7247; at 0.75 (0.778): 0.7251 -> 0.7771,
      0.7989 -> 0.6706, 0.8486 -> 0.8831.

    Folding does not lower the error here: the data plans move within 4 % at 0.75 (-1.0, +1.0, +3.7 %) and come
    out 5-13 % worse at 0.9, and the uniform ranks move either way by up to 16 %. So only a wide margin is
    asserted, both ways: each within 1.5x of the other."""
    model, data = trained
    x_train, _, x_test, _, _ = data
    calibration = list(x_train.split(256))
    errors = {}
    for fold in (False, True):
        plan = plan_ranks(model, 0.75, decomposition="auto", method="data", calibration=calibration,
                          fold_batchnorm=fold, progress=False)
        errors["data", fold] = output_change(compress_model(model, plan)[0], model, x_test), \
            plan.totals["network_fraction"]
        compressed, report = compress_model(model, rank=0.9, decomposition="auto", fold_batchnorm=fold,
                                            input_size=INPUT, progress=False)
        errors["uniform", fold] = output_change(compressed, model, x_test), \
            sum(r["macs_after"] for r in report.rows) / sum(r["macs_before"] for r in report.rows)
    print({k: (round(e, 4), round(f, 4)) for k, (e, f) in errors.items()})
    for method in ("data", "uniform"):
        (plain, plain_macs), (folded, folded_macs) = errors[method, False], errors[method, True]
        assert folded_macs == pytest.approx(plain_macs, abs=0.01)  # equal MACs
        assert 0 < plain < 1 and 0 < folded < 1  # neither destroys the network
        assert folded < 1.5 * plain and plain < 1.5 * folded


def test_folding_in_plan_ranks_refuses_a_model_in_training_mode_untouched(trained):
    """tests/test_batchnorm.py covers fold_batchnorm and compress_model on a model wholly in training mode; here
    plan_ranks, and a single BatchNorm left in training mode in an eval model, which the message names."""
    model, data = trained
    block = model[4]
    block.bn2.train()
    before = _state(model)
    try:
        with pytest.raises(RuntimeError, match=r"eval mode .*BatchNorm2d '4\.bn2' is in training mode"):
            plan_ranks(model, 0.5, decomposition="auto", input_size=INPUT, fold_batchnorm=True, progress=False)
        with pytest.raises(RuntimeError, match=r"'4\.bn2' is in training mode"):
            compress_model(model, rank=0.5, decomposition="auto", fold_batchnorm=True, progress=False)
        assert _unchanged(model, before)
        assert block.bn2.training and not block.bn1.training and not model.training
    finally:
        block.bn2.eval()
