"""Uniform ranks against planned ones at the same MACs, on the digits CNN trained on the spot.

    python -m bench.rank_methods --out bench/results/cpu-amd-epyc-2core

For each seed: train the CNN of :mod:`cpkernels.tools.digits`, then compress its convs to ``--budget`` of their
MACs four ways: the same MAC fraction in every layer (uniform), and :func:`cpkernels.plan_ranks` with
``method="weight"``, ``"vbmf"`` and ``"data"`` (calibrated on the training split). Each is measured
before and after ``--finetune-epochs`` of fine-tuning: test accuracy and the logits' relative change
against the dense network. Writes ``rank_methods.json`` and ``rank_methods.md``.
"""
from __future__ import annotations

import argparse
import copy

import torch

from cpkernels import compress_model, plan_ranks
from cpkernels.compression.compress import rank_for_mac_fraction
from cpkernels.compression.convs import conv_input_sizes
from cpkernels.tools.digits import accuracy, output_change, train, trained_cnn
from cpkernels.tools.profile import environment

from .report import save_results

METHODS = ("uniform", "weight", "vbmf", "data")


def uniform_ranks(model, budget: float, input_size) -> dict:
    """The largest rank within ``budget`` of each 3x3-or-larger conv's MACs (what ``rank=`` does per layer)."""
    sizes = conv_input_sizes(model, input_size)
    return {name: rank_for_mac_fraction(m, budget, sizes[id(m)]) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1}


def compare(seed: int = 0, budget: float = 0.25, epochs: int = 30, finetune_epochs: int = 8) -> list[dict]:
    model, (x_train, y_train, x_test, y_test, _) = trained_cnn(seed, epochs)
    input_size = (1, *x_train.shape[1:])
    rows = [{"seed": seed, "method": "dense", "macs_fraction": 1.0, "acc": accuracy(model, x_test, y_test),
             "logit_change": 0.0}]
    for method in METHODS:
        if method == "uniform":
            compressed, report = compress_model(model, rank=uniform_ranks(model, budget, input_size),
                                                input_size=input_size, random_state=seed, n_iter_max=30,
                                                progress=False)
            done = [r for r in report.rows if r["rank"] is not None]  # over the convs compressed, as the plans
            fraction = sum(r["macs_after"] for r in done) / sum(r["macs_before"] for r in done)
            ranks = report.structure
        else:
            kwargs = dict(calibration=list(x_train.split(256))) if method == "data" else dict(input_size=input_size)
            # over the convs uniform compresses too (the 1-channel first conv stays dense in both): equal MACs
            plan = plan_ranks(model, budget, method=method, random_state=seed, progress=False,
                              budget_over="considered", **kwargs)
            compressed, _ = compress_model(model, plan)
            fraction, ranks = plan.totals["fraction"], plan.structure
        row = {"seed": seed, "method": method, "ranks": ranks, "macs_fraction": round(fraction, 4),
               "acc": accuracy(compressed, x_test, y_test), "logit_change": output_change(compressed, model, x_test)}
        if finetune_epochs:
            tuned = copy.deepcopy(compressed)
            train(tuned, x_train, y_train, finetune_epochs, lr=1e-3, seed=seed + 1)
            row.update(acc_finetuned=accuracy(tuned, x_test, y_test),
                       logit_change_finetuned=output_change(tuned, model, x_test))
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], env: dict, budget: float) -> str:
    lines = [f"# Rank methods at {budget} of conv MACs: the digits CNN ({env['device']})", "",
             f"torch {env['torch']}, {torch.get_num_threads()} threads. Test split of scikit-learn's digits "
             "(450 images); `logits moved` is ||f_cp(x) - f(x)|| / ||f(x)|| on it. Fine-tuned: 8 epochs, "
             "Adam 1e-3.", "",
             "| seed | method | ranks | MACs kept | accuracy | logits moved | accuracy fine-tuned "
             "| logits moved fine-tuned |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"] == "dense":
            lines.append(f"| {r['seed']} | dense | | 1 | {r['acc']:.2f} % | | | |")
            continue
        ranks = ", ".join(f"{k}:{v}" for k, v in r["ranks"].items())
        lines.append(f"| {r['seed']} | {r['method']} | {ranks} | {r['macs_fraction']:.3f} | {r['acc']:.2f} % | "
                     f"{r['logit_change']:.4f} | {r['acc_finetuned']:.2f} % | {r['logit_change_finetuned']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    rows = [row for seed in args.seeds for row in compare(seed, args.budget)]
    env = environment("cpu")
    save_results(args.out, "rank_methods", {"environment": env, "budget": args.budget, "rows": rows},
                 to_markdown(rows, env, args.budget))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
