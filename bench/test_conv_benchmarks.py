"""Benchmarks of every backend against dense nn.Conv2d, one pytest-benchmark group per layer and rank.

    pytest bench --benchmark-json=results.json        # real timings (batch of each layer)
    pytest bench --benchmark-disable                  # smoke: every benchmark once, batch 1
    python -m bench.report results.json               # Markdown table and plots

Backends: dense ``nn.Conv2d``, the four-stage reference, the CPU path (CPU only: ``backend="auto"`` on
a CPU tensor), ``torch.compile`` of the reference maths, the fused kernel and ``planned`` (CUDA only:
``backend="auto"`` on a CUDA tensor, the GPU plan's choice), each in NCHW and channels_last, at every
rank of the shared list (C/16 ... C/2, and C and 1.25 C, the ranks trained networks need). The same
backends time ``TuckerConv2d`` at the Tucker-2 ranks of equal MACs to CP at R = C (group ``...-T``).
"""
import dataclasses

import pytest
import torch

from cpkernels.tools.layers import LAYERS
from cpkernels.tools.profile import build_cases, roofline

LAYER_RANKS = [
    pytest.param(layer, rank, id=f"{layer.name}-R{rank}") for layer in LAYERS for rank in layer.ranks()
] + [  # Tucker-2 at the MACs of CP at R = C (trained networks' range): the pair (R_out, R_in)
    pytest.param(layer, pair, id=f"{layer.name}-T{pair[0]}x{pair[1]}") for layer in LAYERS
    if min(layer.shape.cin, layer.shape.cout) >= 16 for pair in [layer.tucker2_rank(layer.rank(1))]
]
BACKENDS = ["dense", "reference", "cpu", "compiled-reference", "fused", "planned"]
LAYOUTS = ["nchw", "channels_last"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer, rank", LAYER_RANKS)
def test_conv(benchmark, layer, rank, backend, layout, device, dtype, smoke, env_info, peaks):
    if backend in ("fused", "planned") and device != "cuda":
        pytest.skip("the fused Triton kernel and the GPU plan need a CUDA GPU")
    if backend == "cpu" and device != "cpu":
        pytest.skip("the CPU path runs on CPU tensors")
    shape = dataclasses.replace(layer.shape, batch=1) if smoke else layer.shape
    (case,) = build_cases(shape, rank, dtype, device, layouts=(layout,), backends=(backend,))

    tucker2 = isinstance(rank, tuple)
    benchmark.group = f"{layer.name}-{'T' + 'x'.join(map(str, rank)) if tucker2 else f'R{rank}'}"
    benchmark.extra_info.update(
        layer=layer.name, rank=list(rank) if tucker2 else rank, decomposition="tucker2" if tucker2 else "cp",
        backend=backend, layout=layout, dtype=str(dtype).removeprefix("torch."),
        batch=shape.batch, macs=case.macs, min_bytes=shape.minimal_bytes(case.x.element_size()),
        dense_macs=shape.dense_macs(), **env_info,
    )
    with torch.inference_mode():
        case.fn(case.x)  # compilation, autotuning and cudnn.benchmark stay out of the numbers
        if device == "cuda":
            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            benchmark.extra_info["fits_in_l2"] = shape.minimal_bytes(case.x.element_size()) < l2
            benchmark.extra_info["timer"] = "wall clock with torch.cuda.synchronize() inside the callable"

            def run():
                case.fn(case.x)
                torch.cuda.synchronize()
        else:
            benchmark.extra_info["timer"] = "wall clock"

            def run():
                case.fn(case.x)

        benchmark(run)
    if peaks is not None and benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(roofline(shape, case.macs, case.x.element_size(), peaks, median))
        benchmark.extra_info["peaks"] = peaks
