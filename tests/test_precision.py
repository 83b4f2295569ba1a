"""Precision at the ranks trained networks need: a CNN trained here on scikit-learn's digits, its
second conv decomposed at R = 1.25 C, whose terms cancel. Every path a plan picks in 16 bits stays
within 2x the dense conv's error at the same dtype, against float64 with the same rounded inputs and
factors."""
import pytest
import torch

from cpkernels import cp_conv2d, decompose_conv

from .oracle import oracle_conv2d

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def trained_layer():
    """(conv, its input activations) of a digits CNN trained for a few epochs."""
    from cpkernels.tools.digits import load_digits_tensors, make_cnn, train

    torch.manual_seed(0)
    x_train, y_train, _, _, x_all = load_digits_tensors()
    model = make_cnn()
    train(model, x_train, y_train, epochs=6, lr=3e-3, seed=0)
    with torch.no_grad():
        activations = model[:2](x_all[:64])  # the input of the second conv (32 -> 64 channels)
    return model[2], activations


def _errors(y, expected):
    return ((y.double() - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def factors_at_trained_rank(trained_layer):
    conv, _ = trained_layer
    factors = decompose_conv(conv.weight.detach(), 40, random_state=0, n_iter_max=60)  # R = 1.25 C
    return factors


def test_trained_terms_cancel(factors_at_trained_rank, trained_layer):
    conv, _ = trained_layer
    assert factors_at_trained_rank.relative_error(conv.weight) < 0.8
    assert factors_at_trained_rank.cancellation() > 2


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
def test_cpu_path_within_twice_the_dense_error(trained_layer, factors_at_trained_rank, dtype):
    conv, activations = trained_layer
    f = factors_at_trained_rank.to(dtype)
    x = activations.to(dtype)
    expected = oracle_conv2d(x, f, conv.bias.to(dtype), padding=1)
    weight = f.to(torch.float64).to_dense().to(dtype)  # the dense layer holding the same weight
    dense = torch.nn.functional.conv2d(x, weight, conv.bias.to(dtype), padding=1)
    cp = cp_conv2d(x, f, conv.bias.to(dtype), padding=1, backend="auto")
    assert _errors(cp, expected) <= 2 * _errors(dense, expected), (_errors(cp, expected), _errors(dense, expected))


def test_wide_kernel_within_twice_the_dense_error(trained_layer, factors_at_trained_rank):
    """fp16 under the interpreter (it has no bf16 arithmetic); on a GPU the same in fp16."""
    fused = pytest.importorskip("cpkernels.kernels.cp_conv2d_fused")
    conv, activations = trained_layer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    f = factors_at_trained_rank.to(device=device, dtype=torch.float16)
    x = activations[:8].to(device=device, dtype=torch.float16)
    bias = conv.bias.to(device=device, dtype=torch.float16)
    expected = oracle_conv2d(x, f, bias, padding=1)
    weight = f.to(torch.float64).to_dense().half()
    dense = torch.nn.functional.conv2d(x.float(), weight.float(), bias.float(), padding=1).half()
    y = fused.cp_conv2d_fused(x, f.input, f.vertical, f.horizontal, f.output, bias, (1, 1), (1, 1, 1, 1), (1, 1),
                              kernel="wide")
    assert _errors(y, expected) <= 2 * _errors(dense, expected), (_errors(y, expected), _errors(dense, expected))
