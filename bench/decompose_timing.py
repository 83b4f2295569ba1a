"""Time the decomposition of VGG-16's 13 convs: the fast ALS against TensorLy's parafac.

    python -m bench.decompose_timing [--parafac-layers N] [--target-error E]

Random weights (the timing does not depend on their values). Prints per-layer seconds and relative
errors, the whole-network total at R = C/4, and the time of a whole-network target-error search.
"""
from __future__ import annotations

import argparse
import time

import torch

from cpkernels import decompose_conv
from cpkernels.profile import device_name

# (name, Cout, Cin) of VGG-16's 3x3 convs.
VGG16 = (
    ("conv1_1", 64, 3), ("conv1_2", 64, 64), ("conv2_1", 128, 64), ("conv2_2", 128, 128),
    ("conv3_1", 256, 128), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
    ("conv4_1", 512, 256), ("conv4_2", 512, 512), ("conv4_3", 512, 512),
    ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512),
)


def rank_c4(cout: int, cin: int) -> int:
    return max(1, min(cout, cin) // 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parafac-layers", nargs="*", default=["conv3_2", "conv4_2"],
                   help="layers also decomposed with TensorLy's parafac (slow)")
    p.add_argument("--target-error", type=float, default=0.9)
    p.add_argument("--skip-rank-c4", action="store_true", help="only run the target-error search")
    args = p.parse_args(argv)
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
