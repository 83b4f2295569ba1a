"""The one timer of the package: the median time of a call, after a warm-up call.

On the CPU it is wall-clock time over ``repeats`` calls; on a GPU it is Triton's ``do_bench`` (CUDA events,
L2 flushed between calls). The warm-up call takes first-touch page faults, compilation, autotuning and
``cudnn.benchmark`` out of the timing. Every timing in the package and its tools goes through here: the
measured CPU and GPU plans, ``plan_ranks(metric="latency")``, the ONNX forms, the profiler and the benchmarks.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


# The fewest calls a time budget (median_seconds' budget_s) leaves: a median of three outvotes one outlier.
MIN_REPEATS = 3


def median_seconds(fn: Callable[[], object], repeats: int = 5, cuda: bool = False,
                   budget_s: Optional[float] = None) -> float:
    """Median seconds of ``fn()`` after one warm-up call; ``cuda``: timed with CUDA events instead.

    ``budget_s`` (CPU): stop before ``repeats`` calls, after :data:`MIN_REPEATS`, once the timed calls have taken
    that long. A call of a tenth of a second varies far less, relative to its length, than a call of a
    millisecond; without a budget, ten calls of each candidate of a layer at 416x640 are most of a latency plan's
    time."""
    if budget_s is not None and budget_s < 0:
        raise ValueError(f"budget_s must be >= 0, got {budget_s}")
    fn()
    if cuda:
        # triton is optional (CPU-only installs may lack it); a CUDA timing needs it, and it ships with CUDA torch
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e-3
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        if budget_s is not None and len(samples) >= MIN_REPEATS and sum(samples) >= budget_s:
            break
    return sorted(samples)[len(samples) // 2]


def cuda_median_seconds(fn: Callable[[], object]) -> float:
    """:func:`median_seconds` with CUDA events."""
    return median_seconds(fn, cuda=True)


def time_median(fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int = 10,
                budget_s: Optional[float] = None) -> float:
    """Median seconds of ``fn(x)`` under ``torch.inference_mode()``, on ``x``'s device (``budget_s``: as
    :func:`median_seconds`)."""
    with torch.inference_mode():
        return median_seconds(lambda: fn(x), repeats, cuda=x.is_cuda, budget_s=budget_s)


def interleaved_median_seconds(calls: dict[str, Callable[[], object]], repeats: int,
                               warmup: bool = True) -> dict[str, float]:
    """Median wall-clock seconds of each of ``calls`` (name -> call) on the CPU, after one warm-up call each (unless
    ``warmup=False``: the caller has just run each), the calls taking turns in every round, so that a change of the
    machine's load lands on all of them alike. Timed one after the other, the same dense network's time moved by up
    to 2x between runs on a shared 2-core VM; what is compared (a compressed model and its dense original) is timed
    this way."""
    for call in calls.values() if warmup else ():
        call()
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in samples.items()}


def seconds_in_forward(forwards: dict[str, Callable[[], object]], modules: dict[str, dict[str, torch.nn.Module]],
                       repeats: int) -> dict[str, dict[str, float]]:
    """Median wall-clock seconds of each module's calls inside a forward pass, per forward: ``forwards`` maps a
    name to a call that runs one whole forward pass (of a model as it stands then), ``modules[that name]`` the
    modules to time in it, by name (a module called several times in one pass: the sum). After one warm-up call
    each, the forwards take turns in every round (:func:`interleaved_median_seconds`' reason). A module times the
    cache, memory and allocator state the layers before it leave, which a layer timed alone on its own input
    does not see."""
    for forward_name, named in modules.items():
        if len({id(m) for m in named.values()}) != len(named):
            raise ValueError(f"a module is named twice among those timed in {forward_name!r}: name it once")
    samples = {f: {name: [] for name in modules[f]} for f in forwards}
    current: dict[str, float] = {}
    start_of: dict[int, float] = {}

    def start(module, args):  # returns None: a pre-hook's return value would replace the input
        start_of[id(module)] = time.perf_counter()

    def stop(name):
        def hook(module, args, output):  # returns None: a hook's return value would replace the output
            current[name] = current.get(name, 0.0) + time.perf_counter() - start_of.pop(id(module))
        return hook

    def run(forward_name, record: bool):
        handles = []
        try:
            for name, module in modules[forward_name].items():
                handles.append(module.register_forward_pre_hook(start))
                handles.append(module.register_forward_hook(stop(name)))
            current.clear()
            forwards[forward_name]()
        finally:
            for handle in handles:
                handle.remove()
        if record:
            for name in modules[forward_name]:
                if name not in current:
                    raise ValueError(f"{name!r} was not called by the forward pass it is timed in")
                samples[forward_name][name].append(current[name])

    for forward_name in forwards:
        run(forward_name, record=False)
    for _ in range(repeats):
        for forward_name in forwards:
            run(forward_name, record=True)
    return {f: {name: statistics.median(t) for name, t in by_name.items()} for f, by_name in samples.items()}
