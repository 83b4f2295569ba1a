"""Fixtures of the benchmark suites: the environment, measured roofline peaks, and the smoke mode."""
import pytest
import torch

from cpkernels.tools.profile import environment, measure_peaks


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def dtype(device) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    """Under --benchmark-disable every benchmark runs once as a smoke test, at batch 1."""
    return bool(request.config.getoption("benchmark_disable", False))


@pytest.fixture(scope="session")
def env_info(device) -> dict:
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # the dense baseline at its best
    return environment(device)


@pytest.fixture(scope="session")
def peaks(device, dtype, smoke):
    """Copy bandwidth and matmul throughput measured once per session: the roofline of every row."""
    return None if smoke else measure_peaks(device, dtype)
