"""What compensation and distillation recover on the two networks trained in the tests: the digits CNN and the
digits bottleneck ResNet (BatchNorm after every conv, 1x1 convs beside the 3x3 ones).

    python -m bench.digits_compensation --out bench/results/cpu-amd-epyc-avx512-2core

For each network and budget (a fraction of the MACs of the convs considered: the 1-channel first conv stays
dense, and so do the ResNet's 1x1 convs, see :data:`NETWORKS`): :func:`cpkernels.plan_ranks` (``method="data"``,
``decomposition="cp"``), then :func:`cpkernels.compensate` on the same calibration batches, then
:func:`cpkernels.distill` on the unlabelled training images. Each step's test
accuracy (the 450 test images, never calibrated or distilled on), the logits' relative change against dense on
them, and the seconds it took, all on ``SETTINGS["threads"]`` threads.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from cpkernels import compensate, compress_model, distill, plan_ranks
from cpkernels.tools.bottleneck import trained_bottleneck_net
from cpkernels.tools.digits import accuracy, output_change, trained_cnn
from cpkernels.tools.profile import environment

from .report import save_results

NETWORKS = {
    # name: (trained model and data, decomposition, budgets)
    "cnn": (lambda: trained_cnn(0, epochs=30), "cp", (0.25, 0.125, 0.0625)),
    # CP on its 3x3 convs: its 1x1 convs (16-128 channels) do not survive low rank here. decomposition="auto" at
    # 0.9 of every conv's parameters kept 38.9 % test accuracy (98.7 % dense), though each 1x1 conv alone at 0.5
    # kept 93.8 % or more: the errors compound through the BatchNorms and the residual sums.
    "bottleneck": (lambda: trained_bottleneck_net(0, epochs=15), "cp", (0.5, 0.25, 0.125)),
}
SETTINGS = dict(
    calibration_batches=8,  # of the training images, in order; compensation holds out the last quarter
    calibration_batch=32,
    distill_batch=64,  # the whole unlabelled training split, shuffled once
    distill_epochs=3,
    lr=3e-4,
    n_iter_max=30,
    random_state=0,
    threads=1,
)


def measure(networks, settings: dict) -> list[dict]:
    rows = []
    previous = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    try:
        for net in networks:
            build, decomposition, budgets = NETWORKS[net]
            model, (x_train, _, x_test, y_test, _) = build()
            n = settings["calibration_batches"] * settings["calibration_batch"]
            calibration = list(x_train[:n].split(settings["calibration_batch"]))
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
            unlabelled = list(x_train[order].split(settings["distill_batch"]))
            dense_acc = accuracy(model, x_test, y_test)
            for budget in budgets:
                row = {"network": net, "decomposition": decomposition, "budget": budget, "dense_acc": dense_acc}
                start = time.perf_counter()
                plan = plan_ranks(model, budget, method="data", decomposition=decomposition, calibration=calibration,
                                  budget_over="considered", n_iter_max=settings["n_iter_max"],
                                  random_state=settings["random_state"], progress=False)
                compressed, _ = compress_model(model, plan)
                row.update(plan_s=time.perf_counter() - start, macs_fraction=plan.totals["fraction"],
                           ranks=plan.structure)
                row.update(step_metrics("plan", compressed, model, x_test, y_test))
                start = time.perf_counter()
                compensated, report = compensate(compressed, model, calibration, progress=False)
                row["compensate_s"] = time.perf_counter() - start
                row["refits"] = sum(r["refit"] for r in report.rows)
                row.update(step_metrics("compensated", compensated, model, x_test, y_test))
                result = distill(compensated, model, unlabelled, epochs=settings["distill_epochs"], lr=settings["lr"],
                                 progress=False)
                row.update(distill_s=result.seconds, distill_loss=(result.first_loss, result.last_loss))
                row.update(step_metrics("distilled", compensated, model, x_test, y_test))
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
    finally:
        torch.set_num_threads(previous)
    return rows


def step_metrics(step: str, model, dense, x_test, y_test) -> dict:
    return {f"acc_{step}": accuracy(model, x_test, y_test), f"change_{step}": output_change(model, dense, x_test)}


def to_markdown(rows: list[dict], env: dict, settings: dict) -> str:
    s = settings
    lines = [f"# The digits networks: plan, compensation, distillation ({env['device']})", "",
             f"torch {env['torch']}, commit {env['git_commit'][:7]}, {s['threads']} thread(s). Plans: "
             f"`plan_ranks(method='data')` on {s['calibration_batches']} batches of {s['calibration_batch']} training "
             f"images, budgets of the considered convs' MACs. Compensation: the same batches, the last quarter held "
             f"out. Distillation: {s['distill_epochs']} epochs over the unlabelled training split in batches of "
             f"{s['distill_batch']}, Adam lr {s['lr']:g}, relative MSE on the logits. Accuracy on the 450 test "
             "images (dense in brackets); change: the logits' relative change against dense on them.", "",
             "| network | family | budget | MACs kept | plan acc | change | s | + compensation acc | change | s "
             "| + distillation acc | change | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['network']} ({r['dense_acc']:.2f}) | {r['decomposition']} | {r['budget']:g} "
                     f"| {r['macs_fraction']:.3f} | {r['acc_plan']:.2f} | {r['change_plan']:.3f} | {r['plan_s']:.1f} "
                     f"| {r['acc_compensated']:.2f} | {r['change_compensated']:.3f} | {r['compensate_s']:.1f} "
                     f"| {r['acc_distilled']:.2f} | {r['change_distilled']:.3f} | {r['distill_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    args = parser.parse_args(argv)
    rows = measure(args.networks, SETTINGS)
    env = environment("cpu")
    save_results(args.out, "digits_compensation", {"environment": env, "settings": SETTINGS, "rows": rows},
                 to_markdown(rows, env, SETTINGS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
