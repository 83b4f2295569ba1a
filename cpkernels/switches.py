"""Environment switches, read at call time. The lowest layer of the package: the op, the kernels and
the plans all read them from here, so none of those has to import another for a switch.

- ``TRITON_INTERPRET=1``: Triton's interpreter runs the kernels on CPU tensors (set before the
  kernels' module is imported; see ``tests/conftest.py``).
- ``CPKERNELS_AUTOTUNE=0``: the fused kernels take the first fitting tile instead of timing them all
  (every tile is a compile of seconds on a GPU).
- ``CPKERNELS_GPU_PLAN=measure``: ``backend="auto"`` on CUDA times the candidate strategies of a new
  call signature once and keeps the fastest (like ``torch.backends.cudnn.benchmark``); the default
  ``model`` decides from the cost model alone. :data:`cpkernels.plans.gpu.MEASURE` overrides it.
"""
from __future__ import annotations

import os


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def autotune_enabled() -> bool:
    return os.environ.get("CPKERNELS_AUTOTUNE", "1") != "0"


GPU_PLAN_MODES = ("model", "measure")


def gpu_plan_mode() -> str:
    mode = os.environ.get("CPKERNELS_GPU_PLAN", "model")
    if mode not in GPU_PLAN_MODES:
        raise ValueError(f"CPKERNELS_GPU_PLAN must be one of {GPU_PLAN_MODES}, got {mode!r}")
    return mode
