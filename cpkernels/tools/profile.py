"""Kernel-level profiling of one CP layer (or, with ``--tucker2``, one Tucker-2 layer): ``cpkernels profile`` or ``python -m cpkernels.tools.profile``.

For one layer shape and rank it prints the GPU plan (every strategy's modeled time on the device's
GPU, or on the one named by ``--gpu``), the time of every backend against dense ``nn.Conv2d``, the
reference path broken down per stage (``torch.profiler``), the bytes/FLOPs model with its roofline
bound and the achieved percentage, and the fused kernel's chosen config and compiled resource use
(from the live kernel on a GPU, from the ahead-of-time compile report on a CPU). With ``--gpu`` on a
machine without CUDA only the plan is computed: CPU timings say nothing about the named GPU.

The backend cases built here (:func:`build_cases`) are also what the benchmark suites time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from cpkernels.compression.families import family_for
from cpkernels.core import conv_args
from cpkernels.core.cost import ConvShape
from cpkernels.core.timing import time_median
from cpkernels.dispatch import cpu as cpu_dispatch
from cpkernels.dispatch import gpu as gpu_plans
from cpkernels.modules.tucker2 import TuckerConv2d
from cpkernels.ops.reference import cp_conv2d_reference
from cpkernels.ops.tucker2_reference import tucker2_conv2d_reference
from cpkernels.tools.aot import DTYPES as AOT_DTYPES
from cpkernels.tools.aot import compile_report
from cpkernels.tools.layers import LAYERS_BY_NAME

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


# --------------------------------------------------------------------------------------------------
# The backend cases
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One way of computing the layer: ``fn(x)``, with the MACs that way issues."""
    backend: str  # dense | reference | cpu | compiled-reference | fused | planned (the GPU plan's choice)
    layout: str
    fn: Callable
    x: torch.Tensor
    macs: int


def _compiled_reference(layer) -> Callable:
    """``torch.compile`` of the staged reference maths (plain torch ops, so the compiler sees them; the
    custom op would be opaque to it): CP's four stages, or Tucker-2's three."""
    pad = list(conv_args.explicit_padding(layer.padding, layer.kernel_size, layer.dilation))
    f = layer.factors
    if isinstance(layer, TuckerConv2d):
        compiled = torch.compile(tucker2_conv2d_reference, dynamic=True)
        tensors = (f.input, f.core, f.output)
    else:
        compiled = torch.compile(cp_conv2d_reference, dynamic=True)
        tensors = (f.input, f.vertical, f.horizontal, f.output)

    def run(x):
        return compiled(x, *tensors, layer.bias, list(layer.stride), pad, list(layer.dilation))

    return run


def build_cases(
    shape: ConvShape,
    rank: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    layouts: tuple[str, ...] = ("nchw", "channels_last"),
    backends: tuple[str, ...] = ("dense", "reference", "cpu", "compiled-reference", "fused", "planned"),
    seed: int = 0,
) -> list[Case]:
    """Every requested backend x layout for the layer; backends that cannot run on ``device`` are left out
    (``fused`` and ``planned`` need CUDA, ``cpu`` is the CPU path). ``rank``: an int for a ``CPConv2d``, a
    pair ``(R_out, R_in)`` for a ``TuckerConv2d``."""
    torch.manual_seed(seed)
    kw = dict(stride=shape.stride, padding=shape.padding, dilation=shape.dilation, groups=shape.groups, device=device,
              dtype=dtype)
    dense = nn.Conv2d(shape.cin, shape.cout, shape.kernel, **kw)
    family = family_for(dense, rank)  # an int rank of a 1x1 layer is an SVDConv2d
    cls = family.module
    # Random factors: timings do not depend on their values, and ALS would dominate a benchmark run.
    cp = cls(shape.cin, shape.cout, shape.kernel, rank, **kw)
    staged_macs, fused_macs = family.macs(shape, rank), family.fused_macs(shape, rank)
    x0 = torch.randn(shape.batch, shape.cin, *shape.size, device=device, dtype=dtype)
    cases = []
    for layout in layouts:
        fmt = LAYOUTS[layout]
        x = x0.contiguous(memory_format=fmt)
        for backend in backends:
            if backend in ("fused", "planned") and device != "cuda":
                continue
            if backend == "cpu" and device != "cpu":
                continue
            if backend == "dense":
                m = nn.Conv2d(shape.cin, shape.cout, shape.kernel, **kw).to(memory_format=fmt)
                m.load_state_dict(dense.state_dict())
                cases.append(Case(backend, layout, m, x, shape.dense_macs()))
            elif backend == "compiled-reference":
                cases.append(Case(backend, layout, _compiled_reference(cp), x, staged_macs))
            else:
                impl = {"reference": "reference", "cpu": "auto", "fused": "triton", "planned": "auto"}[backend]
                m = cls(shape.cin, shape.cout, shape.kernel, rank, backend=impl, **kw)
                m.load_state_dict(cp.state_dict())
                cases.append(Case(backend, layout, m, x, fused_macs if backend == "fused" else staged_macs))
    return cases


# --------------------------------------------------------------------------------------------------
# Timing and peaks
# --------------------------------------------------------------------------------------------------
def measure_peaks(device: str, dtype: torch.dtype) -> dict:
    """Copy bandwidth (bytes/s) and matmul throughput (FLOP/s) measured on this device now: the roofline."""
    n_bytes = (1 << 30) if device == "cuda" else (1 << 28)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = time_median(lambda s: dst.copy_(s), src, repeats=5)
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    mm_s = time_median(lambda a_: a_ @ a_, a, repeats=5)
    return {"copy_bytes_per_s": 2 * n_bytes / copy_s, "matmul_flop_per_s": 2 * n**3 / mm_s}


def roofline(shape: ConvShape, macs: int, element_size: int, peaks: dict, seconds: float) -> dict:
    nbytes = shape.minimal_bytes(element_size)
    bound = max(nbytes / peaks["copy_bytes_per_s"], 2 * macs / peaks["matmul_flop_per_s"])
    return {
        "macs": macs,
        "min_bytes": nbytes,
        "achieved_gb_per_s": nbytes / seconds / 1e9,
        "achieved_tflop_per_s": 2 * macs / seconds / 1e12,
        "roofline_bound_s": bound,
        "pct_of_roofline": 100 * bound / seconds,
    }


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def environment(device: str) -> dict:
    try:
        # triton is optional (CPU-only installs may lack it): imported on first use
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "git_commit": commit,
        "allocator_env": allocator_env(),
    }


# Environment variables that change how the process allocates memory, and so the CPU time of large tensors: glibc's
# malloc settings, a preloaded allocator, PyTorch's transparent huge pages.
ALLOCATOR_ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")


def allocator_env() -> dict[str, str]:
    """Those of :data:`ALLOCATOR_ENV_PREFIXES` set in this process's environment."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ALLOCATOR_ENV_PREFIXES)}


# --------------------------------------------------------------------------------------------------
# Per-stage breakdown and kernel resources
# --------------------------------------------------------------------------------------------------
STAGES = ("cp_conv2d.stage1_pointwise_in", "cp_conv2d.stage2_vertical", "cp_conv2d.stage3_horizontal",
          "cp_conv2d.stage4_pointwise_out", "tucker2_conv2d.stage1_pointwise_in", "tucker2_conv2d.stage2_core",
          "tucker2_conv2d.stage3_pointwise_out")


def stage_breakdown(case: Case, trace: Optional[str] = None) -> dict:
    """Mean time per reference stage (ms), from torch.profiler's record_function ranges."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.x.is_cuda else [])
    with torch.inference_mode():
        case.fn(case.x)
        with profile(activities=activities) as prof:
            for _ in range(5):
                case.fn(case.x)
            if case.x.is_cuda:
                torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    out = {}
    for event in prof.key_averages():
        if event.key in STAGES:
            total_us = event.device_time_total if case.x.is_cuda else event.cpu_time_total
            out[event.key.split(".", 1)[1]] = total_us / event.count / 1e3
    return out


def fused_kernel_resources(dtype: torch.dtype, device: str) -> dict:
    """Chosen config and compiled resources of the fused kernel: of the live kernel when the profile ran
    on a GPU, else the sm_90 ahead-of-time report."""
    # the kernels import triton: loaded on first use
    from cpkernels.kernels import cp_conv2d_fused

    if device == "cuda":
        cfg = cp_conv2d_fused.best_config()
        kernel = cp_conv2d_fused.last_compiled_kernel()
        res = {"source": "live kernel", "config": cfg}
        if kernel is not None:
            res.update(registers=kernel.n_regs, spill_bytes=kernel.n_spills,
                       shared_bytes=kernel.metadata.shared,
                       tensor_cores=any(k in kernel.asm.get("ptx", "") for k in ("mma.", "wgmma.")))
        return res

    if dtype not in AOT_DTYPES:
        return {"source": "none", "note": f"the fused kernel does not run {dtype}"}
    name = AOT_DTYPES[dtype]
    rows = [r for r in compile_report("sm_90") if r["dtype"] == name]
    return {"source": "ahead-of-time compile report (sm_90, every config; no GPU here)", "configs": rows}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return (int(h), int(w or h))


def _pair_of_ranks(text: str) -> tuple[int, int]:
    try:
        r_out, r_in = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected R_OUT,R_IN (two ints), got {text!r}") from None
    if min(r_out, r_in) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be >= 1, got {text!r}")
    return (r_out, r_in)


def _gpu(text: str) -> gpu_plans.GPUSpec:
    try:
        return gpu_plans.gpu_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def gpu_plan(shape: ConvShape, rank, dtype: torch.dtype, spec: gpu_plans.GPUSpec) -> dict:
    """The GPU plan of the layer on ``spec`` (TF32 on for fp32, PyTorch's default for convolutions)."""
    family = family_for(_Kernel(shape.kernel), rank).name
    return gpu_plans.model_plan(shape, rank, dtype, spec, tf32=True, family=family).as_dict()


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """What the families ask of a conv to tell whose a rank is: its kernel size."""
    kernel_size: tuple[int, int]


def print_gpu_plan(plan: dict) -> None:
    print(f"\nGPU plan on {plan['gpu']} (modeled; cpkernels/dispatch/gpu.py): {plan['chosen']}")
    for strategy, us in plan["modeled_us"].items():
        mark = "  <- chosen" if strategy == plan["chosen"] else ""
        print(f"  {strategy:12s} {us:10.2f} us{mark}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cpkernels profile", description="Profile one CP conv layer.")
    p.add_argument("--layer", help="a layer of the shared list (see --list)")
    p.add_argument("--list", action="store_true", help="print the shared layer names and exit")
    p.add_argument("--cin", type=int, default=256)
    p.add_argument("--cout", type=int, default=256)
    p.add_argument("--size", type=_size, default=(56, 56), help="H=W, or HxW")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--rank", type=int, help="default: C/4")
    p.add_argument("--tucker2", type=_pair_of_ranks, metavar="R_OUT,R_IN",
                   help="profile a Tucker-2 layer (TuckerConv2d) of these ranks instead of a CP layer")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--padding", type=int, help="default: kernel // 2")
    p.add_argument("--dilation", type=int, default=1)
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="nchw")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gpu", type=_gpu, help=f"model the GPU plan on this GPU ({', '.join(gpu_plans.GPUS)}); "
                   "default: the CUDA device's own, or h100 on a machine without one")
    p.add_argument("--trace", help="write a Chrome trace of the reference path here")
    p.add_argument("--json", help="write everything as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(LAYERS_BY_NAME))
        return 0
    if args.layer:
        if args.layer not in LAYERS_BY_NAME:
            raise SystemExit(f"unknown layer {args.layer!r}; --list prints the names")
        layer = LAYERS_BY_NAME[args.layer]
        shape, rank = dataclasses.replace(layer.shape, dilation=args.dilation), args.rank or layer.rank(4)
    else:
        pad = args.kernel // 2 if args.padding is None else args.padding
        shape = ConvShape(args.batch, args.cin, args.cout, args.size, (args.kernel, args.kernel), args.stride, pad,
                          dilation=args.dilation)
        rank = args.rank or max(1, min(args.cin, args.cout) // 4)
    if args.tucker2 is not None:
        rank = args.tucker2
    dtype, device = DTYPES[args.dtype], args.device
    if args.gpu is not None:
        spec = args.gpu
    elif device == "cuda":
        spec = gpu_plans.spec_for_device(torch.device("cuda"))
    else:
        spec = gpu_plans.GPUS["h100"]
    plan = gpu_plan(shape, rank, dtype, spec)
    if args.gpu is not None and device != "cuda":
        print(f"layer: {shape}, rank {rank}, {args.dtype}, {args.layout}")
        print_gpu_plan(plan)
        if args.json:
            with open(args.json, "w") as f:
                strategies = family_for(_Kernel(shape.kernel), rank).gpu_strategies
                json.dump({"shape": asdict(shape), "rank": rank, "dtype": args.dtype, "layout": args.layout,
                           "gpu_plan": plan, "strategies": strategies}, f, indent=1)
            print(f"JSON written to {args.json}")
        return 0
    env = environment(device)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        why = "no CUDA device" if not torch.cuda.is_available() else f"--device {device}"
        print(f"Profiling on the CPU ({why}): dense and reference/CPU-path timings on {env['device']}; the fused "
              "kernel's resources come from the ahead-of-time compile report.")
    print(f"layer: {shape}, rank {rank}, {args.dtype}, {args.layout}")
    print_gpu_plan(plan)

    peaks = measure_peaks(device, dtype)
    cases = build_cases(shape, rank, dtype, device, layouts=(args.layout,))
    rows = []
    dense_s = None
    for case in cases:
        seconds = time_median(case.fn, case.x)
        if case.backend == "dense":
            dense_s = seconds
        row = {"backend": case.backend, "layout": case.layout, "median_ms": seconds * 1e3,
               **roofline(shape, case.macs, case.x.element_size(), peaks, seconds)}
        row["speedup_vs_dense"] = dense_s / seconds if dense_s else None
        rows.append(row)
    print(f"\nmeasured peaks: copy {peaks['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"matmul {peaks['matmul_flop_per_s'] / 1e12:.3f} TFLOP/s ({args.dtype})")
    print(f"{'backend':20s} {'median ms':>10s} {'vs dense':>9s} {'MMACs':>10s} {'GB/s':>8s} {'TFLOP/s':>8s} "
          f"{'roofline %':>10s}")
    for r in rows:
        print(f"{r['backend']:20s} {r['median_ms']:10.3f} {(r['speedup_vs_dense'] or 0):8.2f}x "
              f"{r['macs'] / 1e6:10.1f} {r['achieved_gb_per_s']:8.1f} {r['achieved_tflop_per_s']:8.3f} "
              f"{r['pct_of_roofline']:10.1f}")

    cpu_plan = None
    cpu_case = next((c for c in cases if c.backend == "cpu"), None)
    if cpu_case is not None and args.tucker2 is None:
        layer = cpu_case.fn
        out_size = conv_args.output_size(
            tuple(cpu_case.x.shape[2:]), layer.kernel_size, layer.stride,
            conv_args.explicit_padding(layer.padding, layer.kernel_size, layer.dilation), layer.dilation)
        cpu_plan = asdict(cpu_dispatch.plan(cpu_case.x, rank, shape.groups, shape.cout, layer.kernel_size, out_size,
                                      layer.dilation, needs_grad=False))
        print(f"\ncpu path: {cpu_plan['arrangement']} arrangement, batch chunks of {cpu_plan['chunk']} "
              "(cost rule; cpkernels/ops/cp_arranged.py)")
    decisions = list(cpu_dispatch.measured_plans().values())
    if cpu_case is not None and decisions:  # the measured mode decided the cpu backend's calls (one signature)
        decision = decisions[-1]
        cpu_plan = {**(cpu_plan or {}), "measured_choice": asdict(decision.plan), "measured_us": decision.measured_us}
        print(f"cpu plan, measured on this machine: {decision.plan.arrangement} ("
              + ", ".join(f"{k} {v / 1e3:.3f} ms" for k, v in decision.measured_us.items()) + ")")

    reference = next(c for c in cases if c.backend == "reference")
    stages = stage_breakdown(reference, args.trace)
    print("\nreference path per stage (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()))
    if args.trace:
        print(f"Chrome trace written to {args.trace}")

    resources = fused_kernel_resources(dtype, device)
    print(f"\nfused kernel ({resources['source']}):")
    if "configs" in resources:
        for r in resources["configs"]:
            print(f"  {r['config']:32s} registers {r['registers']:3d}  spills {r['spill_bytes']}  "
                  f"shared {r['shared_bytes']}  tensor cores {r['tensor_cores']}")
    else:
        print("  " + ", ".join(f"{k} {v}" for k, v in resources.items() if k != "source"))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "shape": asdict(shape), "rank": rank, "dtype": args.dtype,
                       "layout": args.layout, "peaks": peaks, "backends": rows, "reference_stages_ms": stages,
                       "cpu_plan": cpu_plan, "gpu_plan": plan, "fused_kernel": resources}, f, indent=1)
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
