"""``python -m cpkernels demo``: the job end to end on a network trained on the spot.

A prelude decomposes the two layers of the seed example. Then a small CNN is trained on scikit-learn's
bundled digits, its ranks are planned for a quarter of its conv MACs from calibration batches,
it is compressed (no second decomposition), and its accuracy and CPU speed are compared with the dense
network, before and after a short fine-tuning.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from cpkernels.compression.compress import compress_model
from cpkernels.compression.ranks import plan_ranks
from cpkernels.modules.cp import CPConv2d
from cpkernels.tools.digits import accuracy, inference_seconds, output_change, train, trained_cnn

# The seed's two examples: (name, conv, rank).
PRELUDE_LAYERS = (
    ("Conv2d(3, 2, 5x5)", lambda: nn.Conv2d(3, 2, 5, bias=False), 2),
    ("VGG-19 conv1_1 [64, 3, 3, 3]", lambda: nn.Conv2d(3, 64, 3, padding=1), 16),
)


def prelude(seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    rows = []
    for name, make_conv, rank in PRELUDE_LAYERS:
        conv = make_conv()
        layer = CPConv2d.from_conv(conv, rank, random_state=seed)
        rows.append({"layer": name, "rank": rank, "values_dense": conv.weight.numel(),
                     "values_cp": layer.factors.num_params, "weight_error": layer.factors.relative_error(conv.weight)})
    return rows


def run(seed: int = 0, budget: float = 0.25, epochs: int = 30, finetune_epochs: int = 8,
        timing_copies: int = 8) -> dict:
    """Train, plan, compress, measure, fine-tune, measure again."""
    start = time.perf_counter()
    model, (x_train, y_train, x_test, y_test, x_all) = trained_cnn(seed, epochs)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    # a fraction of the compressible convs' MACs, as the demo prints it (the 1-channel first conv stays dense)
    plan = plan_ranks(model, budget, metric="macs", method="data", calibration=list(x_train.split(256)),
                      random_state=seed, progress=False, budget_over="considered")
    compressed, _ = compress_model(model, plan)
    plan_s = time.perf_counter() - start

    batch = x_all.repeat(timing_copies, 1, 1, 1)  # enough images to time the convs rather than Python
    result = {
        "plan": plan, "train_s": train_s, "plan_s": plan_s, "images_timed": len(batch),
        "acc_dense": accuracy(model, x_test, y_test), "acc_compressed": accuracy(compressed, x_test, y_test),
        "logit_change": output_change(compressed, model, x_test),
        "dense_ms": 1e3 * inference_seconds(model, batch), "compressed_ms": 1e3 * inference_seconds(compressed, batch),
        "params_dense": sum(p.numel() for p in model.parameters()),
        "params_compressed": sum(p.numel() for p in compressed.parameters()),
    }
    train(compressed, x_train, y_train, finetune_epochs, lr=1e-3, seed=seed + 1)
    result["acc_finetuned"] = accuracy(compressed, x_test, y_test)
    return result


def main() -> int:
    start = time.perf_counter()
    print(f"cpkernels demo (torch {torch.__version__}, CPU, {torch.get_num_threads()} threads)\n")
    print("1. The seed's two layers, CP-decomposed (random weights: not low-rank, so the error is large)")
    for r in prelude():
        print(f"   {r['layer']} at rank {r['rank']}: {r['values_dense']} values -> {r['values_cp']}, "
              f"relative weight error {r['weight_error']:.3f}")

    r = run()
    print(f"\n2. A CNN trained on scikit-learn's digits ({r['train_s']:.1f} s), ranks planned for 25 % of its "
          f"conv MACs from calibration batches, compressed ({r['plan_s']:.1f} s):\n")
    print(r["plan"])
    print(f"\n   accuracy on the test set: dense {r['acc_dense']:.2f} %, compressed {r['acc_compressed']:.2f} % "
          f"(logits moved {100 * r['logit_change']:.1f} %), after fine-tuning {r['acc_finetuned']:.2f} %")
    print(f"   parameters: {r['params_dense']:,} -> {r['params_compressed']:,}")
    print(f"   CPU inference on {r['images_timed']:,} images: dense {r['dense_ms']:.1f} ms, "
          f"compressed {r['compressed_ms']:.1f} ms ({r['dense_ms'] / r['compressed_ms']:.2f}x)")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    return 0
