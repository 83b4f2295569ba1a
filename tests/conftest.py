import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter, which must be switched on before
# triton compiles them (cpkernels imports its kernels lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
    from cpkernels.dispatch import cpu

    monkeypatch.setattr(cpu, "MEASURE", False)
    cpu.clear_cache()


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 results are compared with float64 at fp32 tolerance, so TF32 (PyTorch's default for cuDNN
    convs, which the fused kernel follows) is off; tests that want it turn it on."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
