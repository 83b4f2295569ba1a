"""CP against Tucker-2 at equal MACs: layer errors, accuracy, and CPU speed.

    python -m bench.tucker_vs_cp --out bench/results/cpu-amd-epyc-2core

1. On the digits CNN trained on the spot (:mod:`cpkernels.tools.digits`), for each compressible conv and each
   MAC fraction: CP at the largest rank within the fraction, Tucker-2 at the largest proportional ranks
   within the same MACs; the relative weight error, and the relative error of the conv's output on the
   test images (its real inputs there).
2. The whole CNN planned to ``--budget`` of its conv MACs by :func:`cpkernels.plan_ranks` (``method="data"``)
   with ``decomposition="cp"``, ``"tucker2"`` and ``"auto"``: the plan's objective, test accuracy before and
   after fine-tuning.
3. CPU speed of layers of the shared list (``backend="auto"``, fp32, NCHW, the layer's batch): dense, CP at
   R = C and Tucker-2 at the same MACs (random factors: the time does not depend on their values).
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from cpkernels import compress_model, decompose_conv, decompose_tucker2, plan_ranks
from cpkernels.compression.calibration import EvalHooks
from cpkernels.compression.compress import rank_for_mac_fraction
from cpkernels.compression.convs import conv_shape
from cpkernels.compression.families import family_of_rank
from cpkernels.core.timing import time_median
from cpkernels.decompositions.tucker2 import largest_proportional_ranks
from cpkernels.tools.digits import accuracy, output_change, train, trained_cnn
from cpkernels.tools.layers import LAYERS_BY_NAME
from cpkernels.tools.profile import build_cases, environment

from .report import save_results

FRACTIONS = (0.5, 0.25, 0.125)
SPEED_LAYERS = ("vgg16-conv2_2", "vgg16-conv3_2", "vgg16-conv4_2", "resnet18-layer3", "resnet50-layer3-down")


def layer_errors(model: nn.Module, x: torch.Tensor) -> list[dict]:
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1}
    inputs = {}

    def hook(name):
        def record(module, args, output):
            inputs[name] = args[0]
        return record

    with EvalHooks(model, convs, hook):  # eval mode, no grad; hooks removed after
        model(x)
    rows = []
    for name, conv in convs.items():
        x_in = inputs[name]
        shape = conv_shape(conv, tuple(x_in.shape[-2:]))
        with torch.no_grad():
            y = conv(x_in)
        for fraction in FRACTIONS:
            r = rank_for_mac_fraction(conv, fraction, shape.size)
            pair = largest_proportional_ranks(shape.tucker2_macs, shape.cp_macs(r), conv.out_channels // conv.groups,
                                              conv.in_channels // conv.groups) or (1, 1)
            for kind, f in (("cp", decompose_conv(conv.weight.detach(), r)),
                            ("tucker2", decompose_tucker2(conv.weight.detach(), pair))):
                with torch.no_grad():
                    y_hat = nn.functional.conv2d(x_in, f.to_dense(), conv.bias, conv.stride, conv.padding)
                rows.append({"layer": name, "shape": list(conv.weight.shape), "fraction": fraction,
                             "decomposition": kind, "rank": list(pair) if kind == "tucker2" else r,
                             "macs_kept": round(family_of_rank(f.rank).macs(shape, f.rank) / shape.dense_macs(), 4),
                             "weight_error": round(f.relative_error(conv.weight), 4),
                             "output_error": round(float((y_hat - y).norm() / y.norm()), 4)})
    return rows


def network_rows(model, data, budget: float, finetune_epochs: int, seed: int) -> list[dict]:
    x_train, y_train, x_test, y_test, _ = data
    rows = [{"decomposition": "dense", "acc": accuracy(model, x_test, y_test)}]
    for kind in ("cp", "tucker2", "auto"):
        plan = plan_ranks(model, budget, method="data", calibration=list(x_train.split(256)), decomposition=kind,
                          random_state=seed, progress=False, budget_over="considered")
        compressed, _ = compress_model(model, plan)
        tuned = copy.deepcopy(compressed)
        train(tuned, x_train, y_train, finetune_epochs, lr=1e-3, seed=seed + 1)
        rows.append({"decomposition": kind, "ranks": {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in plan.structure.items()},
                     "objective": round(plan.totals["error_sum"], 4), "macs_fraction": round(plan.totals["fraction"], 4),
                     "acc": accuracy(compressed, x_test, y_test), "logit_change": output_change(compressed, model, x_test),
                     "acc_finetuned": accuracy(tuned, x_test, y_test)})
    return rows


def speed_rows() -> list[dict]:
    rows = []
    for name in SPEED_LAYERS:
        layer = LAYERS_BY_NAME[name]
        rank = layer.rank(1)
        pair = layer.tucker2_rank(rank)
        times = {}
        for kind, r in (("cp", rank), ("tucker2", pair)):
            for case in build_cases(layer.shape, r, layouts=("nchw",), backends=("dense", "cpu")):
                if case.backend == "dense" and "dense" in times:
                    continue
                with torch.inference_mode():
                    times["dense" if case.backend == "dense" else kind] = time_median(case.fn, case.x, repeats=5)
        rows.append({"layer": name, "batch": layer.shape.batch, "cp_rank": rank, "tucker2_rank": list(pair),
                     "cp_macs_kept": round(layer.shape.cp_macs(rank) / layer.shape.dense_macs(), 3),
                     "tucker2_macs_kept": round(layer.shape.tucker2_macs(pair) / layer.shape.dense_macs(), 3),
                     **{f"{k}_ms": round(v * 1e3, 2) for k, v in times.items()}})
    return rows


def to_markdown(env: dict, errors: list[dict], network: list[dict], speed: list[dict], budget: float) -> str:
    out = [f"# CP and Tucker-2 at equal MACs ({env['device']}, torch {env['torch']})", "",
           "## Layer errors of the digits CNN trained here (test images as the convs' inputs)", "",
           "| layer | MACs fraction | CP rank | CP weight err | CP output err | Tucker-2 ranks | Tucker-2 weight err "
           "| Tucker-2 output err |", "|---|---|---|---|---|---|---|---|"]
    for cp, tk in zip(errors[::2], errors[1::2]):
        out.append(f"| {cp['layer']} {'x'.join(map(str, cp['shape']))} | {cp['fraction']} | {cp['rank']} | "
                   f"{cp['weight_error']:.3f} | {cp['output_error']:.3f} | {'x'.join(map(str, tk['rank']))} | "
                   f"{tk['weight_error']:.3f} | {tk['output_error']:.3f} |")
    out += ["", f"## The whole CNN planned to {budget} of its conv MACs (`plan_ranks(method=\"data\")`)", "",
            "| decomposition | ranks | MACs kept | objective (summed error) | accuracy | logits moved | accuracy "
            "fine-tuned |", "|---|---|---|---|---|---|---|"]
    for r in network:
        if r["decomposition"] == "dense":
            out.append(f"| dense | | 1 | | {r['acc']:.2f} % | | |")
            continue
        ranks = ", ".join(f"{k}:{'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in r["ranks"].items())
        out.append(f"| {r['decomposition']} | {ranks} | {r['macs_fraction']} | {r['objective']} | {r['acc']:.2f} % | "
                   f"{r['logit_change']:.4f} | {r['acc_finetuned']:.2f} % |")
    out += ["", "## CPU speed (`backend=\"auto\"`, fp32, NCHW; median ms)", "",
            "| layer | batch | dense ms | CP R | CP MACs kept | CP ms (×) | Tucker-2 ranks | Tucker-2 MACs kept "
            "| Tucker-2 ms (×) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in speed:
        out.append(f"| {r['layer']} | {r['batch']} | {r['dense_ms']} | {r['cp_rank']} | {r['cp_macs_kept']} | "
                   f"{r['cp_ms']} ({r['dense_ms'] / r['cp_ms']:.2f}×) | {'x'.join(map(str, r['tucker2_rank']))} | "
                   f"{r['tucker2_macs_kept']} | {r['tucker2_ms']} ({r['dense_ms'] / r['tucker2_ms']:.2f}×) |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--no-speed", action="store_true", help="skip the CPU timings")
    args = parser.parse_args(argv)
    model, data = trained_cnn(args.seed)
    errors = layer_errors(model, data[2])  # the test images
    network = network_rows(model, data, args.budget, args.finetune_epochs, args.seed)
    speed = [] if args.no_speed else speed_rows()
    env = environment("cpu")
    save_results(args.out, "tucker_vs_cp", {"environment": env, "budget": args.budget, "layer_errors": errors,
                                            "network": network, "speed": speed},
                 to_markdown(env, errors, network, speed, args.budget))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
