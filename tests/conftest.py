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
