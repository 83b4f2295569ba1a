import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter, which must be switched on before
# triton compiles them (cpkernels imports its kernels lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cpkernels import compress_model  # noqa: E402 -- after the switch above
from cpkernels.dispatch import cpu, gpu  # noqa: E402
from cpkernels.tools.digits import trained_cnn  # noqa: E402


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_plan_by_its_cost_rule(monkeypatch):
    """The CPU plan's default measured mode times dense against the staged arrangement; tests see the cost
    rule's choices instead, so that each arrangement they force is the one that runs. The measured mode's
    own tests (tests/test_cpu_plan.py) turn it back on."""
    monkeypatch.setattr(cpu, "MEASURE", False)
    cpu.clear_cache()


@pytest.fixture(autouse=True)
def _gpu_plan_by_its_model(monkeypatch):
    """The GPU plan measures by default too; on a GPU, tests see the model's choices (each strategy a test forces
    is the one that runs, and no new signature compiles and times three kernels). The measured mode's own tests
    (tests/test_gpu_measured_plan.py) set it per test."""
    monkeypatch.setattr(gpu, "MEASURE", False)
    gpu.clear_cache()


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 results are compared with float64 at fp32 tolerance, so TF32 (PyTorch's default for cuDNN
    convs, which the fused kernel follows) is off; tests that want it turn it on."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="session")
def compressed_digits():
    """(dense, compressed, x_train, x_test): the digits CNN trained once for the session (20 epochs, seed 0) and
    compressed to a tenth of its conv parameters, for the tests of the passes that take a compressed model back
    toward dense (compensation, distillation). Tests copy what they change. Trained on one thread: on two
    busy cores, two threads were 20x slower here."""
    pytest.importorskip("sklearn", reason="the digits data ship with scikit-learn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, (x_train, _, x_test, _, _) = trained_cnn(0, epochs=20)
        compressed, _ = compress_model(model, rank=0.1, random_state=0, n_iter_max=20, progress=False)
    finally:
        torch.set_num_threads(threads)
    return model, compressed, x_train, x_test

