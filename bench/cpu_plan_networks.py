"""PyTorch eager on the CPU: dense networks against their CP-compressed forms, under the CPU plan's cost rule
and under its measured mode (the default).

    python -m bench.cpu_plan_networks --out bench/results/cpu-amd-epyc-2core

The ResNet-18- and VGG-16-shaped networks of :mod:`bench.onnx_speed` (random weights; CP factors at
``compress_model(rank=fraction)``'s ranks, rounded up to multiples of 8), in ``eval()`` under
``torch.no_grad()``. Each model runs ``--repeats`` times after a warm-up (the measured mode decides each
layer in the warm-up); the medians, the speed-ups against the dense network, and how many layers each mode
ran dense go to ``cpu_plan_networks.json`` and ``.md`` with the machine and versions.
"""
from __future__ import annotations

import copy
import os

import torch

from cpkernels import apply_structure
from cpkernels.core.timing import time_median
from cpkernels.dispatch import cpu as cpu_dispatch
from cpkernels.tools.profile import environment

from .onnx_speed import FRACTIONS, NETWORKS, cp_structure, network_arguments
from .report import save_results

MODES = ("model", "measure")


def run(networks=tuple(NETWORKS), fractions=FRACTIONS, size: int = 224, batch: int = 1, threads: int = 2,
        repeats: int = 10) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    saved = cpu_dispatch.MEASURE
    try:
        for net in networks:
            torch.manual_seed(0)
            dense = NETWORKS[net]().eval()
            x = torch.randn(batch, 3, size, size)
            with torch.no_grad():
                dense_ms = 1e3 * time_median(dense, x, repeats)
                for fraction in fractions:
                    cp = apply_structure(copy.deepcopy(dense), cp_structure(dense, fraction, 8)).eval()
                    for mode in MODES:
                        cpu_dispatch.MEASURE = mode == "measure"
                        cpu_dispatch.clear_cache()
                        cp_ms = 1e3 * time_median(cp, x, repeats)
                        decisions = cpu_dispatch.measured_plans().values()
                        rows.append({
                            "network": net, "fraction": fraction, "batch": batch, "mode": mode,
                            "dense_ms": round(dense_ms, 2), "cp_ms": round(cp_ms, 2),
                            "speedup": round(dense_ms / cp_ms, 2),
                            "layers_dense": sum(d.plan.arrangement == cpu_dispatch.DENSE for d in decisions)
                            if mode == "measure" else None,
                            "layers": len(decisions) if mode == "measure" else None,
                        })
                        print(rows[-1], flush=True)
    finally:
        cpu_dispatch.MEASURE = saved
        cpu_dispatch.clear_cache()
    return rows


def to_markdown(rows: list[dict], env: dict, args) -> str:
    lines = [f"# PyTorch eager on the CPU, by CPU plan mode: {env['device']}", "",
             f"torch {env['torch']} ({args.threads} threads), batch {args.batch}, 3x{args.size}x{args.size}, "
             f"float32, eval and no_grad, median of {args.repeats} runs after a warm-up; ranks = "
             f"compress_model(rank=fraction) rounded up to multiples of 8, random factors. `model`: the cost "
             "rule alone; `measure` (the default): each layer timed dense against CP on its first call.", "",
             "| network | fraction | CPU plan | dense ms | CP ms | speed-up | call signatures run dense |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        dense_layers = "" if r["layers"] is None else f"{r['layers_dense']} of {r['layers']}"
        lines.append(f"| {r['network']} | {r['fraction']} | {r['mode']} | {r['dense_ms']} | {r['cp_ms']} | "
                     f"{r['speedup']}x | {dense_layers} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = network_arguments(__doc__.splitlines()[0]).parse_args(argv)
    rows = run(args.networks, args.fractions, args.size, args.batch, args.threads, args.repeats)
    env = environment("cpu")
    os.makedirs(args.out, exist_ok=True)
    save_results(args.out, "cpu_plan_networks", {"environment": env, "args": vars(args), "rows": rows},
                 to_markdown(rows, env, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
