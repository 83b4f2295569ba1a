"""What sequential error compensation and label-free distillation recover on HED at deep budgets.

    python -m bench.hed_compensation --out bench/results/cpu-intel-xeon-avx512-2core

For each budget and family: the plan of :mod:`bench.hed_methods` (``method="data"``, cached there), then
:func:`cpkernels.compensate` on the same calibration batches (scikit-image's five photos and their mirrors at
208x320; the last photo and its mirror held out to choose each layer's ridge) twice: every layer fitted to its
conv's output (the default, ``relu_steps=0``), and the layers that only a ReLU reads fitted after it
(``relu_steps=RELU_STEPS``). Then :func:`cpkernels.distill` of the default's model on random crops of those photos
only (``--steps 0``: none). Each
step's edge F1 against dense on scikit-learn's two photos at 416x640 (never seen), and the seconds it took
(compensation and distillation on ``SETTINGS["threads"]`` threads).

    python -m bench.hed_compensation --out DIR --budgets 0.0625 --decompositions cp --fits relu \
        --calibration-size 416 640 --steps 0                                    # one fit, 4x the calibration pixels

``--calibration-size`` renders the compensation's calibration photos at another size (the plan keeps its own);
``--fits`` runs one of the two fits only. The distillation starts from the conv-output fit where it ran, else
from the fit after the ReLU.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from cpkernels import compensate, distill
from cpkernels.tools import hed
from cpkernels.tools.profile import environment

from .hed_methods import (CACHE, SETTINGS, calibration_batches, check_same_machine, compressed_hed, config_name,
                          edge_f1s, judging_inputs, merged_rows)
from .report import save_results

BUDGETS = (0.25, 0.125, 0.0625)
DECOMPOSITIONS = ("cp", "tucker2", "auto")
DISTILL = dict(steps=120, lr=1e-5, crop=(160, 160), batch=2, seed=0)
RELU_STEPS = 3  # the refits of compensate's fit after the ReLU (relu_steps)
FITS = {"compensated": 0, "relu": RELU_STEPS}  # the fits by name: compensate's relu_steps
LAYER_KEYS = ("name", "fitted", "pixels", "unknowns", "ridge", "steps", "error_before", "error_after",
              "holdout_before", "holdout_after", "refit")


def crops(batches: list[torch.Tensor], n: int, size, batch: int, seed: int) -> list[torch.Tensor]:
    """``n`` batches of ``batch`` random ``size`` crops of the calibration photos (and mirrors), fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    out = []
    for _ in range(n):
        picks = []
        for _ in range(batch):
            x = batches[int(torch.randint(len(batches), (1,), generator=gen))]
            top = int(torch.randint(x.shape[-2] - h + 1, (1,), generator=gen))
            left = int(torch.randint(x.shape[-1] - w + 1, (1,), generator=gen))
            picks.append(x[..., top:top + h, left:left + w])
        out.append(torch.cat(picks))
    return out


def measure(budgets, decompositions, cache: str, distill_options: dict, calibration_size=None,
            fit_names=tuple(FITS)) -> list[dict]:
    model = hed.load_hed()
    inputs = judging_inputs()
    with torch.no_grad():
        dense_maps = {name: model(x) for name, x in inputs.items()}
    if calibration_size is None or tuple(calibration_size) == tuple(SETTINGS["calibration_size"]):
        batches = calibration_batches()
    else:
        batches = hed.calibration_inputs(SETTINGS["calibration_photos"], calibration_size, mirror=True)
    previous = torch.get_num_threads()
    rows = []
    try:
        for budget in budgets:
            for decomposition in decompositions:
                compressed, info = compressed_hed(model, decomposition, "data", budget, cache=cache)
                torch.set_num_threads(SETTINGS["threads"])
                row = {"config": config_name(decomposition, "data", budget), "macs_fraction": info["macs_fraction"],
                       "plan_s": info["plan_s"], "f1_plan": edge_f1s(compressed, dense_maps, inputs),
                       "calibration_size": list(batches[0].shape[-2:])}
                fits = {}
                for key in fit_names:
                    steps = FITS[key]
                    start = time.perf_counter()
                    fits[key], report = compensate(compressed, model, batches, relu_steps=steps, progress=False)
                    row.update({f"{key}_s": time.perf_counter() - start,
                                f"f1_{key}": edge_f1s(fits[key], dense_maps, inputs),
                                f"{key}_layers": [{k: r[k] for k in LAYER_KEYS} for r in report.rows]})
                    print(report, flush=True)
                o = distill_options
                if o["steps"]:
                    row["distilled_from"] = next(iter(fits))
                    student = fits[row["distilled_from"]]
                    data = crops(batches, o["steps"], o["crop"], o["batch"], o["seed"])
                    result = distill(student, model, data, epochs=1, lr=o["lr"], progress=False)
                    row.update(distill_s=result.seconds, distill_loss=(result.first_loss, result.last_loss),
                               f1_distilled=edge_f1s(student, dense_maps, inputs))
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("layers")}), flush=True)
                torch.set_num_threads(previous)
    finally:
        torch.set_num_threads(previous)
    return rows


def to_markdown(rows: list[dict], env: dict, distill_options: dict) -> str:
    o = distill_options
    lines = [f"# HED's VGG-16: plan, compensation, distillation ({env['device']})", "",
             f"torch {env['torch']}, commit {env['git_commit'][:7]}. Plans: `bench.hed_methods` (method='data'). "
             f"Compensation: calibration batches of the plan, the last photo and its mirror held out; every layer "
             f"fitted to its conv's output (the default, `relu_steps=0`), then the layers only a ReLU reads fitted "
             f"after it (`relu_steps={RELU_STEPS}`); the calibration size is in the table. "
             + (f"Distillation (of the conv-output fit's model, else the one after the ReLU): {o['steps']} steps of {o['batch']} random "
                f"{o['crop'][0]}x{o['crop'][1]} crops of the calibration photos, Adam lr {o['lr']:g}, relative MSE on "
                "the fused output. " if o["steps"] else "No distillation (`--steps 0`). ")
             + f"F1: edge F1 against dense on scikit-learn's china / flower at "
             f"{SETTINGS['size'][0]}x{SETTINGS['size'][1]}. Times on {SETTINGS['threads']} threads (planning on "
             f"{SETTINGS['plan_threads']}); other jobs shared the machine, so the times are inflated.", "",
             "| family | budget | MACs kept | plan F1 | plan s | calibration | + compensation, conv outputs F1 | s "
             "| + compensation, after ReLU F1 | s | + distillation F1 | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f1(d):
        return f"{d['china']:.3f} / {d['flower']:.3f}"

    def cell(r, key, seconds):
        return f"{f1(r[f'f1_{key}'])} | {r[seconds]:.0f}" if f"f1_{key}" in r else "- | -"

    for r in rows:
        decomposition, _, budget = r["config"].split("-")
        size = "x".join(map(str, r.get("calibration_size", SETTINGS["calibration_size"])))
        if "commit" in r:  # a row kept from an earlier run
            size += f" (commit {r['commit'][:7]})"
        lines.append(f"| {decomposition} | {budget} | {r['macs_fraction']:.3f} | {f1(r['f1_plan'])} | {r['plan_s']:.0f} "
                     f"| {size} | {cell(r, 'compensated', 'compensated_s')} | {cell(r, 'relu', 'relu_s')} "
                     f"| {cell(r, 'distilled', 'distill_s')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--decompositions", nargs="+", default=list(DECOMPOSITIONS))
    parser.add_argument("--cache", default=CACHE)
    parser.add_argument("--steps", type=int, default=DISTILL["steps"])
    parser.add_argument("--lr", type=float, default=DISTILL["lr"])
    parser.add_argument("--calibration-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="the compensation's calibration size (default: the plan's, SETTINGS)")
    parser.add_argument("--fits", nargs="+", choices=tuple(FITS), default=list(FITS))
    args = parser.parse_args(argv)
    options = {**DISTILL, "steps": args.steps, "lr": args.lr}
    path = os.path.join(args.out, "hed_compensation.json")
    if os.path.exists(path):  # refused before any work
        with open(path) as f:
            check_same_machine(json.load(f), path)
    rows = measure(args.budgets, args.decompositions, args.cache, options, args.calibration_size,
                   tuple(dict.fromkeys(args.fits)))
    # the rows already there for another configuration or calibration size stay (each names its commit)
    rows = merged_rows(rows, path, key=lambda r: (r["config"], tuple(r.get("calibration_size",
                                                                             SETTINGS["calibration_size"]))))
    env = environment("cpu")
    save_results(args.out, "hed_compensation", {"environment": env, "settings": SETTINGS, "distill": options,
                                                "rows": rows}, to_markdown(rows, env, options))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
