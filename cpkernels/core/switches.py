"""Environment switches, read at call time. The lowest layer of the package: the op, the kernels and
the plans all read them from here, so none of those has to import another for a switch.

- ``TRITON_INTERPRET=1``: Triton's interpreter runs the kernels on CPU tensors (set before the
  kernels' module is imported; see ``tests/conftest.py``).
- ``CPKERNELS_AUTOTUNE=0``: the fused kernels take the first fitting tile instead of timing them all
  (every tile is a compile of seconds on a GPU).
- ``CPKERNELS_GPU_PLAN=measure`` (the default): ``backend="auto"`` on CUDA times the model's best few
  strategies, dense and the reference path on the first call of each signature, and keeps the fastest
  that agrees with the reference (like ``torch.backends.cudnn.benchmark``); ``model`` decides from the
  cost model alone. An unset variable means ``model`` under ``torch.use_deterministic_algorithms(True)``;
  graph capture, ``torch.compile`` and ONNX export never time (:mod:`cpkernels.dispatch.gpu` says what
  they run). :data:`cpkernels.dispatch.gpu.MEASURE` overrides it.
- ``CPKERNELS_CPU_PLAN=measure`` (the default): the CPU path times the dense conv against its staged
  arrangement once per call signature and keeps the faster on the machine it runs on; ``model``
  decides from the CPU cost rule alone (no timing, the same choice on every machine), and is what an
  unset variable means under ``torch.use_deterministic_algorithms(True)``.
  :data:`cpkernels.dispatch.cpu.MEASURE` overrides it.
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


GPU_PLAN_MODES = ("measure", "model")
CPU_PLAN_MODES = ("measure", "model")


def _mode(variable: str, modes: tuple[str, ...]) -> str:
    """The value of ``variable``, one of ``modes`` (the first is the default)."""
    mode = os.environ.get(variable, modes[0])
    if mode not in modes:
        raise ValueError(f"{variable} must be one of {modes}, got {mode!r}")
    return mode


def gpu_plan_mode() -> str:
    return _mode("CPKERNELS_GPU_PLAN", GPU_PLAN_MODES)


def cpu_plan_mode() -> str:
    return _mode("CPKERNELS_CPU_PLAN", CPU_PLAN_MODES)


# os.environ's own dict, in its own key form: a layer's call compares the CPU plan's switch on every call
# (cpkernels.dispatch.cpu.plan_state), and os.environ.get's mapping methods are five Python calls where this is
# one C lookup. Both are CPython's os._Environ internals, kept in step by os.environ's own writes; where they
# are missing, os.environ.get answers the same.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENCODE_KEY = getattr(os.environ, "encodekey", None)


def _raw_switch(variable: str, key):
    if _ENVIRON_DATA is None or key is None:
        return os.environ.get(variable)
    return _ENVIRON_DATA.get(key)


_CPU_PLAN_KEY = _ENCODE_KEY("CPKERNELS_CPU_PLAN") if _ENCODE_KEY is not None else None
_GPU_PLAN_KEY = _ENCODE_KEY("CPKERNELS_GPU_PLAN") if _ENCODE_KEY is not None else None


def cpu_plan_switch():
    """``CPKERNELS_CPU_PLAN`` as os.environ holds it (bytes on POSIX), or None: for telling that it changed,
    not for its meaning (:func:`cpu_plan_mode`)."""
    return _raw_switch("CPKERNELS_CPU_PLAN", _CPU_PLAN_KEY)


def gpu_plan_switch():
    """``CPKERNELS_GPU_PLAN`` as os.environ holds it, or None, as :func:`cpu_plan_switch` for the GPU plan."""
    return _raw_switch("CPKERNELS_GPU_PLAN", _GPU_PLAN_KEY)
