"""GPU benchmark table: dense cuDNN, the four-stage reference and the fused kernel (CUDA only).

    python -m bench.gpu_bench --out DIR

Layers are the roofline layers of ``cpkernels/layers.py`` (N = 32, 3x3) at R = C/4 and C/2, in bf16 and
fp32. Each row: median time (``triton.testing.do_bench``, CUDA events), achieved GB/s against the
minimal X+Y bytes, and that as a percentage of a device-to-device copy's bandwidth measured in the
same run. Results go to DIR/gpu_bench.json and DIR/gpu_bench.md with the GPU name and versions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch
import triton
from triton.testing import do_bench

from cpkernels import CPConv2d
from cpkernels.cost import ConvShape

from cpkernels.layers import ROOFLINE_LAYERS


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bench_layer(shape: ConvShape, rank: int, dtype: torch.dtype, copy_gbps: float) -> list[dict]:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape.cin, shape.cout, shape.kernel, padding=shape.padding, device="cuda", dtype=dtype)
    # Random factors: the timing does not depend on their values, and ALS on a 512-channel layer
    # would cost the benchmark minutes.
    cp = CPConv2d(shape.cin, shape.cout, shape.kernel, rank, padding=shape.padding, device="cuda", dtype=dtype)
    x = torch.randn(shape.batch, shape.cin, *shape.size, device="cuda", dtype=dtype)
    rows = []
    nbytes = shape.minimal_bytes(x.element_size())
    cases = [
        ("dense-cudnn", "nchw", conv, None),
        ("dense-cudnn", "channels_last", conv, None),
        ("reference", "nchw", cp, "reference"),
        ("reference", "channels_last", cp, "reference"),
        ("fused", "nchw", cp, "triton"),
        ("fused", "channels_last", cp, "triton"),
    ]
    for backend, layout, module, cp_backend in cases:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        module = module.to(memory_format=fmt)
        xi = x.contiguous(memory_format=fmt)
        if cp_backend is not None:
            module.backend = cp_backend
        with torch.inference_mode():
            module(xi)  # compile, autotune, cudnn.benchmark search: outside the timing
            ms = do_bench(lambda: module(xi), warmup=25, rep=100, return_mode="median")
        gbps = nbytes / (ms * 1e-3) / 1e9
        rows.append({
            "layer": f"{shape.cin}->{shape.cout} @{shape.size[0]}^2 N={shape.batch}",
            "rank": rank, "dtype": str(dtype).removeprefix("torch."), "backend": backend, "layout": layout,
            "median_us": round(ms * 1e3, 2), "gbps_vs_min_bytes": round(gbps, 1),
            "pct_of_copy_bw": round(100 * gbps / copy_gbps, 1),
        })
    return rows


def environment() -> dict:
    return {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(), "cuda": torch.version.cuda, "python": platform.python_version(),
    }


def to_markdown(env: dict, copy_gbps: float, rows: list[dict]) -> str:
    lines = [
        f"# GPU benchmark: {env['gpu']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}, CUDA {env['cuda']}; "
        f"device copy bandwidth measured in this run: {copy_gbps:.0f} GB/s. Median of `do_bench`.",
        "",
        "| layer | rank | dtype | backend | layout | median µs | GB/s (min X+Y) | % of copy BW |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['layer']} | {r['rank']} | {r['dtype']} | {r['backend']} | {r['layout']} | {r['median_us']} | "
        f"{r['gbps_vs_min_bytes']} | {r['pct_of_copy_bw']} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_bench.json and gpu_bench.md")
    args = parser.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    copy_gbps = copy_bandwidth_gbps()
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for layer in ROOFLINE_LAYERS:
            shape = layer.shape
            for rank in (shape.cout // 4, shape.cout // 2):
                rows += bench_layer(shape, rank, dtype, copy_gbps)
                print("\n".join(to_markdown(env, copy_gbps, rows[-6:]).splitlines()[-6:]), flush=True)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump({"environment": env, "copy_gbps": copy_gbps, "rows": rows}, f, indent=1)
    md = to_markdown(env, copy_gbps, rows)
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
