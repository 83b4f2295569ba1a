"""``python -m cpkernels demo``: decompose three conv layers and compare them with the dense originals."""
from __future__ import annotations

import time

import torch
from torch import nn

from .module import CPConv2d
from .profile import time_median

# (name, conv, rank, input shape)
DEMO_LAYERS = (
    ("Conv2d(3, 2, 5x5)", lambda: nn.Conv2d(3, 2, 5, bias=False), 2, (8, 3, 64, 64)),
    ("VGG-19 conv1_1 (3->64, 3x3)", lambda: nn.Conv2d(3, 64, 3, padding=1), 16, (8, 3, 64, 64)),
    ("VGG-style 256->256 3x3", lambda: nn.Conv2d(256, 256, 3, padding=1), 64, (8, 256, 28, 28)),
)


def run_demo(layers=DEMO_LAYERS, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    rows = []
    for name, make_conv, rank, input_shape in layers:
        conv = make_conv()
        start = time.perf_counter()
        layer = CPConv2d.from_conv(conv, rank, random_state=seed)
        decompose_s = time.perf_counter() - start
        x = torch.randn(input_shape)
        with torch.inference_mode():
            dense_out = conv(x)
            out_error = float(torch.linalg.vector_norm(layer(x) - dense_out) / torch.linalg.vector_norm(dense_out))
        dense_params = conv.weight.numel()
        rows.append({
            "layer": name,
            "rank": rank,
            "params_dense": dense_params,
            "params_cp": layer.factors.num_params,
            "compression": dense_params / layer.factors.num_params,
            "weight_error": layer.factors.relative_error(conv.weight),
            "output_error": out_error,
            "decompose_s": decompose_s,
            "dense_ms": 1e3 * time_median(conv, x),
            "cp_ms": 1e3 * time_median(layer, x),
            "input": "x".join(map(str, input_shape)),
        })
    return rows


def format_rows(rows: list[dict]) -> str:
    header = ("layer", "rank", "params dense", "params CP", "compression", "weight err", "output err",
              "decompose s", "input", "dense ms", "CP ms", "speedup")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        lines.append(" | ".join([
            r["layer"], str(r["rank"]), str(r["params_dense"]), str(r["params_cp"]), f"{r['compression']:.2f}x",
            f"{r['weight_error']:.3f}", f"{r['output_error']:.3f}", f"{r['decompose_s']:.1f}", r["input"],
            f"{r['dense_ms']:.2f}", f"{r['cp_ms']:.2f}", f"{r['dense_ms'] / r['cp_ms']:.2f}x",
        ]))
    return "\n".join(lines)


def main() -> int:
    print(f"cpkernels demo: CP-decomposing randomly initialised nn.Conv2d layers (torch {torch.__version__}, "
          f"CPU, {torch.get_num_threads()} threads)")
    print("Random weights are not low-rank, so their errors are an upper bound; trained filters compress better.\n")
    print(format_rows(run_demo()))
    return 0
