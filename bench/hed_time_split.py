"""Where HED's whole-network time goes, dense and compressed: the budget's convs, the head convs, and the rest.

    python -m bench.hed_time_split --out bench/results/cpu-amd-epyc-2core
    python -m bench.hed_time_split --out DIR --configs cp-data-0.25 tucker2-data-0.25 --runs 9
    python -m bench.hed_time_split --out DIR --memory-formats contiguous_format channels_last  # each model in both

A budget counts the 13 3x3 convs (:func:`bench.hed_alternatives.body_convs`). The rest of the network is not
compressed: the 1x1 side outputs and the fusion (``hed.HEAD_PATTERNS``), and what HED's forward runs between its
modules (the ReLUs, the max pools, the bilinear upsampling of the side outputs, the concatenation, the sigmoid).
Compressing the convs cannot make that rest faster, so it bounds the whole-network speed-up:

    ceiling = dense total / (compressed total - its 3x3 convs' time)

is the speed-up the compressed network would reach if its 3x3 convs took no time at all.

Each model (dense, then the ``--configs`` of :mod:`bench.hed_methods`, from its cache) runs batch 1 at
``SETTINGS["size"]`` on ``SETTINGS["threads"]`` threads without autograd, the models taking turns in each of
``--runs`` rounds after one warm-up call each (which lets the CPU plan time its forms). Forward pre- and post-hooks
on every conv module (``nn.Conv2d`` or a factored conv) read ``time.perf_counter`` around its call; the rest is the
call's total minus its convs. Medians over the rounds; the load average before and after is recorded.

``--memory-formats contiguous_format channels_last`` runs every model on the photo in each memory format (NCHW, and
NHWC strides: ``x.contiguous(memory_format=torch.channels_last)``, which the convs, the factored layers among them,
keep through the network), all in the same rounds. Each row's speed-up and ceiling are against the first row (the
dense network in the first format given), and its total is also compared with the dense network's in its own
memory format.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import statistics
import time
from typing import Sequence

import torch
from torch import nn

from cpkernels.core.conv_args import MEMORY_FORMATS
from cpkernels.modules.factored import FactoredConv2d
from cpkernels.tools import hed
from cpkernels.tools.profile import environment

from .hed_methods import CACHE, SETTINGS, compressed_hed, judging_inputs, parse_config
from .report import save_results

CONFIGS = ("cp-data-0.25", "cp-data-0.125")
RUNS = 7
PARTS = ("total", "budget_convs", "head_convs", "rest")


class ConvClock:
    """Seconds spent inside each conv module of ``model`` during the calls since :meth:`reset`, by name."""

    def __init__(self, model: nn.Module) -> None:
        self.spent: dict[str, float] = {}
        self._start: dict[str, float] = {}
        self._handles = []
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, FactoredConv2d)):
                self.spent[name] = 0.0
                self._handles.append(m.register_forward_pre_hook(self._pre(name)))
                self._handles.append(m.register_forward_hook(self._post(name)))

    def _pre(self, name: str):
        def hook(module, args):
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            self.spent[name] += time.perf_counter() - self._start[name]
        return hook

    def reset(self) -> None:
        for name in self.spent:
            self.spent[name] = 0.0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def is_head(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in hed.HEAD_PATTERNS)


def split_once(model: nn.Module, clock: ConvClock, x: torch.Tensor) -> dict[str, float]:
    """One call's seconds: its total, its 3x3 (budget) convs, its head convs, the rest, and each conv by name."""
    clock.reset()
    start = time.perf_counter()
    model(x)
    total = time.perf_counter() - start
    budget = sum(s for name, s in clock.spent.items() if not is_head(name))
    head = sum(s for name, s in clock.spent.items() if is_head(name))
    return {"total": total, "budget_convs": budget, "head_convs": head, "rest": total - budget - head,
            "convs": dict(clock.spent)}


def row_name(model: str, memory_format: str) -> str:
    return model if memory_format == "contiguous_format" else f"{model} ({memory_format})"


def measure(configs: Sequence[str] = CONFIGS, runs: int = RUNS, cache: str = CACHE,
            memory_formats: Sequence[str] = ("contiguous_format",)) -> dict:
    dense = hed.load_hed()
    networks = {"dense": dense}
    for config in configs:
        networks[config] = compressed_hed(dense, *parse_config(config), cache=cache)[0]
    photo = judging_inputs()["china"]
    # one row per memory format and network, by the row's name
    rows_of = {row_name(name, fmt): (name, fmt) for fmt in memory_formats for name in networks}
    models = {row: networks[name] for row, (name, _) in rows_of.items()}
    inputs = {row: photo.contiguous(memory_format=MEMORY_FORMATS[fmt]) for row, (_, fmt) in rows_of.items()}
    previous = torch.get_num_threads()
    torch.set_num_threads(SETTINGS["threads"])
    clocks = {name: ConvClock(m) for name, m in networks.items()}
    clock_of = {row: clocks[name] for row, (name, _) in rows_of.items()}
    samples: dict[str, list[dict]] = {name: [] for name in models}
    try:
        with torch.no_grad():
            for name, m in models.items():
                m(inputs[name])  # warm-up: first-call plans and allocations
            load_before = os.getloadavg()
            for _ in range(runs):
                for name, m in models.items():
                    samples[name].append(split_once(m, clock_of[name], inputs[name]))
            load_after = os.getloadavg()
    finally:
        torch.set_num_threads(previous)
        for clock in clocks.values():
            clock.remove()
    rows = []
    median = statistics.median
    for name, runs_of in samples.items():
        ms = {part: 1e3 * median(s[part] for s in runs_of) for part in PARTS}
        convs = {conv: 1e3 * median(s["convs"][conv] for s in runs_of) for conv in runs_of[0]["convs"]}
        rows.append({"model": name, "memory_format": rows_of[name][1], **{f"{part}_ms": v for part, v in ms.items()},
                     "convs_ms": convs})
    dense_row = rows[0]
    dense_in = {row["memory_format"]: row for row in rows if rows_of[row["model"]][0] == "dense"}
    for row in rows:
        row["speedup"] = dense_row["total_ms"] / row["total_ms"]
        row["speedup_same_format"] = dense_in[row["memory_format"]]["total_ms"] / row["total_ms"]
        row["budget_convs_speedup"] = dense_row["budget_convs_ms"] / row["budget_convs_ms"]
        row["ceiling"] = dense_row["total_ms"] / (row["total_ms"] - row["budget_convs_ms"])
    return {"rows": rows, "runs": runs, "size": list(photo.shape[-2:]), "threads": SETTINGS["threads"],
            "memory_formats": list(memory_formats),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after]}


def to_markdown(result: dict, env: dict) -> str:
    h, w = result["size"]
    lines = [f"# Where HED's time goes, dense and compressed ({env['device']})", "",
             f"torch {env['torch']}, commit {env['git_commit'][:7]}"
             + (f", allocator environment {env['allocator_env']}" if env.get("allocator_env") else "")
             + f". Batch 1 at {h}x{w}, {result['threads']} threads, "
             f"no autograd; median of {result['runs']} interleaved rounds; load average "
             f"{result['load_average_before']} before, {result['load_average_after']} after. ms per image. Budget "
             "convs: the 13 3x3 convs a budget counts (each conv's call, read by forward hooks); head convs: the 1x1 "
             "side outputs and the fusion; rest: everything else the forward runs (ReLUs, max pools, upsampling, "
             "concatenation, sigmoid). Ceiling: dense total / (this total - its budget convs), the speed-up if "
             "its 3x3 convs took no time. (×): against the first row; same format: the dense network's total in "
             "this row's memory format over this row's.", "",
             "| model | total ms (×) | same format | budget convs ms (×) | head convs ms | rest ms | ceiling × |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['total_ms']:.0f} ({r['speedup']:.2f}×) | {r['speedup_same_format']:.2f}× "
                     f"| {r['budget_convs_ms']:.0f} ({r['budget_convs_speedup']:.2f}×) | {r['head_convs_ms']:.0f} "
                     f"| {r['rest_ms']:.0f} | {r['ceiling']:.2f}× |")
    names = list(result["rows"][0]["convs_ms"])
    lines += ["", "Each conv's ms:", "", "| conv | " + " | ".join(r["model"] for r in result["rows"]) + " |",
              "|---|" + "---|" * len(result["rows"])]
    for conv in names:
        lines.append(f"| {conv} | " + " | ".join(f"{r['convs_ms'].get(conv, float('nan')):.1f}"
                                                  for r in result["rows"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="write hed_time_split.{json,md} here")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="bench.hed_methods configurations")
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--cache", default=CACHE, help="the compressed models' cache (bench/hed_methods.py's)")
    parser.add_argument("--memory-formats", nargs="+", choices=list(MEMORY_FORMATS), default=["contiguous_format"],
                        help="run every model on the photo in each of these memory formats")
    args = parser.parse_args(argv)
    result = measure(args.configs, args.runs, args.cache, args.memory_formats)
    env = environment("cpu")
    save_results(args.out, "hed_time_split", {"environment": env, "settings": SETTINGS, **result},
                 to_markdown(result, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
