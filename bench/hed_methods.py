"""README's quality and speed tables on a real trained network: HED's VGG-16 (:mod:`cpkernels.tools.hed`).

    python -m bench.hed_methods --out bench/results/cpu-intel-xeon-avx512-2core            # everything
    python -m bench.hed_methods --out DIR --only cp-data-0.25 cp-weight-0.25 --no-time     # some configurations

One configuration is a decomposition family, a rank method and a budget (a fraction of the 13 3x3 convs' MACs;
the 1x1 side outputs and the fusion stay dense). For each:

- the ranks: ``"uniform"`` gives every conv the largest CP rank within the budget of its MACs
  (``compress_model(rank={...})``); ``"weight"``, ``"vbmf"`` and ``"data"`` are :func:`cpkernels.plan_ranks`'
  methods, ``decomposition="cp"``, ``"tucker2"`` or ``"auto"``;
- calibration (``"data"``'s statistics and sensitivities): scikit-image's five bundled photos and their mirrors at
  208x320 (:data:`SETTINGS`); judging: edge F1 against the dense network on each of scikit-learn's two photos at
  416x640, never calibrated on; no fine-tuning;
- the planning time (one torch thread, as the demo plans: :mod:`cpkernels.tools.demo` says why), and the
  whole-network CPU time at batch 1 and 2 threads against dense, timed in the same loop (interleaved, median),
  with the load average beside it.

Compressed models are cached in ``.cache/hed_models/`` (``--cache``), so that the timing can run later on a quiet
machine and other benchmarks (:mod:`bench.hed_alternatives`) reuse the same models. Writes ``hed_methods.json``,
``hed_methods.md`` and ``hed_methods.png`` (F1 against the MACs kept, one line per method) in ``--out``. The rows
already there for configurations not run again are kept (each row names the commit it was measured at), so that
``--only`` fills in cells of the table without rerunning the rest.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from cpkernels import apply_structure, compress_model, plan_ranks
from cpkernels.compression.compress import rank_for_mac_fraction
from cpkernels.compression.convs import conv_input_sizes
from cpkernels.core.timing import interleaved_median_seconds
from cpkernels.tools import hed
from cpkernels.tools.profile import environment

from .report import save_results

SETTINGS = dict(
    calibration_photos=hed.CALIBRATION_PHOTOS,
    calibration_size=(208, 320),
    size=(416, 640),  # the judging size (scikit-learn's photos are 427x640; 416 = 26 * 16 fits the 4 pools)
    n_iter_max=30,
    ladder=None,  # None: plan_ranks' own candidate fractions
    random_state=0,
    plan_threads=1,
    threads=2,
    runs=5,
)
BUDGETS = (0.5, 0.25, 0.125, 0.0625)
METHODS = ("uniform", "weight", "vbmf", "data")
# (decomposition, method) pairs measured at every budget: the four rank methods on CP, and the three families on
# the data method.
PAIRS = tuple(("cp", m) for m in METHODS) + (("tucker2", "data"), ("auto", "data"))
CACHE = os.path.join(".cache", "hed_models")


def config_name(decomposition: str, method: str, budget: float) -> str:
    return f"{decomposition}-{method}-{budget:g}"


def parse_config(name: str) -> tuple[str, str, float]:
    decomposition, method, budget = name.split("-")
    if (decomposition, method) not in PAIRS:
        raise ValueError(f"unknown configuration {name!r}: pairs are {PAIRS}")
    return decomposition, method, float(budget)


def calibration_batches() -> list[torch.Tensor]:
    """The plans' calibration: scikit-image's photos and their mirrors, one ``[1, 3, 208, 320]`` batch each."""
    return hed.calibration_inputs(SETTINGS["calibration_photos"], SETTINGS["calibration_size"], mirror=True)


def judging_inputs() -> dict[str, torch.Tensor]:
    """scikit-learn's two photos at the judging size, ``[1, 3, 416, 640]`` each, by name."""
    return {name: hed.photo_input(hed.judging_photo(name), SETTINGS["size"]) for name in hed.JUDGING_PHOTOS}


def _uniform(model: nn.Module, budget: float):
    sizes = conv_input_sizes(model, (1, 3, *SETTINGS["calibration_size"]))
    ranks = {name: rank_for_mac_fraction(model.get_submodule(name), budget, sizes[id(model.get_submodule(name))])
             for name in hed.CONV_NAMES}
    compressed, report = compress_model(model, rank=ranks, include=list(hed.CONV_NAMES),
                                        input_size=(1, 3, *SETTINGS["calibration_size"]),
                                        n_iter_max=SETTINGS["n_iter_max"], random_state=SETTINGS["random_state"],
                                        progress=False)
    done = [r for r in report.rows if r["rank"] is not None]
    fraction = sum(r["macs_after"] for r in done) / sum(r["macs_before"] for r in hed_rows(report.rows))
    return compressed, fraction, {r["name"]: r["rank"] for r in done}


def _cached_model(model: nn.Module, info: dict, path: str) -> nn.Module:
    """The compressed model of a cache entry: the dense model given the entry's structure, its state loaded. The
    state is a state_dict, or (entries of an earlier version of this file) a pickled model whose state_dict is
    taken, so that a later change of the layer classes cannot break the cache."""
    # weights_only=False: the cached files are this benchmark's own, never a download.
    saved = torch.load(path, weights_only=False)
    state = saved.state_dict() if isinstance(saved, nn.Module) else saved
    structure = {name: tuple(r) if isinstance(r, list) else r for name, r in info["ranks"].items() if r is not None}
    compressed = apply_structure(copy.deepcopy(model), structure)
    compressed.load_state_dict(state)
    return compressed.eval()


def hed_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows of HED's 3x3 convs (the budget's denominator)."""
    return [r for r in rows if r["name"] in hed.CONV_NAMES]


def compressed_hed(model: nn.Module, decomposition: str = "cp", method: str = "data", budget: float = 0.25,
                   cache: Optional[str] = CACHE) -> tuple[nn.Module, dict]:
    """HED compressed by one configuration, from ``cache`` when it holds it (``None``: never cached).

    Returns the compressed model and its info: ``plan_s`` (seconds to plan and compress, on
    ``SETTINGS["plan_threads"]`` threads), ``macs_fraction`` (of the 3x3 convs' MACs; the same at any input size,
    every conv being stride 1 after the same pools) and ``ranks`` (per conv; Tucker-2's as pairs)."""
    name = config_name(decomposition, method, budget)
    parse_config(name)
    path = None if cache is None else os.path.join(cache, f"{name}.pt")
    if path is not None and os.path.exists(path):
        with open(path[:-3] + ".json") as f:
            info = json.load(f)
        return _cached_model(model, info, path), info
    previous = torch.get_num_threads()
    torch.set_num_threads(SETTINGS["plan_threads"])
    try:
        start = time.perf_counter()
        if method == "uniform":
            compressed, fraction, ranks = _uniform(model, budget)
        else:
            plan = plan_ranks(model, budget, method=method, decomposition=decomposition,
                              calibration=calibration_batches() if method == "data" else None,
                              input_size=None if method == "data" else (1, 3, *SETTINGS["calibration_size"]),
                              exclude=list(hed.HEAD_PATTERNS), budget_over="considered",
                              n_iter_max=SETTINGS["n_iter_max"], random_state=SETTINGS["random_state"],
                              progress=False, **({} if SETTINGS["ladder"] is None else {"ladder": SETTINGS["ladder"]}))
            compressed, _ = compress_model(model, plan)
            rows = hed_rows(plan.rows)
            fraction = sum(r["cost_after"] if r["rank"] is not None else r["cost_before"] for r in rows) / sum(
                r["cost_before"] for r in rows)
            ranks = {r["name"]: r["rank"] for r in rows}
        plan_s = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    info = {"config": name, "plan_s": plan_s, "macs_fraction": fraction,
            "ranks": {k: list(v) if isinstance(v, tuple) else v for k, v in ranks.items()}}
    if path is not None:
        save_cached(path, compressed, info)
    return compressed, info


def save_cached(path: str, model: nn.Module, info: dict) -> None:
    """A cache entry: ``model``'s state_dict at ``path`` (``.pt``), ``info`` beside it (``.json``)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(model.state_dict(), path)
    with open(path[:-3] + ".json", "w") as f:
        json.dump(info, f)


def edge_f1s(model: nn.Module, dense_maps: dict, inputs: dict) -> dict[str, float]:
    with torch.no_grad():
        return {name: hed.edge_f1(model(x), dense_maps[name]) for name, x in inputs.items()}


def interleaved_seconds(models: dict[str, nn.Module], x: torch.Tensor, runs: int) -> dict[str, float]:
    """The median seconds of each model on ``x``, the models taking turns in each round
    (:func:`cpkernels.core.timing.interleaved_median_seconds`), without autograd. The warm-up call each lets the
    CPU plan time its forms once per call signature."""
    with torch.no_grad():
        return interleaved_median_seconds({name: functools.partial(model, x) for name, model in models.items()}, runs)


def measure(configs: Sequence[str], cache: str, timed: bool) -> list[dict]:
    model = hed.load_hed()
    inputs = judging_inputs()
    with torch.no_grad():
        dense_maps = {name: model(x) for name, x in inputs.items()}
    commit = environment("cpu")["git_commit"]
    rows = []
    for name in configs:
        compressed, info = compressed_hed(model, *parse_config(name), cache=cache)
        row = {**info, "f1": edge_f1s(compressed, dense_maps, inputs), "commit": commit}
        if timed:
            previous = torch.get_num_threads()
            torch.set_num_threads(SETTINGS["threads"])
            try:
                load = os.getloadavg()[0]
                seconds = interleaved_seconds({"dense": model, "compressed": compressed}, inputs["china"],
                                              SETTINGS["runs"])
            finally:
                torch.set_num_threads(previous)
            row.update(dense_ms=1e3 * seconds["dense"], compressed_ms=1e3 * seconds["compressed"],
                       speedup=seconds["dense"] / seconds["compressed"], load_average=load)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
    return rows


def check_same_machine(old: dict, path: str) -> None:
    """Rows timed on another machine do not go in one table: refused before any work."""
    here, there = environment("cpu")["device"], old["environment"]["device"]
    if here != there:
        raise ValueError(f"{path} holds rows measured on {there}, not on this machine ({here}): give another --out")


def merged_rows(new: Sequence[dict], path: str, key: Callable[[dict], object] = lambda r: r["config"]) -> list[dict]:
    """``new`` and the rows of the JSON at ``path`` (when there is one) whose ``key`` (default: the configuration)
    no row of ``new`` has, in the table's order. Rows of files written before rows named their commit get the
    file's."""
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        check_same_machine(old, path)
        rerun = {key(r) for r in new}
        kept = [{"commit": old["environment"]["git_commit"], **r} for r in old["rows"] if key(r) not in rerun]
    order = {config_name(d, m, b): i for i, (d, m, b) in enumerate((d, m, b) for d, m in PAIRS for b in BUDGETS)}
    return sorted([*kept, *new], key=lambda r: order.get(r["config"], len(order)))


def to_markdown(rows: list[dict], env: dict) -> str:
    lines = [f"# HED's VGG-16: rank methods and families at fractions of the 3x3 conv MACs ({env['device']})", "",
             f"torch {env['torch']}, commits {', '.join(sorted({r['commit'][:7] for r in rows}))}. Calibration: scikit-image's "
             f"{', '.join(SETTINGS['calibration_photos'])} and their mirrors at "
             f"{SETTINGS['calibration_size'][0]}x{SETTINGS['calibration_size'][1]}; judged on scikit-learn's china "
             f"and flower at {SETTINGS['size'][0]}x{SETTINGS['size'][1]} (edge F1 against dense, no fine-tuning). "
             f"Plan time: plan and compress on {SETTINGS['plan_threads']} thread. CPU time: batch 1, "
             f"{SETTINGS['threads']} threads, median of {SETTINGS['runs']}, dense and compressed interleaved; load: "
             "the 1-minute load average before timing.", "",
             "| family | method | budget | MACs kept | F1 china | F1 flower | plan s | dense ms | compressed ms "
             "| speed-up | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        decomposition, method, budget = parse_config(r["config"])
        timing = (f"{r['dense_ms']:.0f} | {r['compressed_ms']:.0f} | {r['speedup']:.2f}x | {r['load_average']:.1f}"
                  if "speedup" in r else " | | | ")
        lines.append(f"| {decomposition} | {method} | {budget:g} | {r['macs_fraction']:.3f} | {r['f1']['china']:.3f} "
                     f"| {r['f1']['flower']:.3f} | {r['plan_s']:.0f} | {timing} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    # optional: the figure only. A bare Figure renders with Agg and leaves pyplot's global backend alone.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    for decomposition, method in PAIRS:
        points = sorted((r["macs_fraction"], statistics.mean(r["f1"].values())) for r in rows
                        if parse_config(r["config"])[:2] == (decomposition, method))
        if points:
            axis.plot(*zip(*points), marker="o", label=f"{decomposition}, {method}")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("fraction of the 3x3 conv MACs kept")
    axis.set_ylabel("edge F1 against dense (mean of 2 photos)")
    axis.set_title("HED (VGG-16) at 416x640, no fine-tuning")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write hed_methods.{json,md,png} here")
    parser.add_argument("--only", nargs="+", default=None, help="configurations such as cp-data-0.25 (default: all)")
    parser.add_argument("--cache", default=CACHE, help="the compressed models' cache (default: .cache/hed_models)")
    parser.add_argument("--no-time", action="store_true", help="F1 and planning only (to fill the cache)")
    args = parser.parse_args(argv)
    configs = args.only or [config_name(d, m, b) for d, m in PAIRS for b in BUDGETS]
    for name in configs:
        parse_config(name)
    previous = os.path.join(args.out, "hed_methods.json") if args.out else None
    if previous and os.path.exists(previous):
        with open(previous) as f:
            check_same_machine(json.load(f), previous)
    rows = measure(configs, args.cache, timed=not args.no_time)
    if args.out:
        rows = merged_rows(rows, os.path.join(args.out, "hed_methods.json"))
        env = environment("cpu")
        env["load_average_at_end"] = os.getloadavg()
        save_results(args.out, "hed_methods", {"environment": env, "settings": SETTINGS, "rows": rows},
                     to_markdown(rows, env))
        plot(rows, os.path.join(args.out, "hed_methods.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
