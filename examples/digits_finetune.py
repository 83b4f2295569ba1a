"""Compress a small CNN trained on scikit-learn's digits, then fine-tune the accuracy back.

    python examples/digits_finetune.py

Trains a 3-conv CNN on the 8x8 digits that ship inside scikit-learn (no download), replaces its convs
by CP layers of at most a quarter of their MACs, fine-tunes a few epochs, and prints the accuracy before
compression, after it and after fine-tuning, the MAC and parameter reduction, and the CPU inference
speed-up. Runs in well under two minutes on two cores.
"""
from __future__ import annotations

import time

import torch

from cpkernels import compress_model
from cpkernels.compression.compress import rank_for_mac_fraction
from cpkernels.tools.digits import accuracy, inference_seconds, load_digits_tensors, make_cnn, train


def run(seed: int = 0, epochs: int = 30, finetune_epochs: int = 8, mac_fraction: float = 0.25) -> dict:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test, x_all = load_digits_tensors(seed)
    model = make_cnn()
    train(model, x_train, y_train, epochs, lr=3e-3, seed=seed)
    acc_dense = accuracy(model, x_test, y_test)

    # Input size of each conv, then the largest rank keeping each within the MAC budget.
    sizes = {"0": (8, 8), "2": (8, 8), "5": (4, 4)}
    ranks = {name: rank_for_mac_fraction(model.get_submodule(name), mac_fraction, hw) for name, hw in sizes.items()}
    compressed, report = compress_model(model, rank=ranks, input_size=(1, 1, 8, 8), random_state=seed,
                                        progress=False)
    acc_compressed = accuracy(compressed, x_test, y_test)
    train(compressed, x_train, y_train, finetune_epochs, lr=1e-3, seed=seed + 1)
    acc_finetuned = accuracy(compressed, x_test, y_test)

    conv_rows = [r for r in report.rows]
    macs_before = sum(r["macs_before"] for r in conv_rows)
    macs_after = sum(r["macs_after"] for r in conv_rows)
    params_before = sum(p.numel() for p in model.parameters())
    params_after = sum(p.numel() for p in compressed.parameters())
    batch = x_all.repeat(8, 1, 1, 1)  # 14 376 images: enough work to time the convs, not Python
    return {
        "report": report,
        "acc_dense": acc_dense, "acc_compressed": acc_compressed, "acc_finetuned": acc_finetuned,
        "conv_macs_before": macs_before, "conv_macs_after": macs_after,
        "params_before": params_before, "params_after": params_after,
        "cpu_speedup": inference_seconds(model, batch) / inference_seconds(compressed, batch),
    }


def main() -> None:
    start = time.perf_counter()
    r = run()
    print(r["report"])
    print()
    print(f"accuracy (test set): dense {r['acc_dense']:.2f}%, compressed {r['acc_compressed']:.2f}%, "
          f"fine-tuned {r['acc_finetuned']:.2f}%")
    print(f"conv MACs per image: {r['conv_macs_before']:,} -> {r['conv_macs_after']:,} "
          f"({r['conv_macs_before'] / r['conv_macs_after']:.2f}x fewer)")
    print(f"parameters: {r['params_before']:,} -> {r['params_after']:,} "
          f"({r['params_before'] / r['params_after']:.2f}x fewer)")
    print(f"CPU inference speed-up (14 376 images, {torch.get_num_threads()} threads): {r['cpu_speedup']:.2f}x")
    print(f"total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
