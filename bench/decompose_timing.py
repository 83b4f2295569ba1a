"""Time the decomposition of VGG-16's 13 convs: the fast ALS against TensorLy's parafac, and the rank
planner on the whole network.

    python -m bench.decompose_timing [--parafac-layers N] [--target-error E]
    python -m bench.decompose_timing --plan 0.25

Random weights (the timing does not depend on their values). Prints per-layer seconds and relative
errors, the whole-network total at R = C/4, and the time of a whole-network target-error search.
``--plan B`` instead times ``plan_ranks`` then ``compress_model(model, plan)`` on VGG-16's feature
extractor at 3x224x224 with a budget of ``B`` of its conv MACs.
"""
from __future__ import annotations

import argparse
import time

import torch

from cpkernels import compress_model, decompose_conv, plan_ranks
from cpkernels.tools.profile import device_name

# (name, Cout, Cin) of VGG-16's 3x3 convs.
VGG16 = (
    ("conv1_1", 64, 3), ("conv1_2", 64, 64), ("conv2_1", 128, 64), ("conv2_2", 128, 128),
    ("conv3_1", 256, 128), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
    ("conv4_1", 512, 256), ("conv4_2", 512, 512), ("conv4_3", 512, 512),
    ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512),
)


def rank_c4(cout: int, cin: int) -> int:
    return max(1, min(cout, cin) // 4)


def vgg16_features() -> torch.nn.Sequential:
    """VGG-16's feature extractor (13 3x3 convs, ReLUs, five max-pools), random weights."""
    layers, pools_after = [], {"conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"}
    for name, cout, cin in VGG16:
        layers += [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.ReLU()]
        if name in pools_after:
            layers.append(torch.nn.MaxPool2d(2))
    return torch.nn.Sequential(*layers)


def time_planning(budget: float) -> float:
    torch.manual_seed(0)
    model = vgg16_features()
    start = time.perf_counter()
    plan = plan_ranks(model, budget, input_size=(1, 3, 224, 224), progress=False)
    planned = time.perf_counter() - start
    compress_model(model, plan)
    total = time.perf_counter() - start
    print(plan)
    print(f"\nVGG-16 features at 3x224x224, budget {budget} of conv MACs: plan_ranks {planned:.1f} s, "
          f"then compress_model {total - planned:.1f} s, {total:.1f} s in all")
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parafac-layers", nargs="*", default=["conv3_2", "conv4_2"],
                   help="layers also decomposed with TensorLy's parafac (slow)")
    p.add_argument("--target-error", type=float, default=0.9)
    p.add_argument("--skip-rank-c4", action="store_true", help="only run the target-error search")
    p.add_argument("--plan", type=float, metavar="BUDGET", help="time the rank planner on VGG-16 instead")
    args = p.parse_args(argv)
    if args.plan is not None:
        print(f"{device_name('cpu')}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        time_planning(args.plan)
        return 0
    torch.manual_seed(0)
    weights = {name: torch.randn(cout, cin, 3, 3) / (cin * 9) ** 0.5 for name, cout, cin in VGG16}
    print(f"{device_name('cpu')}, torch {torch.__version__}, {torch.get_num_threads()} threads; 100 ALS "
          "iterations, float64, SVD init")
    print(f"{'layer':8s} {'shape':>16s} {'R':>4s} {'ALS s':>7s} {'ALS err':>8s} "
          f"{'parafac s':>10s} {'parafac err':>11s}")
    total = 0.0
    for name, cout, cin in () if args.skip_rank_c4 else VGG16:
        r = rank_c4(cout, cin)
        start = time.perf_counter()
        f = decompose_conv(weights[name], r)
        seconds = time.perf_counter() - start
        total += seconds
        line = f"{name:8s} {str((cout, cin, 3, 3)):>16s} {r:4d} {seconds:7.2f} {f.relative_error(weights[name]):8.4f}"
        if name in args.parafac_layers:
            start = time.perf_counter()
            g = decompose_conv(weights[name], r, method="parafac")
            line += f" {time.perf_counter() - start:10.2f} {g.relative_error(weights[name]):11.4f}"
        print(line, flush=True)
    print(f"all 13 convs at R = C/4: {total:.1f} s")
    print(f"\ntarget-error search, relative error <= {args.target_error}:")
    total = 0.0
    for name, cout, cin in VGG16:
        start = time.perf_counter()
        f = decompose_conv(weights[name], None, target_error=args.target_error)
        seconds = time.perf_counter() - start
        total += seconds
        print(f"{name:8s} rank {f.rank:4d}  error {f.relative_error(weights[name]):.4f}  {seconds:7.1f} s", flush=True)
    print(f"whole network: {total:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
