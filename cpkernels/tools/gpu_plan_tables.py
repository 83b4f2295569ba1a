"""The GPU plan's model as Markdown tables (docs/kernel.md): the plan for every layer and rank of the shared
benchmark list, and the per-pixel costs of every strategy. ``python -m cpkernels.tools.gpu_plan_tables``."""
from __future__ import annotations

import argparse

import torch

from cpkernels.dispatch.gpu import GPUS, STRATEGIES, GPUSpec, gpu_spec, model_plan, per_pixel
from cpkernels.tools.layers import LAYERS, ROOFLINE_LAYERS


def layer_table(spec: GPUSpec, dtype: torch.dtype = torch.bfloat16) -> str:
    """Markdown: the plan for every layer of the shared list at every rank of the list (docs/kernel.md)."""
    names = list(STRATEGIES)
    lines = ["| layer | N | R | " + " | ".join(f"{k} µs" for k in names) + " | chosen | chosen / dense |",
             "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for layer in LAYERS + ROOFLINE_LAYERS:
        for rank in layer.ranks():
            plan = model_plan(layer.shape, rank, dtype, spec)
            cells = " | ".join(f"{plan.modeled_us[k]:.1f}" if k in plan.modeled_us else "-" for k in names)
            ratio = plan.modeled_us[plan.chosen] / plan.modeled_us["dense"]
            lines.append(f"| {layer.name} | {layer.shape.batch} | {rank} | {cells} | {plan.chosen} | {ratio:.2f} |")
    return "\n".join(lines)


def per_pixel_table(spec: GPUSpec, dtype: torch.dtype = torch.bfloat16) -> str:
    """Markdown: MACs, HBM bytes and modeled ns per output pixel of every strategy, for the roofline
    layers at R = C/4 and R = C (docs/kernel.md)."""
    cases = [(layer.name, layer.shape, layer.rank(d)) for layer in ROOFLINE_LAYERS for d in (4, 1)]
    lines = ["| layer | R | strategy | MACs / pixel | HBM bytes / pixel | ns / pixel | best tile |",
             "|---|---|---|---|---|---|---|"]
    for name, shape, rank in cases:
        for strategy, row in per_pixel(shape, rank, dtype, spec).items():
            tile = "" if row["tile"] is None else ",".join(map(str, row["tile"]))
            lines.append(f"| {name} | {rank} | {strategy} | {row['macs']:,} | {row['hbm_bytes']:,} | {row['ns']} | "
                         f"{tile} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpkernels.tools.gpu_plan_tables",
                                     description="The GPU plan's model as Markdown tables (docs/kernel.md).")
    parser.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)}")
    parser.add_argument("--per-pixel", action="store_true", help="per-pixel costs of the roofline layers instead")
    args = parser.parse_args(argv)
    try:
        spec = gpu_spec(args.gpu)
    except ValueError as e:
        parser.error(str(e))
    if args.per_pixel:
        print(per_pixel_table(spec))
    else:
        print(layer_table(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
