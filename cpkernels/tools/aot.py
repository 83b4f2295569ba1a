"""Compile the fused kernel for real GPUs without one, and report what each config costs.

``compile_report(arch)`` compiles every autotune config of the fused kernels (the general ``taps``
kernel on its two rank paths, each on CP factors and on pre-folded Tucker-2 tap weights; the ``rows``
and ``wide`` kernels), for each input dtype, for ``sm_80`` or
``sm_90``, and returns one dict per (config, dtype): registers and spill bytes (from ``ptxas -v`` on
the PTX), shared memory (Triton's metadata) and whether the channel contractions run on the tensor
cores (``mma``/``wgmma`` in the PTX).

The kernel is specialised the way a typical launch is: 3x3, stride and dilation 1, NCHW input,
contiguous factors (unit strides become constants, pointers are 16-byte aligned).

    python -m cpkernels.tools.aot --arch sm_90
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import torch

ARCHS = {"sm_80": 80, "sm_90": 90}
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
REPORT_KEYS = ("config", "dtype", "registers", "spill_bytes", "shared_bytes", "instructions", "tensor_cores")

# Argument values fixed at compile time, as Triton specialises them at a typical launch.
_SPECIALISED = {
    "stride_xw": 1, "stride_yw": 1, "stride_br": 1, "stride_vr": 1, "stride_hr": 1, "stride_ar": 1,
    "STRIDE_H": 1, "STRIDE_W": 1, "DIL_H": 1, "DIL_W": 1,
    "KH": 3, "KW": 3, "HAS_BIAS": True, "USE_INT64": False,
}
_POINTERS = ("x_ptr", "b_ptr", "v_ptr", "h_ptr", "a_ptr", "bias_ptr", "y_ptr", "u_ptr")


def _triton_bin(name: str) -> Path:
    # triton is optional (CPU-only installs may lack it): imported on first use
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _ptxas_usage(ptx: str, arch: str) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v``.

    The ``ptxas-blackwell`` build shipped with Triton reads the PTX versions Triton emits, which the
    older plain ``ptxas`` beside it may not.
    """
    ptxas = _triton_bin("ptxas-blackwell")
    if not ptxas.exists():
        ptxas = _triton_bin("ptxas")
    target = "sm_90a" if arch == "sm_90" else arch
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [str(ptxas), f"-arch={target}", "-v", path, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        )
    text = out.stdout + out.stderr
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    spill_bytes = int(spills.group(1)) + int(spills.group(2)) if spills else 0
    return registers, spill_bytes


def _sass_instructions(cubin: bytes) -> int:
    """Instructions in the kernel's SASS (``cuobjdump --dump-sass``), the static count."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([str(_triton_bin("cuobjdump")), "--dump-sass", path], capture_output=True, text=True,
                             check=True)
    return len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+\S", out.stdout))


def variants(arch: str = "sm_90") -> list[tuple[str, str, tuple[int, ...], torch.dtype, dict]]:
    """Every (config name, kernel name, tile, dtype, meta-parameters) the autotuners can launch on ``arch``."""
    # the kernels import triton: loaded on first use
    from cpkernels.kernels import cp_conv2d_fused as fused

    out = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        taps = fused.TAPS_TILES.tiles(dtype, ARCHS[arch])
        # FOLDED: the same loops on pre-folded per-tap weights (Tucker-2), without the CP tap scaling.
        for (bp, bc, br, bo, warps, stages), whole, folded in itertools.product(taps, (True, False), (False, True)):
            name = (f"taps_P{bp}_C{bc}_R{br}_O{bo}_w{warps}_s{stages}_{'whole' if whole else 'sliced'}"
                    f"{'_folded' if folded else ''}")
            meta = {"BLOCK_P": bp, "BLOCK_C": bc, "BLOCK_R": br, "BLOCK_O": bo, "WHOLE_RANK": whole, "FOLDED": folded}
            out.append((name, "cp_conv2d_taps_kernel", (warps, stages), dtype, meta))
        rows = fused.ROWS_TILES.tiles(dtype, ARCHS[arch])
        for (rows_, bw, bc, br, bo, warps, stages), sh in itertools.product(rows, (1, 2)):
            name = f"rows{rows_}_W{bw}_C{bc}_R{br}_O{bo}_w{warps}_s{stages}_sh{sh}"
            meta = {"ROWS": rows_, "BLOCK_W": bw, "BLOCK_C": bc, "BLOCK_R": br, "BLOCK_O": bo, "STRIDE_H": sh}
            out.append((name, "cp_conv2d_rows_kernel", (warps, stages), dtype, meta))
        wide = fused.WIDE_TILES.tiles(dtype, ARCHS[arch])
        for rows_, step, bw, bm, bc, br, bo, warps, stages in wide:
            name = f"wide{rows_}_S{step}_W{bw}_M{bm}_C{bc}_R{br}_O{bo}_w{warps}_s{stages}"
            ring, bw_in = fused.wide_geometry((3, 3), (1, 1), (1, 1), step, bw)
            meta = {"ROWS": rows_, "STEP": step, "BLOCK_W": bw, "BLOCK_M": bm, "BLOCK_C": bc, "BLOCK_R": br,
                    "BLOCK_O": bo, "RING": ring, "BW_IN": bw_in}
            out.append((name, "cp_conv2d_wide_kernel", (warps, stages), dtype, meta))
    return out


def compile_config(kernel_name: str, launch: tuple[int, int], dtype: torch.dtype, arch: str, meta: dict):
    """Compile one kernel for one dtype and one set of meta-parameters; returns Triton's compiled kernel."""
    # triton is optional (CPU-only installs may lack it): imported on first use
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    # the kernels import triton: loaded on first use
    from cpkernels.kernels import cp_conv2d_fused as fused

    jit_fn = getattr(fused, kernel_name)  # the JITFunction under the autotuner and heuristics
    while not isinstance(jit_fn, JITFunction) and hasattr(jit_fn, "fn"):
        jit_fn = jit_fn.fn
    if not isinstance(jit_fn, JITFunction):
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (see compile_report)")
    constexprs = {
        **{k: v for k, v in _SPECIALISED.items() if k in jit_fn.arg_names},
        "DOT_PRECISION": "tf32" if dtype == torch.float32 else "ieee",
        "PRECISE": dtype != torch.float32,  # as the launcher sets it
        **meta,
    }
    elem = DTYPES[dtype]
    signature = {}
    for name in jit_fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "u_ptr":
            signature[name] = "*fp32"  # the wide kernel's scratch ring
        elif name in _POINTERS:
            signature[name] = f"*{elem}"
        else:
            signature[name] = "i32"
    attrs = {(jit_fn.arg_names.index(p),): [["tt.divisibility", 16]] for p in _POINTERS if p in jit_fn.arg_names}
    src = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", ARCHS[arch], 32)
    warps, stages = launch
    return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})


def compile_report(arch: str = "sm_90", kernels: Optional[tuple[str, ...]] = None) -> list[dict]:
    """One dict per (config, dtype) with the keys of ``REPORT_KEYS``."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # This process compiled the kernel for the interpreter; a fresh one compiles it for the GPU.
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        out = subprocess.run(
            [sys.executable, "-m", "cpkernels.tools.aot", "--arch", arch, "--json"],
            capture_output=True, text=True, check=True, env=env,
        )
        return json.loads(out.stdout)
    jobs = [(name, kernel_name, launch, dtype, meta, arch) for name, kernel_name, launch, dtype, meta in variants(arch)
            if kernels is None or name.startswith(kernels)]
    # Each compile is a few seconds of one core: run them on every core.

    with ProcessPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        return list(pool.map(_report_row, jobs))


def _report_row(job) -> dict:
    name, kernel_name, launch, dtype, meta, arch = job
    kernel = compile_config(kernel_name, launch, dtype, arch, meta)
    ptx = kernel.asm["ptx"]
    registers, spill_bytes = _ptxas_usage(ptx, arch)
    return {
        "config": name,
        "dtype": DTYPES[dtype],
        "registers": registers,
        "spill_bytes": spill_bytes,
        "shared_bytes": int(kernel.metadata.shared),
        "instructions": _sass_instructions(kernel.asm["cubin"]),
        "tensor_cores": bool(re.search(r"\b(mma|wgmma)\.", ptx)),
    }


def format_table(rows: list[dict]) -> str:
    header = "| " + " | ".join(REPORT_KEYS) + " |"
    lines = [header, "|" + "---|" * len(REPORT_KEYS)]
    lines += ["| " + " | ".join(str(r[k]) for k in REPORT_KEYS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile the fused CP conv kernel's configs for a GPU arch.")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sm_90")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--kernel", action="append", choices=("taps", "rows", "wide"),
                        help="only this kernel's configs (repeatable); default: all")
    args = parser.parse_args(argv)
    rows = compile_report(args.arch, tuple(args.kernel) if args.kernel else None)
    print(json.dumps(rows) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
