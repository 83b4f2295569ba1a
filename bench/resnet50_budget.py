"""A whole-network MAC budget on the bottleneck ResNet-50 shape: where its conv MACs sit, how far down a plan can
go with and without factoring its 1x1 convs, and the CPU time at half of its conv MACs against dense.

    python -m bench.resnet50_budget --out bench/results/cpu-intel-xeon-avx512-2core

- The share of the conv MACs per kernel size (1x1, 3x3, 7x7) at ``--size``.
- The smallest whole-network fraction ``plan_ranks`` reaches, as its refusal of a budget below it says, under
  ``decomposition="auto"`` (the 1x1 convs factored by the SVD family) and under ``"cp"`` and ``"tucker2"``
  (the 1x1 convs dense).
- ``plan_ranks(budget, decomposition="auto", method="weight", n_iter_max=--n-iter-max)`` on random weights,
  ``compress_model`` with that plan, then batch ``--batch`` in ``eval()`` under ``no_grad``: dense and
  compressed timed one after the other in one loop of ``--repeats`` after a warm-up (the CPU plan measures
  each layer on its first call), medians, the load average before and after. On random weights the ranks say
  nothing of the quality a trained network keeps: only the MACs and the time count here.

Planning runs on one thread (``--plan-threads``): on a shared two-core machine OpenMP's barriers under load
cost far more than the second core gives. The timing runs on ``--threads``.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from collections import Counter

import torch

from cpkernels import compress_model, plan_ranks
from cpkernels.compression.convs import conv_input_sizes, conv_shape, convs_of
from cpkernels.tools.bottleneck import resnet50
from cpkernels.tools.profile import environment

from .report import save_results

REACHABLE = re.compile(r"smallest reachable fraction is ([0-9.]+)")
BELOW_EVERYTHING = 1e-9  # a budget no plan meets: plan_ranks refuses it with the smallest reachable fraction
WITHOUT_1X1 = ("cp", "tucker2")


def mac_shares(model, input_size) -> dict[str, float]:
    """The fraction of all conv MACs per kernel size (``"1x1"``, ``"3x3"``, ``"7x7"``) at ``input_size``."""
    sizes = conv_input_sizes(model, input_size)
    macs = Counter()
    for _, conv, _ in convs_of(model):
        macs["x".join(map(str, conv.kernel_size))] += conv_shape(conv, sizes[id(conv)]).dense_macs()
    total = sum(macs.values())
    return {k: v / total for k, v in sorted(macs.items())}


def reachable_fraction(model, input_size, decomposition: str) -> float:
    """The smallest fraction of the whole network's conv MACs that ``plan_ranks`` can reach with
    ``decomposition``: the one its refusal of an unreachable budget gives (3 decimals)."""
    try:
        plan_ranks(model, BELOW_EVERYTHING, input_size=input_size, decomposition=decomposition, progress=False)
    except ValueError as error:
        found = REACHABLE.search(str(error))
        if found is None:
            raise
        return float(found.group(1))
    raise RuntimeError(f"plan_ranks met a budget of {BELOW_EVERYTHING}: nothing to report")


def interleaved_ms(dense, compressed, x, repeats: int) -> tuple[float, float]:
    """Median milliseconds of each model, timed one after the other in one loop (so load spikes hit both)."""
    times = {"dense": [], "compressed": []}
    with torch.no_grad():
        dense(x)  # warm-up; the CPU plan decides each factored layer on its first call
        compressed(x)
        for _ in range(repeats):
            for name, model in (("dense", dense), ("compressed", compressed)):
                start = time.perf_counter()
                model(x)
                times[name].append(1e3 * (time.perf_counter() - start))
    return statistics.median(times["dense"]), statistics.median(times["compressed"])


def run(width: int = 64, size: int = 224, budget: float = 0.5, batch: int = 1, threads: int = 2,
        plan_threads: int = 1, repeats: int = 20, n_iter_max: int = 2) -> dict:
    previous = torch.get_num_threads()
    torch.manual_seed(0)
    model = resnet50(width).eval()
    input_size = (1, 3, size, size)
    try:
        torch.set_num_threads(plan_threads)
        result = {"width": width, "size": size, "budget": budget, "batch": batch, "threads": threads,
                  "plan_threads": plan_threads, "repeats": repeats, "n_iter_max": n_iter_max,
                  "mac_shares": mac_shares(model, input_size),
                  "reachable": {d: reachable_fraction(model, input_size, d) for d in ("auto",) + WITHOUT_1X1}}
        start = time.perf_counter()
        plan = plan_ranks(model, budget, input_size=input_size, decomposition="auto", method="weight",
                          n_iter_max=n_iter_max, progress=None)
        result["plan_s"] = time.perf_counter() - start
        compressed, report = compress_model(model, plan)
        compressed.eval()
        result.update(network_fraction=plan.totals["network_fraction"],
                      macs_before=sum(r["macs_before"] for r in report.rows),
                      macs_after=sum(r["macs_after"] for r in report.rows),
                      layers=dict(Counter(f"{'x'.join(map(str, r['shape'][2:]))} {r['decomposition'] or 'dense'}"
                                          for r in plan.rows)))
        torch.set_num_threads(threads)
        x = torch.randn(batch, 3, size, size)
        result["loadavg_before"] = os.getloadavg()
        result["dense_ms"], result["compressed_ms"] = interleaved_ms(model, compressed, x, repeats)
        result["loadavg_after"] = os.getloadavg()
    finally:
        torch.set_num_threads(previous)
    result["speedup"] = result["dense_ms"] / result["compressed_ms"]
    return result


def to_markdown(r: dict, env: dict) -> str:
    shares = ", ".join(f"{k} {100 * v:.1f} %" for k, v in r["mac_shares"].items())
    reach = r["reachable"]
    lines = [
        f"# A whole-network MAC budget on the ResNet-50 shape: {env['device']}", "",
        f"Bottleneck ResNet-50 shape (width {r['width']}), random weights, 3x{r['size']}x{r['size']}; torch "
        f"{env['torch']}, commit {str(env['git_commit'])[:10]}.", "",
        f"- Conv MACs per kernel size: {shares} (of {r['macs_before']:,} per image).",
        f"- Smallest whole-network fraction `plan_ranks` reaches: {reach['auto']:.3f} with the 1x1 convs factored "
        f"(`decomposition=\"auto\"`), {reach['cp']:.3f} under `\"cp\"` and {reach['tucker2']:.3f} under "
        "`\"tucker2\"` (1x1 convs dense).",
        f"- `plan_ranks({r['budget']}, decomposition=\"auto\", method=\"weight\", n_iter_max={r['n_iter_max']})` "
        f"in {r['plan_s']:.1f} s on {r['plan_threads']} thread(s): {r['network_fraction']:.3f} of the network's "
        f"conv MACs ({r['macs_after']:,}); layers by kernel and form: "
        + ", ".join(f"{k}: {n}" for k, n in sorted(r["layers"].items())) + ".",
        f"- CPU, batch {r['batch']}, {r['threads']} threads, eval and no_grad, median of {r['repeats']} "
        f"interleaved runs: dense {r['dense_ms']:.1f} ms, compressed {r['compressed_ms']:.1f} ms "
        f"({r['speedup']:.2f}x); load average (1, 5, 15 min) {_load(r['loadavg_before'])} before, "
        f"{_load(r['loadavg_after'])} after.",
        "- Ranks planned on random weights say nothing of the accuracy a trained network keeps at this budget.",
    ]
    return "\n".join(lines) + "\n"


def _load(avg) -> str:
    return "/".join(f"{v:.2f}" for v in avg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plan-threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--n-iter-max", type=int, default=2)
    parser.add_argument("--stem", default="resnet50_budget", help="the results' file names, STEM.json and STEM.md")
    args = parser.parse_args(argv)
    result = run(args.width, args.size, args.budget, args.batch, args.threads, args.plan_threads, args.repeats,
                 args.n_iter_max)
    env = environment("cpu")
    save_results(args.out, args.stem, {"environment": env, "result": result}, to_markdown(result, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
