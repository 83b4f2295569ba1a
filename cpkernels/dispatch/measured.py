"""Measured choices, shared by the CPU and the GPU plans: run every candidate once, check that it computes
what a reference computes, time it, and let the caller keep the fastest (``torch.backends.cudnn.benchmark``
does the same for cuDNN's algorithms), dense where nothing beats it by
:data:`DENSE_MARGIN`. A candidate that disagrees is never picked: by default it is an error;
a caller that passes ``refused`` gets it left out of the times and recorded there instead.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Callable, Optional

import torch

from cpkernels.core.timing import cuda_median_seconds, interleaved_median_seconds, median_seconds

# A factored candidate replaces the dense one only when it is at least this much faster in the same measurement:
# on a shared 2-core VM a whole network's time moved by up to 10 % between two measurements of the same model
# (ResNet-18 in ONNX Runtime, batch 1), so a near tie that goes to the factored form can run slower than the dense
# conv it replaced, while one that goes to dense costs at most this margin.
DENSE_MARGIN = 0.05


def plan_measures(override: Optional[bool], variable: str, mode: Callable[[], str]) -> bool:
    """Whether a plan times a new call signature: ``override`` (its module's ``MEASURE``) if set, else ``mode()``
    (the reading of ``variable``) is ``"measure"``; with ``variable`` unset, not under
    ``torch.use_deterministic_algorithms(True)`` (a timed choice can differ between runs, and the candidates round
    differently)."""
    if override is not None:
        return override
    if variable not in os.environ and torch.are_deterministic_algorithms_enabled():
        return False
    return mode() == "measure"


def fastest_keeping_dense(times: dict, dense: str, margin: float = DENSE_MARGIN) -> str:
    """The key of the least time in ``times``, unless it is within ``margin`` of ``times[dense]`` (or ``dense`` is
    the least): then ``dense``. ``dense`` absent from ``times`` (refused, or not a candidate): the least."""
    best = min(times, key=times.get)
    if dense in times and not times[best] < (1.0 - margin) * times[dense]:
        return dense
    return best


# Rounds of the CPU candidates' interleaved timing (median_seconds' default count).
CPU_REPEATS = 5

# Largest difference from the reference, relative to its largest |value|, that a candidate may show before
# it is refused: fp32 loose enough for TF32 on a GPU.
AGREEMENT = {torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}


def measure(run: Callable[[str], torch.Tensor], candidates: tuple[str, ...], dtype: torch.dtype,
            timer: Optional[Callable[[Callable], float]] = None, reference: str = "four-stage",
            refused: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Median microseconds of every candidate, after checking each against ``run(reference)``. ``timer``
    gets ``partial(run, candidate)`` and returns seconds.

    A candidate whose largest difference from the reference exceeds :data:`AGREEMENT` (relative to the
    reference's largest |value|) raises a RuntimeError; with ``refused`` (a dict) it is not timed and its
    relative difference is written there instead (NaN where either output is not finite), so the caller
    picks among the rest. A candidate is never timed before it has agreed. Without ``timer``, CPU candidates take
    turns round by round (:func:`cpkernels.core.timing.interleaved_median_seconds`): timed one after the other, a
    change of the machine's load between them decided HED's conv2_1 for dense (109 ms) against a banded CP form
    that ran 87 ms in the same benchmark."""
    expected = run(reference).float()
    interleaved = timer is None and not expected.is_cuda
    timer = timer or (cuda_median_seconds if expected.is_cuda else median_seconds)
    scale = max(expected.abs().max().item(), 1e-6) if expected.numel() else 1.0
    times, agreed = {}, []
    for strategy in candidates:
        y = run(strategy)  # also the warm-up: first-touch page faults and one-off set-up fall outside the timing
        diff = (y.float() - expected).abs().max().item() if y.numel() else 0.0
        if not diff <= AGREEMENT[dtype] * scale:
            if refused is None:
                raise RuntimeError(f"{strategy} differs from the {reference} path by {diff:.3g} "
                                   f"(scale {scale:.3g}); not choosing it")
            refused[strategy] = float(f"{diff / scale:.3g}")
            continue
        if interleaved:
            agreed.append(strategy)
        else:
            times[strategy] = round(timer(partial(run, strategy)) * 1e6, 2)
    if agreed:
        # no warm-up: each candidate has just run for the check
        seconds = interleaved_median_seconds({s: partial(run, s) for s in agreed}, CPU_REPEATS, warmup=False)
        times = {s: round(seconds[s] * 1e6, 2) for s in agreed}
    return times
