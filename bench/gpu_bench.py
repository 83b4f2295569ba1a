"""GPU benchmark table: dense cuDNN, the four-stage reference and the fused kernel.

    python -m bench.gpu_bench --out DIR [--layers NAME ...] [--dtypes bfloat16 float32] [--batch N] [--device cuda]

Layers default to the roofline layers of ``cpkernels/tools/layers.py`` (N = 32, 3x3) at R = C/4, C/2, C and
1.25 C (the last two: what trained networks need), in bf16 and fp32; for the ``--taps-layers`` the
fused layer is also timed on the taps kernel (first dtype only). Backends: dense cuDNN, the four-stage
reference, the fused kernel (``backend="triton"``) and ``planned`` (``backend="auto"``: what the GPU
plan picks, by default its measured mode). Each row: median time (CUDA events via ``triton.testing.do_bench``
on a GPU), the GPU plan's modeled time for that row's strategy and the model's choice (``planned``) with
every candidate's modeled time, beside what the measured plan chose for the same layer, rank, dtype and
layout (``measured_choice``), its timing of each candidate it ran and the candidates it refused for
disagreeing with the reference (cpkernels/dispatch/gpu.py), achieved GB/s against the minimal X+Y
bytes, and that as a percentage of a device-to-device copy's bandwidth measured in the same run; for
the first dtype also the time replayed in a CUDA graph. Results go to DIR/gpu_bench.json and
DIR/gpu_bench.md with the device name and versions. ``--device cpu`` runs the same table without the
fused and planned rows (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

from cpkernels.core.timing import time_median
from cpkernels.dispatch import gpu
from cpkernels.tools.layers import LAYERS_BY_NAME, ROOFLINE_LAYERS
from cpkernels.tools.profile import DTYPES, build_cases, environment, measure_peaks


def bench_layer(shape, rank: int, dtype: torch.dtype, device: str, copy_bytes_per_s: float,
                also_taps: bool = False, graph: bool = False) -> list[dict]:
    """Dense, reference, fused and planned rows for one layer and rank; ``also_taps`` adds the fused layer
    forced onto the taps kernel ("fused-taps"), to compare the two kernels where the rows kernel applies;
    ``graph`` adds each row's time replayed in a CUDA graph (no per-call CPU work). Every row of a layout
    carries the model's choice and the measured plan's (from that layout's planned row)."""
    rows = []
    nbytes = shape.minimal_bytes(torch.empty((), dtype=dtype).element_size())

    plan = model_plan_for(shape, rank, dtype, device)
    measured_by_layout = {}

    def row(backend: str, case) -> dict:
        if backend == "planned":
            gpu.clear_cache()  # the planned case's call signature is then the only one decided: read back below
        seconds = time_median(case.fn, case.x)
        if backend == "planned":
            measured_by_layout[case.layout] = measured_plan_fields()
        launch = fused_launch_info(shape, rank, dtype) if backend.startswith("fused") else {}
        planned = measured_by_layout.get(case.layout, {}).get("measured_choice") or plan["chosen"]
        strategy = {"dense": "dense", "reference": "four-stage", "planned": planned}.get(backend)
        if launch.get("config"):
            strategy = "fused-" + launch["config"]["kernel"]
        bytes_per_s = nbytes / seconds
        return {
            "layer": f"{shape.cin}->{shape.cout} @{shape.size[0]}^2 N={shape.batch}",
            "rank": rank, "dtype": str(dtype).removeprefix("torch."), "backend": backend,
            "layout": case.layout, "strategy": strategy, "median_us": round(seconds * 1e6, 2),
            "modeled_us": plan["modeled_us"].get(strategy), "planned": plan["chosen"],
            "plan_modeled_us": plan["modeled_us"],
            "gbps_vs_min_bytes": round(bytes_per_s / 1e9, 1),
            "pct_of_copy_bw": round(100 * bytes_per_s / copy_bytes_per_s, 1),
            **launch,
            **(graph_time(case) if graph else {}),
        }

    cases = build_cases(shape, rank, dtype, device, backends=("dense", "reference", "fused", "planned"))
    rows += [row(case.backend, case) for case in cases]
    if also_taps:
        from cpkernels.kernels import cp_conv2d_fused as fused

        default, fused.DEFAULT_KERNEL = fused.DEFAULT_KERNEL, "taps"
        try:
            rows += [row("fused-taps", case) for case in cases if case.backend == "fused"]
        finally:
            fused.DEFAULT_KERNEL = default
    # The planned row comes after the others of its layout: its measured plan is added to each afterwards.
    for r in rows:
        r.update(measured_by_layout.get(r["layout"], NOT_MEASURED))
    return rows


# What a row records of the measured plan where none decided (no planned row: the CPU smoke run, or
# CPKERNELS_GPU_PLAN=model).
NOT_MEASURED = {"measured_choice": None, "plan_measured_us": None, "refused": None}


def measured_plan_fields() -> dict:
    """The measured GPU plan's decision for the one call signature decided since the cache was cleared."""
    plans = list(gpu.measured_plans().values())
    if len(plans) != 1:  # the model's mode, or a layer that made more than one call signature
        return dict(NOT_MEASURED)
    decided = plans[0]
    return {"measured_choice": decided.chosen, "plan_measured_us": decided.measured_us, "refused": decided.refused}


def model_plan_for(shape, rank: int, dtype: torch.dtype, device: str) -> dict:
    """The GPU plan's model for this row, on this device's spec (an H100's for the CPU smoke run)."""
    spec = gpu.spec_for_device(torch.device(device)) if device == "cuda" else gpu.GPUS["h100"]
    return gpu.model_plan(shape, rank, dtype, spec, tf32=torch.backends.cudnn.allow_tf32).as_dict()


def graph_time(case) -> dict:
    """Median µs of ``case`` replayed in a CUDA graph (``triton.testing.do_bench_cudagraph``): the GPU's
    time without the per-call Python and launch work, which decides small layers in eager mode. Back to
    back replays without an L2 flush, so layers that fit in L2 look faster than from DRAM. A capture
    that fails is recorded, not raised."""
    from triton.testing import do_bench_cudagraph

    try:
        with torch.inference_mode():
            return {"graph_us": round(do_bench_cudagraph(lambda: case.fn(case.x), return_mode="median") * 1e3, 2)}
    except Exception as error:  # noqa: BLE001 - one failed capture must not end the run
        return {"graph_error": f"{type(error).__name__}: {error}"[:200]}


def fused_launch_info(shape, rank: int, dtype: torch.dtype) -> dict:
    """The config the autotuner chose for the latest launch and, for the rows kernel, the factor bytes
    its programs re-read from L2 (docs/kernel.md), to tell an L2-bound run from a DRAM-bound one."""
    from cpkernels.kernels.cp_conv2d_fused import best_config

    config = best_config()
    info = {"config": config}
    if config and config["kernel"] == "rows":
        es = torch.empty((), dtype=dtype).element_size()
        info["factor_mb_from_l2"] = round(
            shape.rows_kernel_factor_bytes(rank, config["ROWS"], config["BLOCK_W"], es) / 1e6, 1)
    return info


def to_markdown(env: dict, copy_gbps: float, rows: list[dict]) -> str:
    lines = [
        f"# Benchmark: {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}, commit {env['git_commit'][:10]}; "
        f"device copy bandwidth measured in this run: {copy_gbps:.0f} GB/s. Median times.",
        "",
        "Planned rows: the model's choice and the measured plan's; per row, the measured plan's own timing of "
        f"the row's strategy (its candidates: the model's best {gpu.MEASURED_TOP}, dense and the reference).",
        "",
        "| layer | rank | dtype | backend | layout | median µs | modeled µs | plan's measured µs | GB/s (min X+Y) "
        "| % of copy BW | µs in a CUDA graph | fused config | factor MB from L2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['layer']} | {r['rank']} | {r['dtype']} | {r['backend']}{_planned_text(r)} | {r['layout']} | "
        f"{r['median_us']} | {_blank_if_none(r['modeled_us'])} | "
        f"{_blank_if_none((r.get('plan_measured_us') or {}).get(r.get('strategy')))} | "
        f"{r['gbps_vs_min_bytes']} | {r['pct_of_copy_bw']} | {r.get('graph_us', r.get('graph_error', ''))} | "
        f"{_config_text(r.get('config'))} | {r.get('factor_mb_from_l2', '')} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def _blank_if_none(value) -> str:
    return "" if value is None else str(value)


def _planned_text(r: dict) -> str:
    """A planned row's choices: the model's, the measured plan's, and what the measured plan refused."""
    if r["backend"] != "planned":
        return ""
    text = f" (model: {r['planned']}"
    if r.get("measured_choice"):
        text += f", measured: {r['measured_choice']}"
    if r.get("refused"):
        text += f", refused: {' '.join(sorted(r['refused']))}"
    return text + ")"


def _config_text(config) -> str:
    if not config:
        return ""
    return " ".join(f"{k}={v}" for k, v in config.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_bench.json and gpu_bench.md")
    parser.add_argument("--layers", nargs="*", default=[layer.name for layer in ROOFLINE_LAYERS],
                        choices=sorted(LAYERS_BY_NAME), metavar="NAME", help="layers of cpkernels/tools/layers.py")
    parser.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"], choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, help="override each layer's batch")
    parser.add_argument("--no-graph", action="store_true",
                        help="skip the CUDA-graph replay times (taken for the first dtype only)")
    parser.add_argument("--taps-layers", nargs="*", default=["roofline-256-56"], metavar="NAME",
                        help="layers also timed with the fused layer forced onto the taps kernel (first dtype only)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    os.makedirs(args.out, exist_ok=True)
    env = environment(args.device)
    copy_bytes_per_s = measure_peaks(args.device, torch.float32)["copy_bytes_per_s"]
    rows = []
    for dtype_index, dtype in enumerate(DTYPES[d] for d in args.dtypes):
        for name in args.layers:
            shape = LAYERS_BY_NAME[name].shape
            if args.batch:
                shape = dataclasses.replace(shape, batch=args.batch)
            also_taps = dtype_index == 0 and name in args.taps_layers
            graph = dtype_index == 0 and args.device == "cuda" and not args.no_graph
            for rank in (LAYERS_BY_NAME[name].rank(d) for d in (4, 2, 1, 0.8)):
                new = bench_layer(shape, rank, dtype, args.device, copy_bytes_per_s, also_taps, graph)
                rows += new
                print("\n".join(to_markdown(env, copy_bytes_per_s / 1e9, new).splitlines()[-len(new):]), flush=True)
                # Written after every layer: a run cut short by its time limit keeps what it measured.
                write_results(args.out, env, copy_bytes_per_s, rows)
    print(to_markdown(env, copy_bytes_per_s / 1e9, rows))
    return 0


def write_results(out: str, env: dict, copy_bytes_per_s: float, rows: list[dict]) -> None:
    with open(os.path.join(out, "gpu_bench.json"), "w") as f:
        json.dump({"environment": env, "gpu_plan_measures": gpu.measuring(), "copy_gbps": copy_bytes_per_s / 1e9,
                   "rows": rows}, f, indent=1)
    with open(os.path.join(out, "gpu_bench.md"), "w") as f:
        f.write(to_markdown(env, copy_bytes_per_s / 1e9, rows))


if __name__ == "__main__":
    raise SystemExit(main())
