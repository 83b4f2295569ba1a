"""CPU path against dense nn.Conv2d at the ranks trained networks need (R = C and 1.25 C).

    python -m bench.cpu_trained_ranks --out bench/results/cpu-amd-epyc-2core

Every layer of the shared list with C >= 128, batch 8, float32, NCHW and channels_last: the median of
``--repeats`` calls after a warm-up (``cpkernels.core.timing.time_median``), the CPU plan's choice for the
call (the cost rule's, and the one its measured mode, the default, kept on this machine), and the
speed-up. Writes ``trained_ranks.json`` and ``trained_ranks.md`` with the machine and
versions. The same rows are in the pytest-benchmark suite; this is the short run of just them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

from cpkernels.core import conv_args
from cpkernels.core.timing import time_median
from cpkernels.dispatch import cpu as cpu_dispatch
from cpkernels.tools.layers import LAYERS
from cpkernels.tools.profile import build_cases, environment


def plan_of(case, shape, rank) -> str:
    layer = case.fn
    pad = conv_args.explicit_padding(layer.padding, layer.kernel_size, layer.dilation)
    out = conv_args.output_size(tuple(case.x.shape[2:]), layer.kernel_size, layer.stride, pad, layer.dilation)
    return cpu_dispatch.plan(case.x, rank, shape.groups, shape.cout, layer.kernel_size, out, layer.dilation, False).arrangement


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    rows = []
    for layer in LAYERS:
        if min(layer.shape.cin, layer.shape.cout) < 128:
            continue
        shape = dataclasses.replace(layer.shape, batch=args.batch)
        for rank in (layer.rank(1), layer.rank(0.8)):
            for layout in ("nchw", "channels_last"):
                dense, cp = build_cases(shape, rank, torch.float32, "cpu", layouts=(layout,), backends=("dense", "cpu"))
                dense_ms = time_median(dense.fn, dense.x, args.repeats) * 1e3
                cpu_dispatch.clear_cache()
                cp_ms = time_median(cp.fn, cp.x, args.repeats) * 1e3
                measured = [d.plan.arrangement for d in cpu_dispatch.measured_plans().values()]
                row = {"layer": layer.name, "rank": rank, "layout": layout, "mac_ratio": round(
                    shape.dense_macs() / shape.cp_macs(rank), 2), "dense_ms": round(dense_ms, 2),
                    "cp_ms": round(cp_ms, 2), "speedup": round(dense_ms / cp_ms, 2), "plan": plan_of(cp, shape, rank),
                    "measured_plan": measured[-1] if measured else None}
                rows.append(row)
                print(row, flush=True)
    env = environment("cpu")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "trained_ranks.json"), "w") as f:
        json.dump({"environment": env, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    lines = [f"# CPU path at trained-network ranks: {env['device']}", "",
             f"torch {env['torch']}, {torch.get_num_threads()} threads, float32, batch {args.batch}, commit "
             f"{env['git_commit'][:10]}; median of {args.repeats} calls after a warm-up; CPU plan mode "
             f"{'measure' if cpu_dispatch.measuring() else 'model'}.", "",
             "| layer | R | layout | MAC ratio | dense ms | CP ms | speed-up | CPU plan: cost rule | measured choice |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['rank']} | {r['layout']} | {r['mac_ratio']} | {r['dense_ms']} | {r['cp_ms']} | "
              f"{r['speedup']}x | {r['plan']} | {r['measured_plan'] or ''} |" for r in rows]
    with open(os.path.join(args.out, "trained_ranks.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
