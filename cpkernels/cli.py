"""``cpkernels plan``, ``compress`` and ``export``: the rank planner, model surgery and ONNX export on
the command line.

    cpkernels plan torchvision.models:vgg16 --input-size 1,3,224,224 --budget 0.25 --out plan.json
    cpkernels compress torchvision.models:vgg16 --plan plan.json --out vgg16_cp.pt
    cpkernels compress my_model.pt --budget 0.25 --method data --calibration batches.pt --out model_cp.pt
    cpkernels export torchvision.models:vgg16 vgg16_cp.pt --input-size 1,3,224,224 --out vgg16_cp.onnx

A model is ``package.module:function`` or ``path/to/file.py:function`` (called without arguments; it
returns the ``nn.Module``), or a file written by ``torch.save(model)``. Calibration batches are a
``.pt`` file holding a tensor (split into ``--calibration-batch`` images) or a list of tensors, or a
``module:function`` returning an iterable of batches. ``compress`` writes
``{"structure", "state_dict", "plan"}``: load it into a fresh model with
``cpkernels.apply_structure(model, saved["structure"]); model.load_state_dict(saved["state_dict"])``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

import torch
from torch import nn

from cpkernels.compression.compress import apply_structure, compress_model
from cpkernels.compression.families import DECOMPOSITIONS
from cpkernels.compression.ranks import BUDGET_OVER, METHODS, METRICS, RankPlan, plan_ranks
from cpkernels.export.onnx import ALIGN_RANKS, export_onnx


def load_object(spec: str, what: str):
    """``module:function`` or ``file.py:function``, called; or a ``torch.save`` file, loaded."""
    if os.path.isfile(spec):
        # A pickled module runs code of its own when loaded: only load files you trust.
        return torch.load(spec, map_location="cpu", weights_only=False)
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise SystemExit(f"{what} {spec!r} is neither a file nor 'module:function'")
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise SystemExit(f"{what}: no file {target!r}")
        module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(target))[0], target)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise SystemExit(f"{what}: cannot import {target!r}: {error}") from error
    if not hasattr(module, attr):
        raise SystemExit(f"{what}: {target!r} has no attribute {attr!r}")
    return getattr(module, attr)()


def load_model(spec: str) -> nn.Module:
    model = load_object(spec, "model")
    if not isinstance(model, nn.Module):
        raise SystemExit(f"model {spec!r} gave a {type(model).__name__}, not an nn.Module "
                         "(a state_dict alone has no architecture: save the module or name its function)")
    return model


def load_calibration(spec, batch: int):
    if spec is None:
        return None
    data = load_object(spec, "calibration")
    return list(data.split(batch)) if isinstance(data, torch.Tensor) else data


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,224,224, got {text!r}") from error


def add_plan_arguments(parser: argparse.ArgumentParser, budget_required: bool) -> None:
    parser.add_argument("model", help="module:function, file.py:function, or a torch.save(model) file")
    parser.add_argument("--budget", type=float, required=budget_required,
                        help="fraction in (0, 1] of the metric of all the model's convs that may remain")
    parser.add_argument("--budget-over", choices=BUDGET_OVER, default="network",
                        help="what --budget is a fraction of: every conv (network) or the convs considered")
    parser.add_argument("--decomposition", choices=DECOMPOSITIONS, default="cp",
                        help="the factored form: auto factors 1x1 convs by SVD and picks CP or Tucker-2 per kxk conv")
    parser.add_argument("--metric", choices=METRICS, default="macs")
    parser.add_argument("--method", choices=METHODS, default="weight")
    parser.add_argument("--input-size", type=_ints, help="input shape for one forward pass, e.g. 1,3,224,224")
    parser.add_argument("--calibration", help="calibration batches for --method data (see cpkernels plan --help)")
    parser.add_argument("--calibration-batch", type=int, default=64, help="images per batch when splitting a tensor")
    parser.add_argument("--rank-multiple", type=int, default=1, help="round every rank up to a multiple of this")
    parser.add_argument("--include", nargs="*", help="glob patterns of conv names to consider")
    parser.add_argument("--exclude", nargs="*", help="glob patterns of conv names to leave dense")
    parser.add_argument("--skip-first", action="store_true", help="leave the first conv dense")
    parser.add_argument("--seed", type=int, default=0, help="random_state of the decompositions")
    parser.add_argument("--channels-last", action="store_true",
                        help="time on channels_last inputs, as the model will run: --metric latency's candidates, "
                             "and compress --keep-dense-where-faster's check")


def make_plan(args):
    model = load_model(args.model)
    calibration = load_calibration(args.calibration, args.calibration_batch)
    try:
        plan = plan_ranks(model, args.budget, metric=args.metric, method=args.method, calibration=calibration,
                          input_size=args.input_size, include=args.include, exclude=args.exclude,
                          skip_first=args.skip_first, rank_multiple=args.rank_multiple, random_state=args.seed,
                          budget_over=args.budget_over, decomposition=args.decomposition,
                          memory_format=torch.channels_last if args.channels_last else None)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"cpkernels plan: {error}") from error
    return model, plan


def plan_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="cpkernels plan", description="Plan one rank per conv for a budget.",
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plan_arguments(parser, budget_required=True)
    parser.add_argument("--out", required=True, help="where to write the plan's JSON")
    args = parser.parse_args(argv)
    _, plan = make_plan(args)
    print(plan)
    with open(args.out, "w") as f:
        f.write(plan.to_json())
    print(f"plan written to {args.out}")
    return 0


def compress_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="cpkernels compress", description="Compress a model's convs.",
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plan_arguments(parser, budget_required=False)
    parser.add_argument("--plan", help="a plan JSON from cpkernels plan (instead of --budget)")
    parser.add_argument("--keep-dense-where-faster", nargs="?", const="alone", choices=["alone", "network"],
                        help="time each planned conv against its factored form at --input-size on this machine and "
                             "keep the conv where it is faster: each layer alone (a --metric latency plan always "
                             "does), or inside the network's forward pass (network)")
    parser.add_argument("--out", required=True, help="where to write {structure, state_dict, plan}")
    args = parser.parse_args(argv)
    if (args.plan is None) == (args.budget is None):
        parser.error("give either --plan or --budget")
    if args.keep_dense_where_faster and args.input_size is None:
        parser.error("--keep-dense-where-faster needs --input-size (a conv's time depends on its input)")
    if args.plan is not None:
        model = load_model(args.model)
        with open(args.plan) as f:
            plan = RankPlan.from_json(f.read())
    else:
        model, plan = make_plan(args)
    keep = {None: False, "alone": True, "network": "network"}[args.keep_dense_where_faster]
    timed_here = keep == "network" or (keep and plan.metric != "latency")  # a latency plan keeps its own layout
    try:
        compressed, report = compress_model(
            model, plan, keep_dense_where_faster=keep, input_size=args.input_size if timed_here else None,
            memory_format=torch.channels_last if timed_here and args.channels_last and plan.metric != "latency"
            else None)
    except ValueError as error:
        raise SystemExit(f"cpkernels compress: {error}") from error
    print(report)
    torch.save({"structure": report.structure, "state_dict": compressed.state_dict(), "plan": plan.to_json()},
               args.out)
    print(f"compressed model written to {args.out}")
    return 0


def export_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="cpkernels export", description="Export a compressed model to ONNX.",
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the uncompressed architecture: module:function, file.py:function or a file")
    parser.add_argument("compressed", help="what cpkernels compress wrote")
    parser.add_argument("--input-size", type=_ints, required=True, help="example input shape, e.g. 1,3,224,224")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--two-depthwise", action="store_true",
                        help="write each CP layer's depthwise stage as kh x 1 and 1 x kw convs, not one kh x kw")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size to --input-size's")
    parser.add_argument("--align-ranks", type=int, default=ALIGN_RANKS,
                        help="pad each factored layer's ranks with zero channels to a multiple of this (1: as they "
                             f"are; default {ALIGN_RANKS}, ONNX Runtime's NCHWc block on x86)")
    args = parser.parse_args(argv)
    if args.align_ranks < 1:
        raise SystemExit(f"--align-ranks must be >= 1, got {args.align_ranks}")
    model = load_model(args.model)
    saved = torch.load(args.compressed, map_location="cpu")
    if not isinstance(saved, dict) or not {"structure", "state_dict"} <= set(saved):
        raise SystemExit(f"{args.compressed} is not a file written by cpkernels compress")
    apply_structure(model, saved["structure"])
    model.load_state_dict(saved["state_dict"])
    ref = next(model.parameters())
    x = torch.randn(args.input_size, dtype=ref.dtype)
    export_onnx(model, x, args.out, merge_depthwise=not args.two_depthwise, dynamic_batch=not args.static_batch,
                align_ranks=args.align_ranks)
    print(f"ONNX model written to {args.out}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return {"plan": plan_main, "compress": compress_main, "export": export_main}[argv[0]](argv[1:])
