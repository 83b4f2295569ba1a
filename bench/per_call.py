"""A factored layer's own per-call work at batch 1: the layer's call against the torch ops it runs.

Per family (CP, Tucker-2, SVD) on a tiny input, where the convolution itself costs little, and with and without
autograd, the median per-call time of:

- ``layer``: the factored layer's call (``module(x)``: the memoised checks and plan, then the implementation);
- ``forward``: the layer's ``forward(x)`` called directly, i.e. the layer's call without torch's
  ``nn.Module.__call__``;
- ``functional``: the family's functional op on the layer's factors (``cp_conv2d(x, m.factors, ...)``), which
  works out the checks and the plan on every call, as every layer call did before they were memoised;
- ``impl``: the implementation the CPU plan chose, called directly with the normalised arguments (the CPU
  plan's arrangement, e.g. ``cp_conv2d_arranged``), i.e. the torch ops the layer runs and their own Python;
- ``conv``: the ``nn.Conv2d`` the layer stands for;
- ``module``: an ``nn.Identity`` call, i.e. what torch's ``nn.Module.__call__`` costs any module on this machine
  (``nn.Conv2d`` pays it too).

``layer - impl`` is the layer's per-call work above the ops it runs, torch's module call included;
``forward - impl`` is this package's own share of it: its ``forward`` above the ops it runs. ``layer - impl -
module`` is an older estimate of that share, which takes the module call's cost from an ``nn.Identity`` timed
apart; beside autograd's work the same module call costs this layer more (``layer - forward``). The candidates
are timed interleaved, round by round, so load from other processes falls on each alike; the load average before
and after is recorded.

    python -m bench.per_call --out bench/results/cpu-intel-xeon-avx512-2core
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from bench.report import save_results
from cpkernels import CPConv2d, SVDConv2d, TuckerConv2d, cp_conv2d, svd_conv2d, tucker2_conv2d
from cpkernels.core import conv_args
from cpkernels.tools.profile import environment

CHANNELS, SIZE = 16, 8


def layers() -> dict:
    """Per family: the factored layer, its functional op, and the dense conv it stands for (16 -> 16, 8x8)."""
    c = CHANNELS
    return {
        "cp": (CPConv2d(c, c, 3, rank=4, padding=1), cp_conv2d, nn.Conv2d(c, c, 3, padding=1)),
        "tucker2": (TuckerConv2d(c, c, 3, rank=(4, 4), padding=1), tucker2_conv2d, nn.Conv2d(c, c, 3, padding=1)),
        "svd": (SVDConv2d(c, c, 1, rank=4), svd_conv2d, nn.Conv2d(c, c, 1)),
    }


def impl_call(layer, x: torch.Tensor):
    """``(name, fn)``: the implementation the layer's call runs, called directly with normalised arguments."""
    op = layer.op
    tensors = op.layer_tensors(layer._parameters)
    stride, dilation = layer.stride, layer.dilation
    pad = conv_args.explicit_padding(layer.padding, layer.kernel_size, dilation)
    args = (x, *tensors)
    if op.cpu_plan is None:
        fn = op.impls["cpu"]
        return "cpu", lambda: fn(*args, stride, pad, dilation)
    plan = op.cpu_plan(*args, stride, pad, dilation)
    planned = op.cpu_planned
    return plan.arrangement, lambda: planned(plan, *args, stride, pad, dilation)


def per_call_us(fns: dict, calls: int, rounds: int) -> tuple[dict, dict]:
    """Median microseconds per call of each function, timed ``calls`` at a time, interleaved over ``rounds``:
    wall-clock, and this thread's CPU time (which a loaded machine's waits for a core do not inflate)."""
    for fn in fns.values():  # warm: first-call plans, allocator, caches
        for _ in range(max(10, calls // 10)):
            fn()
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    names = list(fns)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:  # each round starts one later: no order bias
            fn = fns[name]
            start, start_cpu = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                fn()
            cpu[name].append((time.thread_time() - start_cpu) / calls * 1e6)
            wall[name].append((time.perf_counter() - start) / calls * 1e6)
    median = statistics.median
    return ({name: round(median(s), 2) for name, s in wall.items()},
            {name: round(median(s), 2) for name, s in cpu.items()})


def run(calls: int = 300, rounds: int = 41, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    rows, empty = [], nn.Identity()
    for family, (layer, functional, conv) in layers().items():
        for grad in (False, True):
            layer.requires_grad_(grad)
            conv.requires_grad_(grad)
            x = torch.randn(1, CHANNELS, SIZE, SIZE)
            with torch.set_grad_enabled(grad):
                arrangement, impl = impl_call(layer, x)
                fns = {
                    "layer": lambda: layer(x),
                    "forward": lambda: layer.forward(x),
                    "functional": lambda: functional(x, layer.factors, layer.bias, layer.stride, layer.padding,
                                                     layer.dilation, layer.padding_mode, layer.backend),
                    "impl": impl,
                    "conv": lambda: conv(x),
                    "module": lambda: empty(x),
                }
                us, cpu_us = per_call_us(fns, calls, rounds)
            rows.append({"family": family, "autograd": grad, "arrangement": arrangement,
                         **{f"{k}_us": v for k, v in us.items()}, **{f"{k}_cpu_us": v for k, v in cpu_us.items()},
                         "own_work_us": round(us["layer"] - us["impl"], 2),
                         "own_work_cpu_us": round(cpu_us["layer"] - cpu_us["impl"], 2),
                         "package_us": round(us["forward"] - us["impl"], 2),
                         "package_cpu_us": round(cpu_us["forward"] - cpu_us["impl"], 2),
                         "beyond_module_us": round(us["layer"] - us["impl"] - us["module"], 2),
                         "beyond_module_cpu_us": round(cpu_us["layer"] - cpu_us["impl"] - cpu_us["module"], 2)})
    return {"rows": rows, "input": [1, CHANNELS, SIZE, SIZE], "calls": calls, "rounds": rounds, "threads": threads,
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()], "environment": environment("cpu")}


def to_markdown(data: dict) -> str:
    env = data["environment"]
    lines = [
        f"Per-call time at batch 1, input {tuple(data['input'])}, 16 -> 16 channels "
        f"({env['device']}, torch {env['torch']}, {data['threads']} thread(s); median of {data['rounds']} "
        f"interleaved rounds of {data['calls']} calls; load average {data['load_average_before']} before, "
        f"{data['load_average_after']} after)",
        "",
        "Wall-clock µs, with this thread's CPU time in brackets (a loaded machine's waits for a core inflate the "
        "first, not the second). layer − impl: the layer's work per call above the ops it runs; module: an "
        "nn.Identity call (torch's nn.Module.__call__, which every module pays); forward: the layer's forward called "
        "without the module call; forward − impl: this package's own share; layer − impl − module: the older "
        "estimate of that share, with the module call's cost taken from nn.Identity.",
        "",
        "| family | autograd | CPU plan | layer | forward | functional (unmemoised) | impl | nn.Conv2d | module "
        "| layer − impl | forward − impl | layer − impl − module |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        cells = [f"{r[k + '_us']} ({r[k + '_cpu_us']})"
                 for k in ("layer", "forward", "functional", "impl", "conv", "module", "own_work", "package",
                           "beyond_module")]
        lines.append(f"| {r['family']} | {'yes' if r['autograd'] else 'no'} | {r['arrangement']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/cpu")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    data = run(args.calls, args.rounds, args.threads)
    save_results(args.out, "per_call", data, to_markdown(data))


if __name__ == "__main__":
    main()
