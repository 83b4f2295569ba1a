"""What sequential error compensation and label-free distillation recover on HED at deep budgets.

    python -m bench.hed_compensation --out bench/results/cpu-intel-xeon-avx512-2core

For each budget and family: the plan of :mod:`bench.hed_methods` (``method="data"``, cached there), then
:func:`cpkernels.compensate` on the same calibration batches (scikit-image's five photos and their mirrors at
208x320; the last photo and its mirror held out to choose each layer's ridge) twice: every layer fitted to its
conv's output (the default, ``relu_steps=0``), and the layers that only a ReLU reads fitted after it
(``relu_steps=RELU_STEPS``). Then :func:`cpkernels.distill` of the default's model on those photos only
(``--steps 0``: none): by default whole photos at the compensation's calibration size, one per step in a random
order, with the loss on ``tanh(fused logit / 0.5)``, which weighs the pixels near the edge maps' 0.5 threshold
(the best of the trials in ``bench/results/cpu-amd-epyc-avx512-2core/compensation/distill_trials.md``);
``--distill-inputs crops --distill-target prob`` is the earlier recipe (random crops, the loss on the fused
probability). Each step's edge F1 against dense on scikit-learn's two photos at 416x640 (never seen), and the
seconds it took (compensation and distillation on ``SETTINGS["threads"]`` threads).

Compensated models are cached beside the plans (``--cache``), one per configuration, fit and calibration size,
with the seconds and the report of the run that made them: a later run (another distillation) starts from them.
Delete the cache after changing the compensation.

    python -m bench.hed_compensation --out DIR --budgets 0.0625 --decompositions cp --fits relu \
        --calibration-size 416 640 --steps 0                                    # one fit, 4x the calibration pixels
    python -m bench.hed_compensation --out DIR --budgets 0.0625 --decompositions cp --fits relu \
        --calibration-size 416 640                          # then distillation, from the cached compensation

``--calibration-size`` renders the compensation's calibration photos at another size (the plan keeps its own);
``--fits`` runs one of the two fits only. The distillation starts from the conv-output fit where it ran, else
from the fit after the ReLU.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from torch import nn

from cpkernels import compensate, distill
from cpkernels.tools import hed
from cpkernels.tools.profile import environment

from .hed_methods import (CACHE, SETTINGS, calibration_batches, check_same_machine, compressed_hed, config_name,
                          edge_f1s, judging_inputs, merged_rows, save_cached)
from .report import save_results

BUDGETS = (0.25, 0.125, 0.0625)
DECOMPOSITIONS = ("cp", "tucker2", "auto")
DISTILL = dict(steps=90, lr=1e-6, inputs="photos", target="tanh:0.5", crop=(160, 160), batch=1, seed=0)
DISTILL_INPUTS = ("photos", "crops")  # whole calibration photos, or random crops of size DISTILL["crop"]
DISTILL_TARGETS = ("prob", "tanh:0.5", "sides")  # what the loss compares: see DistillTarget
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


def distill_inputs(batches: list[torch.Tensor], o: dict) -> list[torch.Tensor]:
    """The distillation's ``o["steps"]`` batches: ``o["batch"]`` whole calibration photos each, in a random order
    fixed by ``o["seed"]`` (starting over as often as needed), or random crops (:func:`crops`)."""
    if o["inputs"] == "crops":
        return crops(batches, o["steps"], o["crop"], o["batch"], o["seed"])
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(o["seed"])).tolist()
    picks = [batches[order[k % len(order)]] for k in range(o["steps"] * o["batch"])]
    return [torch.cat(picks[k:k + o["batch"]]) for k in range(0, len(picks), o["batch"])]


class DistillTarget(nn.Module):
    """What the distillation's loss compares, HED's output seen through ``kind``: ``"prob"`` its fused edge
    probability (its forward); ``"tanh:T"`` ``tanh(fused logit / T)``, steepest at the 0.5 threshold the edge F1
    reads; ``"sides"`` the six logits (five side outputs and the fusion)."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "prob":
            return self.net(x)
        sides = self.net.side_outputs(x)
        if self.kind.startswith("tanh:"):
            return torch.tanh(sides[-1] / float(self.kind[len("tanh:"):]))
        return torch.cat(sides, 1)


def compensated_hed(compressed: nn.Module, model: nn.Module, batches: list[torch.Tensor], config: str, fit: str,
                    cache) -> tuple[nn.Module, dict]:
    """``compressed`` compensated by ``fit`` on ``batches``, from ``cache`` when it holds it (None: never cached),
    and ``{"seconds", "layers"}`` of the run that made it."""
    size = "x".join(map(str, batches[0].shape[-2:]))
    path = None if cache is None else os.path.join(cache, f"{config}-{fit}-{size}.pt")
    if path is not None and os.path.exists(path):
        fitted = copy.deepcopy(compressed)
        fitted.load_state_dict(torch.load(path))  # state_dicts of this benchmark's own
        with open(path[:-3] + ".json") as f:
            return fitted.eval(), {**json.load(f), "cached": True}
    start = time.perf_counter()
    fitted, report = compensate(compressed, model, batches, relu_steps=FITS[fit], progress=False)
    print(report, flush=True)
    info = {"seconds": time.perf_counter() - start, "layers": [{k: r[k] for k in LAYER_KEYS} for r in report.rows]}
    if path is not None:
        save_cached(path, fitted, info)
    return fitted, info


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
                    fits[key], fitted = compensated_hed(compressed, model, batches, row["config"], key, cache)
                    row.update({f"{key}_s": fitted["seconds"], f"f1_{key}": edge_f1s(fits[key], dense_maps, inputs),
                                f"{key}_layers": fitted["layers"], f"{key}_cached": fitted.get("cached", False)})
                o = distill_options
                if o["steps"]:
                    row["distilled_from"] = next(iter(fits))
                    student = fits[row["distilled_from"]]
                    result = distill(DistillTarget(student, o["target"]), DistillTarget(model, o["target"]),
                                     distill_inputs(batches, o), epochs=1, lr=o["lr"], progress=False)
                    row.update(distill_s=result.seconds, distill_loss=(result.first_loss, result.last_loss),
                               f1_distilled=edge_f1s(student, dense_maps, inputs), distill=dict(o))
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("layers")}), flush=True)
                torch.set_num_threads(previous)
    finally:
        torch.set_num_threads(previous)
    return rows


def recipe(o: dict) -> str:
    """A distillation's recipe in words."""
    what = (f"{o['batch']} whole calibration photo(s) a step in a random order" if o["inputs"] == "photos" else
            f"{o['batch']} random {o['crop'][0]}x{o['crop'][1]} crops of the calibration photos a step")
    target = {"prob": "the fused probability", "sides": "the six logits"}.get(
        o["target"], f"tanh(fused logit / {o['target'][len('tanh:'):]})")
    return f"{o['steps']} steps of {what}, Adam lr {o['lr']:g}, relative MSE on {target}"


def to_markdown(rows: list[dict], env: dict, distill_options: dict) -> str:
    o = distill_options
    lines = [f"# HED's VGG-16: plan, compensation, distillation ({env['device']})", "",
             f"torch {env['torch']}, commit {env['git_commit'][:7]}. Plans: `bench.hed_methods` (method='data'). "
             f"Compensation: calibration batches of the plan, the last photo and its mirror held out; every layer "
             f"fitted to its conv's output (the default, `relu_steps=0`), then the layers only a ReLU reads fitted "
             f"after it (`relu_steps={RELU_STEPS}`); the calibration size is in the table. "
             + (f"Distillation (of the conv-output fit's model, else the one after the ReLU): {recipe(o)}. A row "
                "distilled another way names its recipe. " if o["steps"] else "No distillation (`--steps 0`). ")
             + "Compensation seconds marked (cached) are those of the earlier run whose compensated model this one "
             "loaded. "
             + f"F1: edge F1 against dense on scikit-learn's china / flower at "
             f"{SETTINGS['size'][0]}x{SETTINGS['size'][1]}. Times on {SETTINGS['threads']} threads (planning on "
             f"{SETTINGS['plan_threads']}); other jobs shared the machine, so the times are inflated.", "",
             "| family | budget | MACs kept | plan F1 | plan s | calibration | + compensation, conv outputs F1 | s "
             "| + compensation, after ReLU F1 | s | + distillation F1 | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f1(d):
        return f"{d['china']:.3f} / {d['flower']:.3f}"

    def cell(r, key, seconds):
        if f"f1_{key}" not in r:
            return "- | -"
        note = " (cached)" if r.get(f"{key}_cached") else ""
        if key == "distilled" and r.get("distill", o) != o:
            note = f" ({recipe(r['distill'])})"
        return f"{f1(r[f'f1_{key}'])} | {r[seconds]:.0f}{note}"

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
    parser.add_argument("--distill-inputs", choices=DISTILL_INPUTS, default=DISTILL["inputs"])
    parser.add_argument("--distill-target", choices=DISTILL_TARGETS, default=DISTILL["target"])
    args = parser.parse_args(argv)
    # as JSON keeps them (the crop size a list), so that a row read back compares equal to this run's recipe
    options = json.loads(json.dumps({**DISTILL, "steps": args.steps, "lr": args.lr, "inputs": args.distill_inputs,
                                     "target": args.distill_target}))
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
